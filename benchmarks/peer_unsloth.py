"""Time a peer trainer with ../shared/anchors' own bench() (imported from .anchors/, not copied), one fresh process
per configuration, and print one JSON result line per configuration labelled with our model name:

    python3 benchmarks/peer_unsloth.py --arch llama-2-13b --seq 2048 --configs 1xoffload,4xoffload,1xnone

Configurations are MBxMODE: micro-batch MB and checkpointing MODE, `offload` (Unsloth's "unsloth" mode: saved
hidden states offloaded to CPU), `full` (recompute everything) or `none`. `--peer hf-peft` times
anchor_hf_qlora.py's transformers+peft+bnb instead (it has no offload mode).

Each configuration runs in a child process because the anchors expect clean GPU memory (peak memory is a process-wide
counter and Unsloth patches transformers at import). A child that runs out of memory, crashes, or passes its time
limit still yields a line, with an "error" key, so the table lists it instead of losing the rest of the run.
Result lines go to stdout; the children's logs go to stderr with a timestamp per configuration.
"""

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peer_models import ARCHS, default_dir, load_anchor  # noqa: E402

PEERS = {"unsloth": "anchor_unsloth_qlora.py", "hf-peft": "anchor_hf_qlora.py"}
# MODE -> the value each anchor's bench() takes for its checkpointing argument.
MODES = {"unsloth": {"offload": "unsloth", "full": True, "none": False},
         "hf-peft": {"full": 1, "none": 0}}
MODE_ALIASES = {"unsloth": "offload", "offloaded": "offload", "true": "full", "on": "full", "1": "full",
                "false": "none", "off": "none", "0": "none"}


def parse_configs(peer: str, configs: str) -> list[tuple[int, str]]:
    parsed = []
    for spec in configs.split(","):
        mb, _, mode = spec.strip().lower().partition("x")
        mode = MODE_ALIASES.get(mode, mode)
        if not mb.isdigit() or int(mb) < 1 or mode not in MODES[peer]:
            raise SystemExit(f"--configs {spec!r}: write MBxMODE with MODE one of {', '.join(MODES[peer])} for "
                             f"{peer}, e.g. 4x{next(iter(MODES[peer]))}")
        parsed.append((int(mb), mode))
    return parsed


def run_one(peer: str, model_dir: Path, arch: str, seq: int, mb: int, mode: str) -> None:
    """In the child: import the anchor (Unsloth's import must precede transformers') and call its bench()."""
    anchor = load_anchor(PEERS[peer])
    ckpt = MODES[peer][mode]
    if peer == "unsloth":
        anchor.bench(str(model_dir), seq, mb, ckpt)
    else:
        anchor.bench(str(model_dir), arch, seq, mb, ckpt)


def run_child(cmd: list[str], timeout_s: float, log) -> tuple[Optional[int], list[dict], list[str]]:
    """Run cmd, forwarding its output to log; returns (exit code or None on timeout, result rows, last lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)
    results, tail = [], deque(maxlen=30)

    def read():
        for line in proc.stdout:
            line = line.rstrip("\n")
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "system" in row:
                results.append(row)
            else:
                print(line, file=log, flush=True)
                if line.strip():
                    tail.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child's own process group (start_new_session): it and its workers only
        proc.wait()
        code = None
    reader.join(timeout=10)
    return code, results, list(tail)


def error_text(code: Optional[int], tail: list[str], timeout_s: float) -> str:
    if code is None:
        return f"timed out after {timeout_s:.0f} s"
    # The exception's own line (e.g. "torch.OutOfMemoryError: CUDA out of memory ...") is the last of a traceback.
    last = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
    prefix = "out of memory: " if "out of memory" in " ".join(tail).lower() else ""
    return f"{prefix}exit code {code}: {last}"[:300]


def main(
    arch: str = "mistral-7b",
    seq: int = 2048,
    configs: str = "1xoffload",
    peer: str = "unsloth",
    model_dir: Optional[Path] = None,
    timeout_s: float = 240.0,
    budget_s: Optional[float] = None,
    min_s: float = 45.0,
    one: bool = False,
) -> None:
    """Time a peer's QLoRA step for each configuration, each in a fresh process.

    Args:
        arch: mistral-7b or llama-2-13b (the random checkpoint benchmarks/peer_models.py writes).
        seq: sequence length.
        configs: comma list of MBxMODE, MODE one of offload (Unsloth only), full, none.
        peer: unsloth or hf-peft (transformers+peft+bnb).
        model_dir: the Hugging Face checkpoint (default /tmp/<arch>-random).
        timeout_s: time limit of one configuration (load + 11 steps), seconds.
        budget_s: time left for all configurations together; a configuration is skipped (listed with an error) when
            less than min_s remains, and is cut at what remains. Default: no budget.
        min_s: skip a configuration when less than this many seconds of the budget remain.
        one: internal: run the single configuration in this process (the parent starts the children with it).
    """
    if peer not in PEERS:
        raise SystemExit(f"--peer {peer!r}: choose one of {', '.join(PEERS)}")
    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    model_dir = Path(model_dir) if model_dir else default_dir(arch)
    parsed = parse_configs(peer, configs)
    if one:
        (mb, mode), = parsed
        return run_one(peer, model_dir, arch, seq, mb, mode)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: no Hugging Face checkpoint; write it first with "
                         f"`python3 benchmarks/peer_models.py --arch {arch}`")
    deadline = time.time() + budget_s if budget_s is not None else float("inf")
    for mb, mode in parsed:
        label = dict(system=peer, model=ARCHS[arch], arch=arch, seq=seq, mb=mb, mode=mode)
        left = deadline - time.time()
        start = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {peer} {arch} {mb}x{seq} {mode}: starting "
              f"({min(timeout_s, left):.0f} s allowed)", file=sys.stderr, flush=True)
        if left < min_s:
            rows, error = [], f"skipped: {left:.0f} s of the time budget left"
        else:
            limit = min(timeout_s, left)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "true", "--peer", peer, "--arch", arch,
                   "--seq", str(seq), "--configs", f"{mb}x{mode}", "--model_dir", str(model_dir)]
            code, rows, tail = run_child(cmd, limit, sys.stderr)
            error = None if rows else error_text(code, tail, limit) if code != 0 else \
                f"exit code 0 but no result line: {tail[-1] if tail else ''}"[:300]
        for row in rows:
            # The anchors label by their own arch (the Unsloth one always says mistral-7b): put ours on it.
            row.update(model=ARCHS[arch], arch=arch, mode=mode)
            print(json.dumps(row), flush=True)
        if error:
            print(json.dumps(label | {"grad_ckpt": MODES[peer][mode], "error": error}), flush=True)
        print(f"[{time.strftime('%H:%M:%S')}] {peer} {arch} {mb}x{seq} {mode}: done in {time.time() - start:.0f} s"
              + (f" ({error})" if error else ""), file=sys.stderr, flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
