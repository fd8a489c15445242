"""Tokens/s and peak memory of one QLoRA training step (forward, backward, AdamW) for any registered model config,
with random weights built directly on the GPU (no checkpoint on disk). Uses finetune/lora.py's own step code.

    python benchmarks/benchmark_finetune.py --model Mistral-7B-v0.1 --seq 2048 --configs 1x0,1xp20,4x1

Each configuration MBxC is micro-batch MB with activation checkpointing C: 1 (every block), 0 (none) or pN (the
first N blocks), optionally +fp8 (FP8 base matmuls) or +fp8grad (FP8 input-gradient matmuls only), +keep
(--recompute_inputs false) and +unfusedmlp (the gated MLP as three LoRA matmuls, not fast.fused.lora_gated_mlp); one
JSON line each: tokens_per_s (median over --steps after --warmup steps, timed with CUDA events) and peak_mem_gib
(torch.cuda.max_memory_allocated, weights included), like the peer scripts in ../shared/anchors.
`--table results.jsonl` prints a Markdown table of such lines (ours and the peers').
"""

import gc
import json
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fast  # noqa: E402
from fast.memory import GraphedMicroStep, enable_activation_checkpointing  # noqa: E402
from finetune.lora import make_optimizer, training_loss  # noqa: E402
from lora import LoRAConfig, inject_lora  # noqa: E402
from model import Config  # noqa: E402


def random_tensors(model, device, dtype, std: float = 0.02):
    """(name, tensor) for every parameter of a meta model, made one at a time on the device."""
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # (out, in) before quantization
    for name, shape in shapes:
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        if "norm" in name or name.startswith("ln_f"):
            yield name, torch.ones(shape, device=device, dtype=dtype) if name.endswith("weight") else \
                torch.zeros(shape, device=device, dtype=dtype)
        else:
            yield name, torch.randn(shape, device=device, dtype=dtype) * std


def build(config: Config, quantize: Optional[str], lora: LoRAConfig, device: str, dtype: torch.dtype):
    if quantize:
        from quantize import empty_quantized_model, quantize_model

        model = empty_quantized_model(config, quantize, dtype)
        quantize_model(model, random_tensors(model, device, dtype), quantize, device, dtype, source="random weights")
    else:
        from model import GPT

        with torch.device(device):
            model = GPT(config).to(dtype)
    inject_lora(model, lora)
    return model.train()


def parse_checkpointing(spec: str) -> Tuple[Optional[int], bool]:
    """spec 1 / 0 / pN -> checkpointing on every block (None) / none (0) / the first N blocks (N), and a trailing o
    (1o, p20o) for offloaded checkpoints (finetune/lora.py --offload_checkpoints): (blocks, offload)."""
    offload = spec.endswith("o")
    spec = spec[:-1] if offload else spec
    if spec in ("1", "0"):
        return (None if spec == "1" else 0), offload
    if not spec.startswith("p") or not spec[1:].isdigit():
        raise ValueError(f"checkpointing {spec!r}: use 1, 0 or pN (the first N blocks), then o to offload")
    return int(spec[1:]), offload


def set_checkpointing(model, spec: str) -> None:
    """Checkpointing as `spec` says (see parse_checkpointing), from the plain blocks up."""
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # back to the plain Block.forward
    n, offload = parse_checkpointing(spec)
    if n != 0:
        enable_activation_checkpointing(model, n, preserve_rng_state=False, offload=offload)


def ckpt_label(spec: str):
    """The table's checkpointing column: true, false, "first N blocks", "offloaded", "first N blocks, offloaded"."""
    n, offload = parse_checkpointing(spec)
    label = True if n is None else (f"first {n} blocks" if n else False)
    if offload:
        return "offloaded" if label is True else f"{label}, offloaded"
    return label


def bench(model, seq: int, mb: int, ckpt: str, steps: int, warmup: int, device: str,
          profile: bool = False, cuda_graph: bool = False, docs_per_row: int = 1) -> dict:
    set_checkpointing(model, ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", params, 1e-4, 0.0, device)
    g = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (mb, seq + 1), device=device, generator=g)
    batch = {"idx": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    if docs_per_row > 1:  # packed rows as finetune/lora.py makes them: documents of random lengths, a document mask
        cuts = torch.randperm(seq - 1, generator=torch.Generator().manual_seed(0))[:docs_per_row - 1] + 1
        segments = torch.zeros(seq, dtype=torch.long)
        for c in cuts.tolist():
            segments[c:] += 1
        batch["segments"] = segments.expand(mb, seq).contiguous().to(device)
    n = batch["targets"].numel()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graphed = GraphedMicroStep(model, params, batch, loss_fn=training_loss) if cuda_graph else None

    def step():
        if graphed is not None:
            loss_sum = graphed(batch)
            torch._foreach_mul_([p.grad for p in params], 1.0 / n)
        else:
            loss_sum, _ = training_loss(model, batch)
            (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphed is None)
        return loss_sum

    times, loss = [], None
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss_sum = step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
        loss = loss_sum.item() / n
    median = sorted(times[warmup:])[len(times[warmup:]) // 2]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        print(table, file=sys.stderr, flush=True)
        if graphed is None:  # eager: which operators (and shapes) launched the kernels
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=70)
            print(table, file=sys.stderr, flush=True)
    del optimizer, graphed
    return {"step_s_median": round(median, 4), "tokens_per_s": round(mb * seq / median, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": round(loss, 4)}


def print_table(path: Path) -> None:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "tokens_per_s" not in r:
            continue
        ckpt = r.get("grad_ckpt", r.get("ckpt", "?"))
        ckpt = {True: "on", False: "off", 1: "on", 0: "off"}.get(ckpt, ckpt)
        rows.append((r.get("system", "?"), r.get("model", r.get("arch", "?")), f"{r.get('mb', '?')} x {r.get('seq', '?')}",
                     str(ckpt), f"{r['tokens_per_s']:,.0f}", f"{r['peak_mem_gib']:.1f}"))
    print("| system | model | micro-batch x seq | activation checkpointing | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(
    model: str = "Mistral-7B-v0.1",
    seq: int = 2048,
    configs: str = "1x1,1x0,4x1",
    quantize: Optional[str] = "bnb.nf4-dq",
    lora_r: int = 16,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: str = "all",
    steps: int = 8,
    warmup: int = 3,
    fused: bool = True,
    cuda_graph: bool = False,
    docs_per_row: int = 1,
    compile: bool = False,
    profile: bool = False,
    table: Optional[Path] = None,
) -> None:
    """Benchmark QLoRA training steps.

    Args:
        model: a registered config name (python -c 'import model; print(model.known_names())').
        seq: sequence length.
        configs: comma list of MBxC: micro-batch MB, activation checkpointing C (1, 0 or pN: the first N blocks;
            a trailing o offloads the checkpoints: 1o, p20o); +fp8 after one runs it with FP8 base matmuls
            (finetune/lora.py --speed.fp8 all), +fp8grad with FP8 input-gradient matmuls only (--speed.fp8 grad);
            +keep keeps the norm outputs and SwiGLU products for the backward pass (--speed.recompute_inputs false):
            1x0+fp8+keep;
            +unfusedmlp runs the gated MLP as three fused LoRA matmuls instead of fast.fused.lora_gated_mlp (the
            previous path, for comparison).
        quantize: base weights (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.int8) or null for bf16.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout (0, as Unsloth's anchor, takes the fused LoRA matmul).
        lora_targets: LoRA targets (all = every linear of the blocks, as the peers).
        steps: timed steps (the median is reported).
        warmup: untimed steps first.
        fused: the fast path (fast.speed_up: fused LoRA matmuls, compiled RMSNorm/RoPE/SwiGLU, Triton kernels), as
            finetune/lora.py --fused; false runs the plain model.
        cuda_graph: capture forward+backward as a CUDA graph, as finetune/lora.py --cuda_graph.
        docs_per_row: above 1, each row packs this many documents with a document mask (the trainer's packed rows;
            attention then takes SDPA's masked path instead of causal flash).
        compile: torch.compile each block.
        profile: after timing each configuration, profile one more step and print its CUDA kernels by total time;
            without --cuda_graph also the operators that launched them, by input shapes.
        table: instead of benchmarking, print a Markdown table of the JSON lines in this file.
    """
    if table is not None:
        return print_table(table)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU (it times CUDA events and reports CUDA peak memory)")
    torch.backends.cuda.matmul.allow_tf32 = True
    config = Config.from_name(model)
    lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    t0 = time.perf_counter()
    net = build(config, quantize, lora, "cuda", torch.bfloat16)
    if fused:  # each configuration below sets its own fp8 / keep / unfusedmlp settings
        fast.speed_up(net)
    if compile:
        for block in net.blocks:
            block.compile()
    print(json.dumps({"built": config.name, "quantize": quantize, "s": round(time.perf_counter() - t0, 1),
                      "mem_after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                      "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    for i, spec in enumerate(configs.split(",")):
        if i:  # each configuration compiles afresh, as its own trainer process would: without this, one that follows
            # others of another shape runs slower and with more peak memory (the compiled kernels recompile for
            # dynamic shapes), and the table would rank configurations by their order
            torch._dynamo.reset()
            gc.collect()
        spec, *extras = spec.lower().split("+")
        if (not set(extras) <= {"fp8", "fp8grad", "keep", "unfusedmlp"} or {"fp8", "fp8grad"} <= set(extras)
                or (extras and not fused)):
            raise ValueError(f"config {'+'.join([spec, *extras])}: the suffixes are +fp8 or +fp8grad, +keep and "
                             "+unfusedmlp, and they need --fused true")
        if fused:
            fast.speed_up(net, fp8="all" if "fp8" in extras else "grad" if "fp8grad" in extras else None,
                          recompute_inputs="keep" not in extras, fused_mlp="unfusedmlp" not in extras)
        mb, ckpt = spec.split("x")
        mb = int(mb)
        tags = [t for t, on in (("fused", fused), ("graph", cuda_graph), ("compiled", compile)) if on] + extras
        result = {"system": "oneday" + (f" ({'+'.join(tags)})" if tags else ""), "model": config.name, "seq": seq,
                  "mb": mb, "grad_ckpt": ckpt_label(ckpt),
                  "quantize": quantize, "lora_r": lora_r, "docs_per_row": docs_per_row}
        try:
            result.update(bench(net, seq, mb, ckpt, steps, warmup, "cuda", profile, cuda_graph, docs_per_row))
        except torch.cuda.OutOfMemoryError:
            result["error"] = "out of memory"
        for p in net.parameters():
            p.grad = None
        torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
