"""What a training run leaves on disk and how it stops, beside the loop in finetune/lora.py: the resumable state
(state.ckpt, through fabric.save / fabric.load), train_config.yaml, status.json, the time budget and signals, the
loggers and loss.png. Every file is written to a temporary name and renamed, so a run killed at any moment loses at
most the steps since its last save.
"""

import json
import math
import os
import pickle
import resource
import signal
import time
from pathlib import Path
from typing import List, Optional

import torch
import yaml

from cli import InputError
from lora import check_adapter_fits, lora_state_dict, read_adapter, save_adapter


def process_start() -> float:
    """time.monotonic() when this process began (Linux: /proc/self/stat's starttime against /proc/uptime); elsewhere
    now less the CPU time spent so far, which is mostly the imports before this line."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, after "(name)"
        age = float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = -1.0
    return time.monotonic() - (age if age >= 0 else time.process_time())  # < 0: a container's own uptime (lxcfs)


START = process_start()  # the time budget counts from process start: imports and loading the model are part of the day
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early (status.json says why); continue with --resume true
# A resumed run replays the saved data order and optimizer state: these must be what they were.
RESUME_MUST_MATCH = ("checkpoint_dir", "data_dir", "quantize", "precision", "lora.r", "lora.alpha", "lora.dropout",
                     "lora.targets", "train.batch_size", "train.micro_batch_size", "train.max_seq_length",
                     "train.packing", "train.optimizer", "seed")


MISSING = object()


def lookup(hparams: dict, key: str):
    """hparams["train"]["batch_size"] for key "train.batch_size"; MISSING where the key is absent (a saved null is a
    value: a run without --quantize must not resume with it)."""
    for part in key.split("."):
        if not (isinstance(hparams, dict) and part in hparams):
            return MISSING
        hparams = hparams[part]
    return hparams


def write_config(out_dir: Path, hparams: dict, note: Optional[str] = None) -> None:
    """train_config.yaml: every flag of this run in the shape --config reads: `finetune/lora.py --config` repeats it.
    Without --resume: repeating a run is a fresh start (give another --out_dir), continuing one says so. The flags
    are as given, so --memory_budget plans again; `note` (what it chose) goes on top as a comment."""
    flags = {k: v for k, v in hparams.items() if k != "resume"}
    comment = f"# {note}\n" if note else ""
    write_atomic(out_dir / "train_config.yaml", comment + yaml.safe_dump(flags, sort_keys=False))


def write_atomic(path: Path, text: str) -> None:
    """A reader (or a run killed meanwhile) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_resumable(out_dir: Path, hparams: dict, config) -> None:
    path = out_dir / "train_config.yaml"
    if not path.exists() and (out_dir / "train_config.json").exists():
        raise InputError(f"{out_dir}: written by the trainer before its flags were grouped (train_config.json); "
                         "finish it with that version, or start a new --out_dir")
    saved = {}
    if path.exists():
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise InputError(f"{path}: unreadable or malformed YAML ({' '.join(str(e).split())[:200]}); restore it, "
                             "or start a new --out_dir") from None
        if not isinstance(saved, dict):
            raise InputError(f"{path}: expected the flags of a run, found {type(saved).__name__}; restore it, or "
                             "start a new --out_dir")
    for key in RESUME_MUST_MATCH:
        was, now = lookup(saved, key), lookup(hparams, key)
        if was is not MISSING and was != now:
            raise InputError(f"{path}: --{key} was {was!r}, now {now!r}; resuming needs the same value "
                             "(or start a new --out_dir)")
    adapter = out_dir / "adapter.safetensors"
    if adapter.is_file():
        check_adapter_fits(read_adapter(adapter)[0], config, adapter)


def adapter_extra(hparams: dict, state: dict) -> dict:
    """What generate/ and scripts/merge_lora.py read from an adapter's metadata."""
    return {"step": state["step"], "quantize": hparams["quantize"], "checkpoint_dir": hparams["checkpoint_dir"],
            "data_dir": hparams["data_dir"]}


def save_checkpoint(fabric, gpt, optimizer, scheduler, state: dict, out_dir: Path, hparams: dict,
                    numbered: bool = False) -> None:
    """Adapter (+ a numbered copy) and the resumable state; state.ckpt last, so a state on disk always has its adapter
    next to it. Only the LoRA weights go into state.ckpt: the base is read again from checkpoint_dir."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if fabric.device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)
    rngs = fabric.all_gather(torch.cat([rng, cuda_rng]).to(fabric.device))  # every rank's dropout stream
    rngs = rngs.cpu() if rngs.dim() == 2 else rngs.cpu().unsqueeze(0)
    extra = adapter_extra(hparams, state)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_adapter(gpt, out_dir / "adapter.safetensors", extra=extra)
        if numbered:
            (out_dir / "adapters").mkdir(exist_ok=True)
            save_adapter(gpt, out_dir / "adapters" / f"step-{state['step']:06d}.safetensors", extra=extra)
    tmp = out_dir / "state.ckpt.tmp"
    fabric.save(tmp, {"lora": {k: v.detach().cpu().clone() for k, v in lora_state_dict(gpt).items()},
                      "optimizer": optimizer, "scheduler": scheduler, "rng": rngs, "cpu_rng_size": rng.numel(),
                      "state": json.dumps(state), "hparams": json.dumps(hparams)})
    for logger in fabric.loggers:
        logger.save()
    fabric.barrier()
    if fabric.global_rank == 0:
        os.replace(tmp, out_dir / "state.ckpt")
    fabric.barrier()


def load_checkpoint(fabric, path: Path, gpt, optimizer, scheduler, state: dict, hparams: dict) -> dict:
    """Restores the LoRA weights, optimizer, scheduler and RNG streams in place; returns the loop's state dict."""
    try:
        payload = fabric.load(path, {"optimizer": optimizer, "scheduler": scheduler})
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: unreadable ({' '.join(str(e).split())[:200]}); it cannot be resumed, start a new "
                         "--out_dir") from None
    if not {"lora", "hparams", "state", "rng"} <= set(payload):
        raise InputError(f"{path}: not a state this trainer wrote (keys {sorted(payload)}); it cannot be resumed, "
                         "start a new --out_dir")
    params = dict(gpt.named_parameters())
    with torch.no_grad():
        for k, v in payload["lora"].items():
            params[k].copy_(v)
    # The optimizer and scheduler state bring back the saved run's learning rate and weight decay: this run's flags
    # win, as train_config.yaml says.
    lr, decay = hparams["train"]["learning_rate"], hparams["train"]["weight_decay"]
    saved = json.loads(payload["hparams"])["train"]
    changed = [f"--train.{k} {now:g} (was {saved[k]:g})" for k, now in (("learning_rate", lr), ("weight_decay", decay))
               if saved.get(k, now) != now]
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch), weight_decay=decay)
    if changed:
        fabric.print(f"Resuming with {' and '.join(changed)}, from this step on")
    rngs = payload["rng"]
    if rngs.size(0) != fabric.world_size:
        fabric.print(f"{path}: saved with {rngs.size(0)} ranks, resuming on {fabric.world_size}: dropout noise will "
                     "differ")
    mine = rngs[min(fabric.global_rank, rngs.size(0) - 1)]
    n = payload["cpu_rng_size"]
    torch.set_rng_state(mine[:n].to(torch.uint8).contiguous())
    if fabric.device.type == "cuda" and mine.numel() > n:
        torch.cuda.set_rng_state(mine[n:].to(torch.uint8).contiguous())
    return {**state, **json.loads(payload["state"])}


def write_status(out_dir: Path, status: str, step: int, total_steps: int, reason: str = "",
                 memory: Optional[dict] = None) -> None:
    """status.json: "running", "stopped" (by the budget or a signal: continue with --resume true; the exit status is
    75) or "finished" (exit status 0). A run that crashed still says "running". memory: with --memory_budget, the
    plan and the run's peaks."""
    fields = {"status": status, "reason": reason, "step": step, "total_steps": total_steps}
    write_atomic(out_dir / "status.json", json.dumps({**fields, **({"memory": memory} if memory else {})}) + "\n")


class Stopper:
    """Stops before the time budget runs out (leaving room for one more step, an evaluation and a save) or on
    SIGTERM/SIGINT (a second Ctrl-C interrupts at once)."""

    def __init__(self, deadline: Optional[float], max_time: Optional[str] = None) -> None:
        self.deadline, self.max_time = deadline, max_time  # time.monotonic() to be done by; the --max_time it came from
        self.save_s, self.eval_s, self.signalled, self.reason = 0.0, 0.0, False, ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook runner): budget only
                pass

    def _on_signal(self, signum, frame) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = signal.Signals(signum).name

    def should_stop(self, fabric, step_times: List[float], eval_due: bool) -> bool:
        stop = bool(self.signalled)
        if self.signalled:
            self.reason = f"asked to stop ({self.signalled})"
        elif self.deadline is not None:
            step = max(step_times[-5:]) if step_times else 0.0
            needed = 1.5 * step + 2 * self.save_s + (self.eval_s if eval_due else 0.0) + 10.0
            stop = time.monotonic() + needed > self.deadline
            if stop:
                self.reason = f"the --max_time budget of {format_seconds(parse_time(self.max_time))} is nearly spent"
        flag = fabric.all_reduce(torch.tensor(float(stop), device=fabric.device), reduce_op="sum").item()
        if flag and not self.reason:
            self.reason = "another rank is stopping"
        return flag > 0


def parse_time(value) -> float:
    """"[DD:]HH:MM:SS" or a number of seconds -> seconds (> 0)."""
    try:
        parts = [float(p) for p in str(value).strip().split(":")]
    except ValueError:
        parts = []
    seconds = sum(p * unit for p, unit in zip(reversed(parts), (1, 60, 3600, 86400)))
    if not 0 < len(parts) <= 4 or any(math.copysign(1, p) < 0 for p in parts) or not 0 < seconds < math.inf:
        raise InputError(f"--max_time {value!r}: use [DD:]HH:MM:SS (e.g. 23:30:00) or seconds > 0; null for no budget")
    return seconds


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":  # reserved: what the allocator holds, and what --memory_budget caps
        return (f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
                f"(reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f})")
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def make_loggers(out_dir: Path) -> list:
    """logs/ as CSV always; TensorBoard beside it when it is installed."""
    from lightning.fabric.loggers import CSVLogger

    loggers = [CSVLogger(str(out_dir), name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard"))
    except ImportError:
        pass
    return loggers


def finish(fabric, state: dict, out_dir: Path) -> None:
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.global_rank != 0:
        return
    plot_losses(state["history"], out_dir / "loss.png")
    val = state["history"]["val"]
    summary = f"Val loss {val[0][1]:.4f} -> {val[-1][1]:.4f} (best {state['best_val']:.4f})" if val else "No validation"
    fabric.print(f"Done: {state['step']} steps, {state['tokens']:,.0f} tokens. {summary}. "
                 f"Adapter: {out_dir / 'adapter.safetensors'}\n"
                 f"Try it: python generate/lora.py --adapter {out_dir / 'adapter.safetensors'} --prompt '...'")


def plot_losses(history: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train", alpha=0.6)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
