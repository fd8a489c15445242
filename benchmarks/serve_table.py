"""Serving speed against the hardware's bounds, and against transformers' fastest generation, in one table.

    PYTHONPATH=.wheels/train_site:.wheels/serve_site python3 benchmarks/serve_table.py    # no row starts after 420 s

Random weights of a registered config (Mistral-7B-v0.1 at full depth by default), built on the GPU, so no checkpoint
travels. Rows, each measured through the serving engine (generate/engine.py), as HELM's client drives it minus HTTP:
- generation: 128-token greedy requests with 128-token prompts, each alone one after another (1 stream) and all 30 at
  once (30 streams: the median of `repeats` such runs, each about a second; the row gives the slowest and fastest
  too); "same as alone" counts the requests whose 30-stream tokens all equal their own alone run, and gives the widest
  gap between the best and second-best log-probability where one first differed (a near-tie is a small gap: bf16
  rounding in a batch of another size can flip it).
- for the model in bf16 with the fast decode step (compiled, CUDA graphs), with the plain eager step (the reference,
  the engine before the fast step), over a 4-bit NF4 base and over the same base with a LoRA adapter kept unmerged.
- scoring: 30 distinct 512-token prompts asking for 1 token (MMLU's shape) at once: prefill tokens/s.
- transformers: MistralForCausalLM holding the same weights (scripts/hf_names.py), `generate` with
  cache_implementation="static", which compiles its decoding forward (torch.compile, mode "reduce-overhead"), for one
  prompt and a batch of 30; "same as alone" there counts the prompts whose tokens differ from oneday's alone run.
Bounds: decoding reads every weight (the embedding table aside: one row per token) and each row's keys and values once
per step, so tokens/s <= streams x bandwidth / (weight bytes + streams x key/value bytes at the mean context); scoring
does 2 x (non-embedding parameters) + attention FLOPs per token against the GPU's dense bf16 peak. Bandwidth and peak
are the data-sheet figures of the GPU, by name; the measured column uses the bandwidth of a 2 GiB device-to-device
copy measured at the start. Peak GiB is the most memory the row's server held (its weights, caches and activations;
other rows' models are subtracted). A row that fails prints its error and the table goes on; rows left when
`budget_s` has passed are skipped and say so. One JSON line per row as it completes, then the table (also --out).
"""

import gc
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import one_line  # noqa: E402

# Data-sheet memory bandwidth (bytes/s) and dense bf16 tensor throughput (FLOP/s), by device name.
SPECS = [("H200", 4.8e12, 989e12), ("H100 NVL", 3.9e12, 835e12), ("H100 PCIe", 2.0e12, 756e12),
         ("H100", 3.35e12, 989e12), ("A100-SXM4-80GB", 2.039e12, 312e12), ("A100 80GB PCIe", 1.935e12, 312e12),
         ("A100", 1.555e12, 312e12), ("RTX 4090", 1.008e12, 165e12), ("L40S", 0.864e12, 362e12)]
ROWS = ("bf16", "eager", "nf4", "nf4-bnb", "nf4+lora", "nf4+lora-bnb", "hf")


def spec_of(name: str):
    return next(((bw, flops) for key, bw, flops in SPECS if key in name), (None, None))


def copy_bandwidth(device) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (it reads and writes every byte)."""
    import torch

    from benchmarks.gpu_bandwidth import timed

    src = torch.empty(2**30, dtype=torch.uint16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), reps=10)


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter (4-bit ones with their scales, LoRA's fp32 matrices), except the
    embedding table, of which each token reads one row."""
    seen, total = set(), 0
    tensors = list(model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            nested = getattr(state, "state2", None)
            tensors += [t for t in (state.absmax, getattr(nested, "absmax", None)) if t is not None]
    for t in tensors:
        if t.data_ptr() not in seen and (t is not model.wte.weight or model.config.tie_embeddings):
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())


def kv_bytes_per_position(config, itemsize: int = 2) -> int:
    return 2 * config.n_layer * config.n_query_groups * config.head_size * itemsize


def flops_per_token(config, context: int) -> float:
    """Linear layers (2 x non-embedding parameters) + causal attention at the mean key count."""
    c = config
    attn = (c.n_head + 2 * c.n_query_groups) * c.head_size * c.n_embd + c.n_head * c.head_size * c.n_embd
    mlp = (3 if c.gated_mlp else 2) * c.n_embd * c.intermediate_size
    linear = c.n_layer * (attn + mlp) + c.n_embd * c.vocab_size
    return 2 * linear + 4 * c.n_layer * c.n_head * c.head_size * context / 2


class Table:
    def __init__(self, bandwidth, measured_bandwidth, peak_flops) -> None:
        self.rows: List[dict] = []
        self.bandwidth, self.measured, self.peak_flops = bandwidth, measured_bandwidth, peak_flops

    def add(self, **row) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def bound(self, weights: int, kv_per_row: float, streams: int, tokens_per_s: float) -> dict:
        """Fractions of the bandwidth bound for `streams` rows each reading `kv_per_row` bytes of keys/values."""
        step_bytes = weights + streams * kv_per_row
        out = {}
        for key, bw in (("of_spec_bound", self.bandwidth), ("of_measured_bound", self.measured)):
            if bw:
                out[key] = round(tokens_per_s / (streams * bw / step_bytes), 3)
        return out

    def markdown(self, header: str) -> str:
        lines = [header, "", "| system | precision | streams | tokens/s | % of bound (data sheet) "
                 "| % of bound (measured) | peak GiB | same as alone | ready s | decode path |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        pct = lambda r, k: f"{100 * r[k]:.0f}%" if r.get(k) is not None else ""  # noqa: E731
        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['system']} | {r.get('precision', '')} | {r.get('streams', '')} | "
                             f"{r['error']} | | | | | | |")
                continue
            spread = r.get("tokens_per_s_range")
            rate = f"{r['tokens_per_s']:.1f}" + (f" (median of {r['repeats']}: {spread[0]:.0f}-{spread[1]:.0f})"
                                                 if spread and r.get("repeats", 1) > 1 else "")
            lines.append(f"| {r['system']} | {r['precision']} | {r['streams']} | {rate} | "
                         f"{pct(r, 'of_spec_bound')} | {pct(r, 'of_measured_bound')} | {r.get('peak_gib', '')} | "
                         f"{r.get('same_as_alone', '')} | {r.get('ready_s', '')} | {r.get('decode', '')} |")
        return "\n".join(lines) + "\n"


def main(
    model: str = "Mistral-7B-v0.1",
    n_layer: Optional[int] = None,
    rows: str = "bf16,eager,nf4,nf4+lora,hf",
    streams: int = 30,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    scoring_tokens: int = 512,
    alone: int = 30,
    alone_quantized: int = 10,
    alone_eager: int = 2,
    quantize: str = "bnb.nf4",
    max_seq_length: int = 2048,
    key_block: int = 256,
    repeats: int = 5,
    device: str = "cuda",
    budget_s: float = 420.0,
    out: str = "out/serve_table.md",
    trace: bool = False,
) -> List[dict]:
    """Print the serving table (see the module docstring).

    Args:
        model: a registered config (python -c 'import model; print(model.known_names())').
        n_layer: fewer layers (quick checks; the bounds are about the full model).
        rows: which of bf16, eager, nf4, nf4-bnb, nf4+lora, nf4+lora-bnb, hf to run, comma-separated; they run
            in this order (nf4 rows decode as the server does, through its --fused_4bit kernel where it runs;
            -bnb: with bitsandbytes' products, the server's --fused_4bit false).
        streams: concurrent requests (HELM sends up to 30).
        prompt_tokens: generation prompt length.
        new_tokens: tokens per generation (random weights and no EOS: every request runs to the limit).
        scoring_tokens: scoring prompt length.
        alone: requests run one at a time in bf16 (1-stream speed and the outputs the 30-stream run must match).
        alone_quantized: the same for the 4-bit rows (slower; fewer).
        alone_eager: the same for the eager row (much slower).
        quantize: the 4-bit mode of the nf4 rows.
        max_seq_length: the engine's context (sizes its key/value cache, as the server's flag does).
        repeats: the all-at-once run is repeated this many times (it lasts about a second); the median counts.
        key_block: the fast decode step reads keys in multiples of this many positions (the server's flag).
        device: cuda (cpu runs the same code on a small model, for the tests).
        budget_s: rows that would start after this many seconds are skipped (a GPU call of the project is limited
            to 10 minutes; transformers' rows, last, compile for a few minutes).
        out: Markdown table destination.
        trace: after each row's timed runs, one more all-at-once run with each prefill timed, one under
            torch.profiler (where its wall time went: kernel time on the GPU, the engine's steps and prefills, the host
            functions and the kernels that took longest) and one with only its prefills under it (their kernels),
            printed as one JSON line.
    """
    import torch

    from benchmarks.benchmark_server import build_random_model, random_checkpoint
    from generate.engine import Engine
    from tokenizer import Tokenizer

    started = time.perf_counter()
    wanted = [r.strip() for r in rows.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    wanted = [r for r in ROWS if r in wanted]  # in ROWS' order: the +lora rows add the adapter to the 4-bit copy
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    bandwidth, peak_flops = spec_of(name) if cuda else (None, None)
    measured = copy_bandwidth(device) if cuda else None
    table = Table(bandwidth, measured, peak_flops)
    dtype = torch.bfloat16 if cuda else torch.float32
    precision = "bf16" if cuda else "fp32"
    folder = random_checkpoint(model, Path(tempfile.mkdtemp()) / "random", n_layer)
    base = build_random_model(folder, device, dtype)
    tokenizer = Tokenizer(folder)
    config = base.config
    rng = random.Random(0)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(prompt_tokens)] for _ in range(streams)]
    scoring_prompts = [[rng.randrange(config.vocab_size) for _ in range(scoring_tokens)] for _ in range(streams)]
    kv_per_row = kv_bytes_per_position(config, 2 if cuda else 4) * (prompt_tokens + (new_tokens - 1) / 2)
    print(f"{model} ({config.n_layer} layers, random weights) on {name}; data-sheet bandwidth "
          f"{bandwidth and bandwidth / 1e12} TB/s, measured copy {measured and round(measured / 1e12, 2)} TB/s, "
          f"dense bf16 {peak_flops and peak_flops / 1e12} TFLOP/s", flush=True)
    alone_ids: Dict[int, List[int]] = {}  # oneday bf16's tokens for each prompt run alone (the transformers check)

    def peak_gib(model_, held_before: int) -> Optional[float]:
        if not cuda:
            return None
        others = held_before - model_bytes(model_)  # what other rows' models hold
        return round((torch.cuda.max_memory_allocated() - others) / 2**30, 1)

    def engine_rows(label: str, model_, decode: str, n_alone: int, score: bool, fused_4bit: bool = False) -> None:
        prec = quantize.removeprefix("bnb.") if "nf4" in label or "fp4" in label else precision
        held = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine = Engine(model_, tokenizer, max_seq_length=max_seq_length, max_batch_size=32, decode=decode,
                        key_block=key_block, fused_4bit=fused_4bit)
        engine.warm_up(max_keys=prompt_tokens + new_tokens)
        engine.start()
        try:
            run_requests(engine, [prompts[0][:16]], 4)  # the prefill and scoring kernels
            ready = round(time.perf_counter() - t0, 1)
            alone_results, alone_s = [], 0.0
            for p in prompts[:n_alone]:
                t = time.perf_counter()
                alone_results += run_requests(engine, [p], new_tokens)
                alone_s += time.perf_counter() - t
            runs = []  # (seconds, results): the 30 requests at once, `repeats` times; the median run counts
            for _ in range(repeats):
                t = time.perf_counter()
                results = run_requests(engine, prompts, new_tokens)
                runs.append((time.perf_counter() - t, results))
            runs.sort(key=lambda r: r[0])
            if trace:
                trace_run(engine, prompts, new_tokens, label)
            together_s, together = runs[len(runs) // 2]
            weights = weight_bytes(model_)
            n1 = sum(len(r.new_ids) for r in alone_results)
            row = dict(system=f"oneday {label}", precision=prec, streams=1, tokens_per_s=round(n1 / alone_s, 1),
                       **table.bound(weights, kv_per_row, 1, n1 / alone_s), ready_s=ready,
                       decode=engine.decode_mode, requests=n_alone)
            n30 = sum(len(r.new_ids) for r in together)
            differ, gap = compare(alone_results, together)
            row30 = dict(system=f"oneday {label}", precision=prec, streams=streams,
                         tokens_per_s=round(n30 / together_s, 1),
                         **table.bound(weights, kv_per_row, streams, n30 / together_s),
                         same_as_alone=f"{n_alone - differ}/{n_alone}" + (f" (gap {gap:.3f})" if differ else ""),
                         ready_s=ready, decode=engine.decode_mode, requests=streams, repeats=repeats,
                         tokens_per_s_range=[round(n30 / runs[-1][0], 1), round(n30 / runs[0][0], 1)])
            if label == precision:
                alone_ids.update({i: r.new_ids for i, r in enumerate(alone_results)})
            elif decode == "eager" and alone_ids:  # the plain step against the fast one, request by request
                same = sum(r.new_ids == alone_ids.get(i) for i, r in enumerate(alone_results))
                row["same_as_alone"] = f"{same}/{len(alone_results)} as the fast step"
            score_row = None
            if score:
                run_requests(engine, scoring_prompts[:2], 1)
                t = time.perf_counter()
                run_requests(engine, scoring_prompts, 1)
                rate = streams * scoring_tokens / (time.perf_counter() - t)
                bound = peak_flops / flops_per_token(config, scoring_tokens) if peak_flops else None
                score_row = dict(system=f"oneday {label} scoring (prefill tokens/s)", precision=prec,
                                 streams=streams, tokens_per_s=round(rate, 1),
                                 of_spec_bound=round(rate / bound, 3) if bound else None,
                                 decode="prefill; % of the compute bound")
            peak = peak_gib(model_, held)
            for r in (row, row30, score_row):
                if r is not None:
                    table.add(**r, **({"peak_gib": peak} if peak else {}))
        finally:
            engine.stop()
            del engine
            release(cuda)

    def hf_rows() -> None:
        hf = transformers_model(base, device)
        held = torch.cuda.memory_allocated() if cuda else 0
        weights = weight_bytes(base)
        for batch in (1, streams):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ids = torch.tensor(prompts[:batch], device=device)
            t0 = time.perf_counter()
            hf_generate(hf, ids, new_tokens)  # compiles the decoding forward for this shape
            ready = round(time.perf_counter() - t0, 1)
            t = time.perf_counter()
            new = hf_generate(hf, ids, new_tokens).tolist()  # on the host: the timing includes the last step
            rate = batch * new_tokens / (time.perf_counter() - t)
            same = sum(new[i] == alone_ids[i] for i in range(batch) if i in alone_ids)
            checked = sum(i in alone_ids for i in range(batch))
            peak = peak_gib(base, held)
            table.add(system="transformers static cache + compile", precision=precision, streams=batch,
                      tokens_per_s=round(rate, 1), **table.bound(weights, kv_per_row, batch, rate),
                      **({"peak_gib": peak} if peak else {}),
                      same_as_alone=f"{same}/{checked} as oneday" if checked else "", ready_s=ready,
                      decode="generate(cache_implementation='static')")
        del hf
        release(cuda)

    quantized, adapted = None, False
    for which in wanted:
        if time.perf_counter() - started > budget_s:
            table.add(system=which, error=f"skipped: the {budget_s:.0f} s budget had passed")
            continue
        try:
            if which == "bf16":
                engine_rows(precision, base, "compiled" if cuda else "static", alone, score=True)
            elif which == "eager":
                engine_rows("eager (reference step)", base, "eager", alone_eager, score=False)
            elif which == "hf":
                hf_rows()
            elif which.startswith("nf4"):
                if quantized is None:
                    quantized = quantized_copy(base, quantize, device, dtype)
                if "+lora" in which and not adapted:
                    add_random_adapter(quantized)
                    adapted = True
                engine_rows(f"{which.replace('nf4', quantize.removeprefix('bnb.'))}", quantized,
                            "compiled" if cuda else "static", alone_quantized, score=which in ("nf4", "nf4+lora"),
                            fused_4bit=not which.endswith("-bnb"))
        except Exception as e:  # one row's failure is that row's result
            traceback.print_exc()
            table.add(system=which, error=one_line(e)[:300])
            release(cuda)
    header = (f"Serving speed: {model} ({config.n_layer} layers, random weights) on {name}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}. Generation: {prompt_tokens}-token prompts, {new_tokens} new tokens, "
              f"greedy; 1 stream = requests one at a time, {streams} streams = all at once. Bound: data-sheet "
              f"bandwidth {bandwidth and bandwidth / 1e12} TB/s, measured copy bandwidth "
              f"{measured and round(measured / 1e12, 2)} TB/s; scoring against {peak_flops and peak_flops / 1e12} "
              f"TFLOP/s dense bf16. Total {time.perf_counter() - started:.0f} s.")
    text = table.markdown(header)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(text)
    return table.rows


def trace_run(engine, prompts: List[List[int]], new_tokens: int, label: str) -> None:
    """All-at-once runs that say where the time goes. First one with each prefill timed (it ends in a device-to-host
    copy of its tokens, so its wall time is its GPU time): rows and ms of each. Then one under torch.profiler: its wall
    time against the kernel time it launched (a decode step whose host work outlasts the GPU's leaves the GPU idle),
    per decode step, the host functions and the kernels that took longest (prefill's and decode's together). Last, one
    whose prefills alone run under the profiler: their kernels that took longest."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (
        torch.cuda.is_available())
    admit, prefill_ms, prefill_events, profiled_rows = engine._admit, [], [], []

    def timed_admit(requests):
        t = time.perf_counter()
        admit(requests)
        prefill_ms.append([len(requests), round((time.perf_counter() - t) * 1e3, 1)])

    def profiled_admit(requests):  # the GPU's kernels are recorded process-wide, whichever thread profiles
        with torch.profiler.profile(activities=activities) as prof:
            admit(requests)
        prefill_events.extend(prof.key_averages())
        profiled_rows.append(len(requests))

    def run(admit_as=None) -> float:
        if admit_as is not None:
            engine._admit = admit_as  # the engine's thread looks the method up at each call
        try:
            t = time.perf_counter()
            run_requests(engine, prompts, new_tokens)
            return time.perf_counter() - t
        finally:
            engine.__dict__.pop("_admit", None)

    timed_wall = run(timed_admit)
    before = dict(engine.stats)
    with torch.profiler.profile(activities=activities) as prof:
        wall = run()
    steps = {k: engine.stats[k] - before.get(k, 0) for k in engine.stats}
    run(profiled_admit)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:12]

    def kernels(events_, top: int = 15):
        totals = {}  # name -> [ms, launches], over one profile or several (one per prefill)
        for e in events_:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                total = totals.setdefault(e.key, [0.0, 0])
                total[0] += e.self_device_time_total / 1e3
                total[1] += e.count
        ranked = sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
        return [[name[:60], round(ms, 1), count] for name, (ms, count) in ranked]

    print(json.dumps({"trace": label, "timed_wall_ms": round(timed_wall * 1e3, 1), "prefill_ms": prefill_ms,
                      "wall_ms": round(wall * 1e3, 1), "gpu_kernel_ms": round(kernel_us / 1e3, 1),
                      "gpu_busy": round(kernel_us / 1e6 / wall, 3), **steps,
                      "wall_ms_per_step": round(wall * 1e3 / max(1, steps.get("decode_steps", 0)), 2),
                      "host_self_ms": [[e.key[:60], round(e.self_cpu_time_total / 1e3, 1), e.count] for e in host],
                      "kernel_ms": kernels(events), "prefill_kernel_ms": kernels(prefill_events),
                      "profiled_prefill_rows": profiled_rows}),
          flush=True)


def run_requests(engine, prompts: List[List[int]], new_tokens: int) -> list:
    """Greedy requests submitted at once; their Results in order."""
    from generate.engine import Request

    futures = [engine.submit(Request(prompt_ids=list(p), max_new_tokens=new_tokens, temperature=0.0, top_logprobs=2))
               for p in prompts]
    return [f.result() for f in futures]


def compare(alone: list, together: list):
    """How many of the alone results the batched ones differ from, and the widest best-vs-second log-probability gap
    (in the alone run) at a first difference."""
    differ, gap = 0, 0.0
    for a, b in zip(alone, together):
        if a.new_ids != b.new_ids:
            differ += 1
            j = next((i for i, (x, y) in enumerate(zip(a.new_ids, b.new_ids)) if x != y), None)
            if j is not None:
                top = sorted(a.new_scores[j][1].values(), reverse=True)
                gap = max(gap, top[0] - top[1] if len(top) > 1 else float("inf"))
    return differ, gap


def release(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled code of the previous model would only fill the recompile limits


def quantized_copy(model, mode: str, device, dtype):
    """The same random weights as a 4-bit model (quantize.py, as utils.load_model does for a checkpoint); tensors that
    stay in full precision (embedding, norms, head) are shared, not copied."""
    from quantize import empty_quantized_model, quantize_model

    q = empty_quantized_model(model.config, mode, dtype)
    tied = model.config.tie_embeddings  # the head is the embedding: one tensor to quantize-load, not two
    tensors = [(n, t) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]
    return quantize_model(q, tensors, mode, device, dtype, source="random model").eval()


def add_random_adapter(model, r: int = 16) -> None:
    """LoRA on every block linear (q, k, v, o, gate, up, down), unmerged over the 4-bit base as the server keeps it;
    random B so that the adapter changes the outputs."""
    import torch

    from lora import LoRAConfig, freeze_lora, inject_lora, lora_modules

    inject_lora(model, LoRAConfig(r=r, alpha=2 * r)).eval()
    gen = torch.Generator(model.wte.weight.device).manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.01, generator=gen)
    freeze_lora(model, model.wte.weight.dtype)  # as the server does


def transformers_model(model, device):
    """MistralForCausalLM (or LlamaForCausalLM) holding our model's tensors (q/k/v are views of our fused qkv rows)."""
    import torch
    import transformers

    from scripts.hf_names import guess_family, hf_config_from_lit, lit_to_hf

    family = guess_family(model.config)
    hf_config = hf_config_from_lit(model.config, family, "bfloat16")
    cls = getattr(transformers, hf_config["architectures"][0])
    config = cls.config_class.from_dict(hf_config)
    with torch.device("meta"):
        hf = cls(config)
    state = {}
    for name, tensor in model.state_dict().items():
        state.update(lit_to_hf(family, model.config, name, tensor))
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    hf.load_state_dict(state, strict=not model.config.tie_embeddings, assign=True)
    if model.config.tie_embeddings:
        hf.tie_weights()
    # The RoPE frequencies are a buffer built at construction (on meta here): build them on the device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config).to(device)
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers model: tensors left on the meta device: {meta[:3]}")
    return hf.eval()


def hf_generate(hf, ids, new_tokens: int):
    """Greedy, exactly new_tokens tokens, static cache: transformers compiles the decoding forward. No EOS, as the
    engine has none with the stand-in tokenizer (a minimum length would mask the EOS logit and change the argmax)."""
    import torch

    hf.generation_config.eos_token_id = None
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      do_sample=False, cache_implementation="static", pad_token_id=0)
    return out[:, ids.size(1):]


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
