"""Lint the two Dockerfiles (no Docker on these machines) and run the scripts they call."""

import ast
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def instructions(path: Path) -> list:
    """(KEYWORD, argument string) per instruction, comments dropped and continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if line.rstrip().endswith("\\"):
            continue
        if pending:
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def copied_sources(instrs) -> list:
    return [src for kw, arg in instrs if kw == "COPY" for src in shlex.split(arg)[:-1] if not src.startswith("--")]


def project_imports(entry: Path, seen=None) -> set:
    """Repository modules (files/folders at the root) that `entry` imports, transitively."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(entry.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            file = ROOT.joinpath(*parts).with_suffix(".py")
            if file.is_file() and str(file) not in seen:
                seen.add(str(file))
                project_imports(file, seen)
    return {str(Path(p).relative_to(ROOT)) for p in seen}


def parameters(script: Path) -> set:
    """Flag names of a script's jsonargparse entry point (main/setup signature); for finetune/lora.py, whose flags
    come in groups (--lora.r), the names its own parser prints with --print_config, and --config."""
    if script == ROOT / "finetune" / "lora.py":
        import yaml

        printed = subprocess.run([sys.executable, str(script), "--print_config"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120, check=True).stdout
        config = yaml.safe_load(printed)
        return {"config"} | {f"{k}.{field}" if isinstance(v, dict) else k for k, v in config.items()
                             for field in (v if isinstance(v, dict) else [None])}
    tree = ast.parse(script.read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("main", "setup")]
    assert funcs, f"{script}: no main/setup function"
    return {a.arg for f in funcs for a in f.args.args + f.args.kwonlyargs}


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.train"])
def test_dockerfile_lint(name):
    instrs = instructions(ROOT / name)
    keywords = [kw for kw, _ in instrs]
    assert keywords[0] in ("FROM", "ARG") and "FROM" in keywords
    base = next(arg for kw, arg in instrs if kw == "FROM")
    assert "pytorch" in base and "cuda" in base and ":" in base and not base.endswith(":latest")  # pinned CUDA torch
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "EXPOSE", "CMD", "HEALTHCHECK", "VOLUME", "LABEL"}
    assert set(keywords) <= known, set(keywords) - known
    assert keywords.count("CMD") == 1 and keywords[-1] == "CMD"
    cmd = next(arg for kw, arg in instrs if kw == "CMD")
    assert cmd.startswith("[")  # exec form: the server gets SIGTERM directly
    args = set(re.findall(r"\$\{(\w+)\}", " ".join(arg for _, arg in instrs)))
    declared = {arg.split("=")[0] for kw, arg in instrs if kw == "ARG"}
    assert args <= declared | {"PATH"}, f"undeclared build args {args - declared}"
    sources = copied_sources(instrs)
    for src in sources:
        if "${" not in src:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist in the repository"
    # requirements are installed before the code is copied (code edits keep the pip layer cached)
    first_code = min(i for i, (kw, arg) in enumerate(instrs) if kw == "COPY" and "model.py" in arg)
    pip = next(i for i, (kw, arg) in enumerate(instrs) if kw == "RUN" and "requirements.txt" in arg)
    assert pip < first_code
    for script in re.findall(r"scripts/\w+\.sh", cmd):
        assert any(script == s or script.startswith(s.rstrip("/") + "/") for s in sources), f"{script} not copied"


def test_serve_image_has_everything_the_server_imports():
    instrs = instructions(ROOT / "Dockerfile.serve")
    sources = copied_sources(instrs)
    for module in project_imports(ROOT / "generate" / "server.py") | {"lora.py", "quantize.py", "prompts.py"}:
        assert any(module == s or module.startswith(s.rstrip("/") + "/") for s in sources), f"{module} not copied"
    assert ("EXPOSE", "80") in instrs
    cmd = next(arg for kw, arg in instrs if kw == "CMD")
    assert "scripts/serve_submission.sh" in cmd
    env = " ".join(arg for kw, arg in instrs if kw == "ENV")
    assert "PORT=80" in env and "CHECKPOINT_DIR=/workspace/checkpoint" in env
    assert any(kw == "COPY" and "${CHECKPOINT}" in arg and "/workspace/checkpoint" in arg for kw, arg in instrs)


def dry_run(script: str, **env) -> str:
    result = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, check=True,
                            env={**os.environ, "DRY_RUN": "1", **env})
    return result.stdout + result.stderr


def test_serve_script_defaults_to_port_80_and_the_server():
    out = dry_run("serve_submission.sh")
    assert "generate/server.py" in out and "--port 80" in out and "--host 0.0.0.0" in out
    assert "--checkpoint_dir /workspace/checkpoint" in out
    out = dry_run("serve_submission.sh", ADAPTER_DIR="/a", QUANTIZE="bnb.nf4", SERVER_ARGS="--stop_at_blank_line true")
    assert "--adapter_dir /a" in out and "--quantize bnb.nf4" in out and "--stop_at_blank_line true" in out
    flags = set(re.findall(r"--(\w+)", out))
    assert flags <= parameters(ROOT / "generate" / "server.py"), flags - parameters(ROOT / "generate" / "server.py")


def test_train_script_runs_existing_scripts_with_their_flags():
    out = dry_run("train_submission.sh", FINETUNE_ARGS="--lora.r 64")
    steps = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert [s.split()[1] for s in steps] == ["scripts/download.py", "scripts/convert_hf_checkpoint.py",
                                             "prepare_data/prepare_mix.py", "finetune/lora.py", "scripts/merge_lora.py"]
    for step in steps:
        words = shlex.split(step)
        script = ROOT / words[1]
        assert script.is_file(), words[1]
        flags = {w[2:].split("=")[0] for w in words if w.startswith("--")}
        assert flags <= parameters(script), f"{words[1]}: unknown flags {flags - parameters(script)}"
    assert "--quantize bnb.nf4-dq" in out and "--max_time 20:00:00" in out and "--lora.r 64" in out
    assert "--speed.cuda_graph true" in out
    # the recipe's hyperparameters come first (the paths and FINETUNE_ARGS after them win)
    assert "finetune/lora.py --config finetune/configs/upaya_4090.yaml --checkpoint_dir" in out
    assert "--config" not in dry_run("train_submission.sh", FINETUNE_CONFIG="")
    recipe = re.search(r"--recipe (\S+)", out).group(1)
    assert (ROOT / recipe).is_file()


def test_serve_script_really_serves(tmp_path):
    """The image's CMD on a tiny checkpoint: /health and the organisers' own check request answer."""
    import httpx

    from tests.tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CHECKPOINT_DIR": str(ckpt), "PORT": str(port), "DEVICE": "cpu", "MAX_SEQ_LENGTH": "256",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve_submission.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/process", json={"prompt": "The capital of France is "}, timeout=30)
        assert r.status_code == 200 and isinstance(r.json()["text"], str)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert '"event": "warmup"' in out and '"path": "/process"' in out  # JSON log lines on stdout
