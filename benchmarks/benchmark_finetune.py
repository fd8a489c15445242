"""Tokens/s and peak memory of one QLoRA training step (forward, backward, AdamW) for any registered model config,
with random weights built directly on the GPU (no checkpoint on disk). Uses finetune/lora.py's own step code.

    python benchmarks/benchmark_finetune.py --model Mistral-7B-v0.1 --seq 2048 --configs 1x0,1xp20,4x1
    python benchmarks/benchmark_finetune.py --configs 1x0,1x0+fp8 --cuda_graph true --packed true --attention true

Each configuration MBxC is micro-batch MB with activation checkpointing C: 1 (every block), 0 (none) or pN (the
first N blocks), optionally +fp8 (FP8 base matmuls) or +fp8grad (FP8 input-gradient matmuls only), +keep
(--recompute_inputs false) and +unfusedmlp (the gated MLP as three LoRA matmuls, not fast.fused.lora_gated_mlp); one
JSON line each: tokens_per_s (median over --steps after --warmup steps, timed with CUDA events) and peak_mem_gib
(torch.cuda.max_memory_allocated, weights included), like the peer scripts in ../shared/anchors.
`--packed true` runs each configuration twice, on rows of random tokens and on packed rows (documents of
instruction-like lengths packed as the trainer packs them, with their document mask), and prints the ratio of their
tokens/s, counting real (not padding) tokens in both. `--attention true` first times packed rows' attention alone,
per kernel. `--table results.jsonl` prints a Markdown table of such lines (ours and the peers').
"""

import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fast  # noqa: E402
from cli import one_line  # noqa: E402
from data import IGNORE, pack  # noqa: E402
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


def random_rows(seq: int, n_rows: int, vocab: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """n_rows rows of seq random tokens, every position a target (the unpacked rows), on the CPU."""
    tokens = torch.randint(0, vocab, (n_rows, seq + 1), generator=torch.Generator().manual_seed(seed))
    return {"idx": tokens[:, :-1].clone(), "targets": tokens[:, 1:].clone()}  # clones: no view shares the other's memory


def packed_rows(seq: int, n_rows: int, vocab: int, seed: int = 0, median: int = 300) -> Dict[str, torch.Tensor]:
    """n_rows rows of seq tokens as finetune/lora.py packs a data set (data.pack, best fit) and data.collate pads them
    (segment ids, -1 and no target on padding), on the CPU. The documents' lengths are log-normal around `median`
    tokens with a long tail, cut to 16..seq, like an instruction mix; the rows are drawn at random from the packing
    of enough documents for 20 times as many rows, as a shuffled epoch would draw them. Every real token is a target
    (random tokens), as in random_rows."""
    g = torch.Generator().manual_seed(seed)
    n_docs = 20 * n_rows * seq // median
    lengths = (torch.randn(n_docs, generator=g) * 0.9 + math.log(median)).exp().clamp(16, seq).long().tolist()
    rows = pack(lengths, seq)
    segments = torch.full((n_rows, seq), -1)
    for r, i in enumerate(torch.randperm(len(rows), generator=g)[:n_rows].tolist()):
        doc_lengths = torch.tensor([lengths[j] for j in rows[i]])
        segments[r, :int(doc_lengths.sum())] = torch.repeat_interleave(torch.arange(len(doc_lengths)), doc_lengths)
    batch = random_rows(seq, n_rows, vocab, seed)
    batch["targets"][segments < 0] = IGNORE
    batch["segments"] = segments
    return batch


def bench(model, batches: List[Dict[str, torch.Tensor]], ckpt: str, steps: int, warmup: int, device: str,
          profile: bool = False, cuda_graph: bool = False) -> dict:
    """Times warmup + steps training steps, step i on batches[i % len(batches)]; tokens/s counts the targets (the
    real tokens: padding has none)."""
    set_checkpointing(model, ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", params, 1e-4, 0.0, device)
    counts = [int((b["targets"] != IGNORE).sum()) for b in batches]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    masks = []  # what the first attention layer was given: which attention packed rows took
    hook = next(m for m in model.modules() if hasattr(m, "attend")).register_forward_pre_hook(
        lambda module, args: masks.append(type(args[3]).__name__))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graphed = GraphedMicroStep(model, params, batches[0], loss_fn=training_loss) if cuda_graph else None

    def step(batch, n):
        if graphed is not None:
            loss_sum = graphed(batch)
            torch._foreach_mul_([p.grad for p in params], 1.0 / n)
        else:
            loss_sum, _ = training_loss(model, batch)
            (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphed is None)
        return loss_sum

    rates, loss = [], None
    for i in range(warmup + steps):
        batch, n = batches[i % len(batches)], counts[i % len(batches)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss_sum = step(batch, n)
        end.record()
        end.synchronize()
        hook.remove()
        rates.append((n / (start.elapsed_time(end) / 1000), start.elapsed_time(end) / 1000))
        loss = loss_sum.item() / n
    timed = sorted(rates[warmup:])
    tokens_per_s, step_s = timed[len(timed) // 2]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(batches[0], counts[0])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        print(table, file=sys.stderr, flush=True)
        if graphed is None:  # eager: which operators (and shapes) launched the kernels
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                step(batches[0], counts[0])
                torch.cuda.synchronize()
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=70)
            print(table, file=sys.stderr, flush=True)
    optimizer = graphed = None  # freed before the next configuration
    attention = {"BlockMask": "flex", "Tensor": "sdpa, dense mask", "NoneType": "sdpa, causal"}.get(masks[0], masks[0])
    return {"step_s_median": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
            "real_tokens_per_row": round(sum(counts) / sum(b["idx"].size(0) for b in batches), 1),
            "attention": attention, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss": round(loss, 4)}


def time_attention(config: Config, seq: int, mb: int, reps: int = 10) -> None:
    """Packed rows' attention alone, forward and backward, per kernel, at this model's head shapes in bf16 on rows
    from packed_rows; one JSON line each: ms_median and what each call keeps for its backward pass (kept_mib).
    Against SDPA's causal flash kernel on unpacked rows of the same shape (the target) and its masked kernel with the
    dense mask (model.py's path)."""
    from torch.nn.attention.flex_attention import flex_attention

    from fast.attention import document_block_mask
    from model import CausalSelfAttention, document_mask

    hs, n_head, n_kv, window = config.head_size, config.n_head, config.n_query_groups, config.sliding_window
    batch = packed_rows(seq, mb, config.vocab_size)
    segments = batch["segments"].cuda()
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(mb, h, seq, hs, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (n_head, n_kv, n_kv))
    with torch.device("meta"):
        reference = CausalSelfAttention(config)  # its attend() uses no weights
    flex = fast.fused.compiled(flex_attention)  # the trainer's compiled FlexAttention
    block_mask = document_block_mask(segments, window)
    kernels = {
        "sdpa causal, unpacked rows": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True),
        "sdpa, dense document mask (model.py)": lambda: reference.attend(q, k, v, document_mask(segments, window)),
        "flex, document BlockMask (fast/)": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
        "flex, BlockMask made in each call": lambda: flex(q, k, v, block_mask=document_block_mask(segments, window),
                                                          enable_gqa=True),
    }
    varlen = varlen_attention(q, k, v, segments, window)
    if varlen is not None:
        kernels["varlen flash (torch.nn.attention.varlen), tokens regrouped"] = varlen
    dy = torch.randn_like(q)
    for name, fn in kernels.items():
        row = {"attention_kernel": name, "model": config.name, "seq": seq, "mb": mb}
        try:
            times = []
            for i in range(reps + 3):
                q.grad = k.grad = v.grad = None
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                y = fn()
                kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
                y.backward(dy)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            row.update(ms_median=round(sorted(times[3:])[reps // 2], 3), kept_mib=round(kept / 2**20, 1))
        except Exception as e:  # one kernel that does not run here leaves the others' lines
            row["error"] = one_line(e)
        print(json.dumps(row), flush=True)


def document_offsets(segments: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The documents of packed rows (B, T) laid end to end, as varlen attention takes them: (int32 offsets of their
    starts and the end, the longest one's length). A row's padding counts as a document of its own."""
    B, T = segments.shape
    flat = (segments + (segments.max() + 2) * torch.arange(B, device=segments.device)[:, None]).view(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]  # also where a row ends: the ids above differ from row to row
    offsets = torch.cat([starts.nonzero().view(-1), torch.tensor([B * T], device=flat.device)]).int()
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def varlen_attention(q, k, v, segments, window):
    """torch.nn.attention.varlen's attention over the same documents (None where this torch has none): the rows'
    tokens regrouped into one (tokens, heads, hs) tensor with the documents' offsets, and K/V repeated per query head
    where varlen_attn has no enable_gqa. The regrouping copies are part of its cost."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    B, n_head, T, hs = q.shape
    offsets, longest = document_offsets(segments)
    params = inspect.signature(varlen_attn).parameters
    window = window if window is not None and window < T else None
    options = {"window_size": (window - 1 if window else -1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params
    if gqa:
        options["enable_gqa"] = True

    def tokens(x, repeat=1):
        x = x.transpose(1, 2).reshape(B * T, x.size(1), hs)
        return x.repeat_interleave(repeat, dim=1) if repeat > 1 else x

    def run():
        group = 1 if gqa else n_head // k.size(1)
        y = varlen_attn(tokens(q), tokens(k, group), tokens(v, group), offsets, offsets, longest, longest, **options)
        return y.view(B, T, n_head, hs).transpose(1, 2)

    return run


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
    packed: bool = False,
    attention: bool = False,
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
        packed: each configuration runs on random rows, then on packed rows (packed_rows: documents of
            instruction-like lengths, a document mask; the trainer's --train.packing), with a line of their ratio.
        attention: first time packed rows' attention alone, per kernel (time_attention), on one row of --seq.
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
    if attention:
        time_attention(config, seq, 1)
        torch._dynamo.reset()  # the configurations compile afresh (see below)
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
        rows = {}
        # Random and packed rows have the same shapes, so the packed run reuses the compiled kernels of the random
        # one and adds only FlexAttention's
        for kind in ("random", "packed") if packed else ("random",):
            make = packed_rows if kind == "packed" else random_rows
            batches = [make(seq, mb, config.vocab_size, seed=i) for i in range(4 if kind == "packed" else 1)]
            kind_tags = tags + (["packed"] if kind == "packed" else [])
            result = {"system": "oneday" + (f" ({'+'.join(kind_tags)})" if kind_tags else ""), "model": config.name,
                      "seq": seq, "mb": mb, "grad_ckpt": ckpt_label(ckpt), "quantize": quantize, "lora_r": lora_r,
                      "rows": kind}
            try:
                result.update(bench(net, batches, ckpt, steps, warmup, "cuda", profile, cuda_graph))
            except torch.cuda.OutOfMemoryError:
                result["error"] = "out of memory"
            for p in net.parameters():
                p.grad = None
            torch.cuda.empty_cache()
            print(json.dumps(result), flush=True)
            rows[kind] = result
        if packed and all("tokens_per_s" in r for r in rows.values()):
            unpacked, packed_ = rows["random"], rows["packed"]
            ratio = round(packed_["tokens_per_s"] / unpacked["tokens_per_s"], 3)
            extra_gib = round(packed_["peak_mem_gib"] - unpacked["peak_mem_gib"], 2)
            print(json.dumps({"config": "+".join([spec, *extras]), "packed_vs_random_tokens_per_s": ratio,
                              "packed_minus_random_peak_gib": extra_gib}), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
