"""--memory_budget on a GPU, in one call: the real trainer (finetune/lora.py: packed rows, logging, validation,
checkpoints) on a random-weight Mistral-7B under 8, 16 and 24 GiB, then the same configurations through
benchmarks/benchmark_finetune.py in the same call.

    PYTHONPATH=.wheels/train_site:$PWD python tests/gpu/check_plan.py

Writes a random bf16 Mistral-7B checkpoint and random-token data of instruction-like lengths (data.save_split) under
/tmp/check_plan, runs the trainer once per budget (NF4-dq, LoRA r16 on every linear, FP8, CUDA graph, 6 rows of 2048
tokens a step), then the benchmark on the chosen configurations (and, time allowing, each budget's runner-up by the
speed model) on packed rows. Prints per budget: the choice and how many configurations the trainer probed for it
(with plan.reserved_bytes, usually one), the predicted and probed reserved peaks, the run's peaks (reserved must
stay under the cap), the trainer's tokens/s (median step; per row slot, padding included, to compare with the
benchmark, whose own packed rows are filled a little differently; over the whole loop with validation and
checkpoints) and the benchmark's. Results: $OUT/check_plan.json (or /tmp/check_plan/check_plan.json) and the
trainers' logs beside it. Settings: BUDGETS="8 16 24", STEPS=24 (validation and a checkpoint every 8), TIME_S=480:
the trainers share it (less a minute and a half for the benchmark), the runner-ups are dropped when they leave too
little of it, and the whole call ends within about TIME_S + 60 seconds.
"""

import csv
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.benchmark_finetune import main as benchmark_main, random_tensors  # noqa: E402
from data import pack, save_split  # noqa: E402
from finetune import plan  # noqa: E402
from lora import LoRAConfig  # noqa: E402
from model import GPT, Config  # noqa: E402
from utils import model_state_to_save, save_safetensors  # noqa: E402

WORK = Path("/tmp/check_plan")
OUT = Path(os.environ.get("OUT") or WORK)
MODEL, SEQ, BATCH = "Mistral-7B-v0.1", 2048, 6
BUDGETS = [int(b) for b in os.environ.get("BUDGETS", "8 16 24").split()]
STEPS, TIME_S = int(os.environ.get("STEPS", 24)), float(os.environ.get("TIME_S", 480))
START = time.monotonic()


def say(text: str) -> None:
    print(f"[+{time.monotonic() - START:5.0f} s] {text}", flush=True)


def random_checkpoint(folder: Path) -> Path:
    """model_config.json and random bf16 weights (as benchmark_finetune.py makes them, here written to disk)."""
    try:
        from utils import weight_names
        name = weight_names(1)[0]
    except ImportError:  # before the weights moved into oneday/
        name = "model.safetensors"
    if (folder / name).is_file():
        return folder
    config = Config.from_name(MODEL)
    with torch.device("meta"):
        model = GPT(config)
    state = {k: v.cpu() for k, v in random_tensors(model, "cuda", torch.bfloat16)}
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    config.to_json(folder / "model_config.json")
    save_safetensors(model_state_to_save(state, config), folder / name)
    return folder


def random_data(folder: Path, n_train: int, n_val: int = 48) -> Path:
    """Random tokens of instruction-like lengths: prompts and responses of log-normal lengths (medians 180 and 250
    tokens, a few over a thousand), the loss on the responses only."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        prompts = np.clip(rng.lognormal(np.log(180), 0.8, n), 8, 1500).astype(int)
        responses = np.clip(rng.lognormal(np.log(250), 0.8, n), 4, 1500).astype(int)
        tokens = [rng.integers(3, 32000, p + r, dtype=np.int32) for p, r in zip(prompts, responses)]
        masks = [np.r_[np.zeros(p, np.uint8), np.ones(r, np.uint8)] for p, r in zip(prompts, responses)]
        save_split(folder / f"{split}.safetensors", tokens, masks)
    (folder / "meta.json").write_text(json.dumps({"max_seq_length": SEQ, "n_train": n_train, "n_val": n_val}))
    return folder


def packing(folder: Path):
    """(documents per row, share of row slots that hold tokens) of the trainer's packing of this data."""
    from data import load_split, make_examples

    examples = make_examples(load_split(folder / "train.safetensors"), SEQ)
    lengths = examples.lengths.tolist()
    rows = pack(lengths, SEQ)
    return len(lengths) / len(rows), sum(lengths) / (len(rows) * SEQ)


def train(ckpt: Path, data: Path, gib: int, runs_left: int) -> dict:
    """One trainer run. Its own --max_time keeps it to its share of the call (the first run, which compiles the
    kernels for the others, a larger one): stopped early, it saves and still reports its steps."""
    out = WORK / f"run_{gib}gib"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    share = (1.6 if runs_left == len(BUDGETS) else 1.0) / (runs_left + (0.6 if runs_left == len(BUDGETS) else 0))
    limit = max(90, int((TIME_S - 90 - (time.monotonic() - START)) * share))
    cmd = ["timeout", "-k", "10", str(limit + 60), sys.executable, "finetune/lora.py", "--checkpoint_dir", str(ckpt),
           "--data_dir", str(data), "--out_dir", str(out), "--quantize", "bnb.nf4-dq", "--memory_budget", f"{gib}GiB",
           "--speed.fp8", "all", "--speed.cuda_graph", "true", "--train.batch_size", str(BATCH), "--train.max_steps",
           str(STEPS), "--train.log_interval", "1", "--train.save_interval", "8", "--eval.interval", "8",
           "--eval.samples", "16", "--eval.sample_tokens", "0", "--lora.r", "16", "--lora.alpha", "16",
           "--max_time", str(limit)]
    say(f"trainer under {gib} GiB (up to {limit} s)")
    log, first_step, done, tokens, steps, plan_line = [], None, None, 0, 0, ""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        log.append(line)
        print(f"  {gib} GiB | {line}", end="", flush=True)
        if line.startswith("step 1/") and first_step is None:
            first_step = time.monotonic()
        if line.startswith("--memory_budget"):
            plan_line = line.strip()
        if line.startswith("Done:"):
            done = time.monotonic()
            steps = int(line.split()[1])
            tokens = int(line.split(" steps, ")[1].split(" tokens")[0].replace(",", ""))
    rc = proc.wait()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"trainer_{gib}gib.log").write_text("".join(log))
    if rc not in (0, 75) or steps < 5:  # 75: stopped by --max_time, after a save
        return {"budget_gib": gib, "error": f"trainer exit status {rc} after {steps} steps"}
    memory = json.loads((out / "status.json").read_text())["memory"]
    metrics = next((out / "logs").rglob("metrics.csv"))
    rates = [float(r["tokens_per_s"]) for r in csv.DictReader(metrics.open()) if r.get("tokens_per_s")]
    return {**memory, "budget_gib": gib, "line": plan_line, "steps": steps,
            "step_tokens_per_s": round(median(rates[3:]), 1),
            # from the first step's end to the last's, validation and checkpoints included
            "loop_tokens_per_s": round(tokens * (steps - 1) / steps / (done - first_step), 1)}


def spec(c: plan.Choice, n_layer: int) -> str:
    """benchmark_finetune.py's name of a choice (with FP8, as the trainer ran)."""
    ckpt = "0" if not c.checkpointed else "1" if c.checkpointed >= n_layer else f"p{c.checkpointed}"
    return f"{c.micro_batch_size}x{ckpt}{'o' if c.offload else ''}+fp8{'+keep' if c.keep_inputs else ''}"


def runner_up(result: dict, config: Config) -> plan.Choice:
    """The speed model's fastest configuration that the memory model fits under the budget with one row a micro-batch
    if the choice has more, else with more: the trade the model is least sure of (more rows against fewer
    checkpointed blocks). The trainer's probe may have found it over the cap: then it was never a choice."""
    job = plan.Job(config, LoRAConfig(r=16, alpha=16), SEQ, BATCH, quantize="bnb.nf4-dq", fp8="all", cuda_graph=True,
                   dense_mask=result["dense_mask"])
    limit = result["budget_gib"] * plan.GiB * (1 - plan.HEADROOM)
    one_row = result["micro_batch_size"] > 1
    others = [c for c in plan.candidates(job) if (c.micro_batch_size == 1) == one_row
              and plan.reserved_bytes(job, c) <= limit]
    return max(others, key=lambda c: plan.relative_speed(job, c))


def main() -> int:
    config = Config.from_name(MODEL)
    say(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: random {MODEL} and data under {WORK}")
    ckpt = random_checkpoint(WORK / "mistral-7b")
    data = random_data(WORK / "data", n_train=int(STEPS * BATCH * SEQ / 450) + 50)
    docs, fill = packing(data)
    torch.cuda.empty_cache()
    say(f"checkpoint and data ready; packing: {docs:.1f} documents a row, {fill:.1%} of the row slots hold tokens")
    results = [train(ckpt, data, gib, len(BUDGETS) - i) for i, gib in enumerate(BUDGETS)]
    chosen = {}
    for r in results:
        if "error" not in r:
            r["config"] = spec(plan.Choice(r["micro_batch_size"], r["checkpointed"], r["offload"], r["keep_inputs"]),
                               config.n_layer)
            chosen.setdefault(r["config"], None)
    extra = [] if time.monotonic() - START > TIME_S - 150 else \
        [spec(runner_up(r, config), config.n_layer) for r in results if "error" not in r]
    configs = list(chosen) + [c for c in dict.fromkeys(extra) if c not in chosen]
    bench = {}
    if configs:
        left = max(60, int(TIME_S + 60 - (time.monotonic() - START)))
        # packed rows as the trainer makes them: the benchmark's own (--packed true: real tokens counted, each
        # configuration also on unpacked rows), or in its older version the same document cuts in every row
        rows_flag = ["--packed", "true"] if "packed" in inspect.signature(benchmark_main).parameters else \
            ["--docs_per_row", str(round(docs))]
        say(f"benchmark_finetune.py --configs {','.join(configs)} {' '.join(rows_flag)} (up to {left} s)")
        proc = subprocess.run(["timeout", str(left), sys.executable, "benchmarks/benchmark_finetune.py", "--model",
                               MODEL, "--seq", str(SEQ), "--configs", ",".join(configs), "--cuda_graph", "true",
                               *rows_flag, "--steps", "6", "--warmup", "2", "--lora_r", "16"],
                              cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-4000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{"system"')]
        rows = [r for r in rows if r.get("rows", "packed") == "packed"]
        for row, name in zip(rows, configs):
            # tokens/s per row slot, padding included, as the trainer's figure below: the two data sets fill their
            # rows a little differently
            real = row.get("real_tokens_per_row", SEQ if "docs_per_row" in row else None)
            if "tokens_per_s" in row and real:
                row["slot_tokens_per_s"] = round(row["tokens_per_s"] * SEQ / real, 1)
            bench[name] = row
    print("\n| budget | choice (probes) | reserved predicted / probed GiB | run peak allocated / reserved GiB "
          "| trainer tok/s (step) | per row slot | whole loop | benchmark per row slot (peak GiB, attention) "
          "| trainer slot / benchmark |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in results:
        if "error" in r:
            print(f"| {r['budget_gib']} GiB | {r['error']} | | | | | | | |")
            ok = False
            continue
        b = bench.get(r["config"], {})
        slot = r["step_tokens_per_s"] / fill
        ratio = slot / b["slot_tokens_per_s"] if b.get("slot_tokens_per_s") else None
        r.update(slot_tokens_per_s=round(slot, 1), benchmark=b, trainer_over_benchmark=ratio and round(ratio, 3))
        under = r["peak_reserved_gib"] <= r["budget_gib"]
        ok &= under and ratio is not None and ratio >= 0.95
        cap = "(under the cap)" if under else "OVER THE CAP"
        print(f"| {r['budget_gib']} GiB | {r['config']} ({r.get('probes', '?')}; {r['steps']} steps) | "
              f"{r['predicted_gib']} / {r['probed_gib']} | "
              f"{r['peak_allocated_gib']} / {r['peak_reserved_gib']} {cap} | "
              f"{r['step_tokens_per_s']:,.0f} | {slot:,.0f} | {r['loop_tokens_per_s']:,.0f} | "
              f"{b.get('slot_tokens_per_s', float('nan')):,.0f} ({b.get('peak_mem_gib', b.get('error', '?'))}, "
              f"{b.get('attention', '?')}) | "
              f"{ratio if ratio is None else f'{ratio:.3f}'} |")
    for r in results:
        if "error" in r or r["config"] not in bench:
            continue
        alt_choice = runner_up(r, config)
        alt = spec(alt_choice, config.n_layer)
        # the trainer's line lists what it probed over the cap: "...; over the cap: <describe> (7.95 GiB), ..."
        over = alt_choice.describe(config.n_layer) + " (" in r.get("line", "").partition("over the cap: ")[2]
        if alt in bench and "tokens_per_s" in bench[alt] and "tokens_per_s" in bench[r["config"]]:
            print(f"speed model, {r['budget_gib']} GiB: chosen {r['config']} {bench[r['config']]['tokens_per_s']:,.0f} "
                  f"tok/s, runner-up {alt} {bench[alt]['tokens_per_s']:,.0f} tok/s (benchmark, packed rows; "
                  f"{'the trainer probed it over the cap' if over else 'not probed by the trainer'})")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "check_plan.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "docs_per_row": docs,
                                                     "fill": fill, "results": results, "benchmark": bench}, indent=1))
    say("check_plan: " + ("OK (every run under its cap, the trainer within 5% of the benchmark)" if ok else
                          "FAILED (see the table)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
