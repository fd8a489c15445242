"""generate/nf4_matmul.py's kernel (the server's --fused_4bit: NF4 decoded inside the tiles of the decode step's
matrix products) against what a 4-bit base runs otherwise (bitsandbytes: gemv_4bit for one row, dequantize + cuBLAS
for more) and against the same product on bf16 weights, at a model's shapes and a decode step's row counts, timed as
replays of a CUDA graph (as the server runs its step) over copies of the weight that together overflow the L2 cache.

    python benchmarks/gpu_nf4_gemm.py --model Mistral-7B-v0.1 --rows 1,8,32

Why: the serving table's NF4 rows reached 25% (1 stream) and 8% (30 streams) of the bandwidth bound of their 4-bit
bytes (docs/serving.md). A decode step reads each weight once; in 4 bits that is a quarter of bf16's bytes, so a kernel
that decodes in its tiles could beat bf16 rather than trail it. Per shape and row count: the kernel with its defaults
(its K parts summed in the kernel, as served), the best
of a sweep of tiles, K splits, warps, stages and lookups (PTX: byte permutes, for one row warp shuffles; or a gather,
for one row loads of the table; and the best with the scales
decoded to fp32 beforehand), its effective bandwidth (4-bit bytes and block scales read, output written), and
its error against x @ W^T with W dequantized by bitsandbytes (double-quantized scales, as QLoRA's bnb.nf4-dq) beside
the error of rounding that product to bf16; top3_configs: (BN, split_k, warps, stages, lookup), for one row
gemv_kernel's (BN, BK, split_k, warps, stages); for the tensor cores a sixth value where set is the register cap
(maxnreg).
Last, per row count, the sweep's fastest configurations for a whole block's products. Results:
docs/speed/h100_2026-12-06_nf4_kernel.md.

`--adapter_rank 16` adds to every product of several rows a random adapter of that rank per part, as a served LoRA
adapter on every linear layer has (q, k and v: three parts), in the server's layout (adapter_segments: where the parts
start on whole 128-column tiles, as Mistral's and Llama's do, each part's 16 ranks a segment of its own; else 48 ranks
padded to 64), inside the kernel; the defaults are then timed with and without it, and the sweep is with it (a BN
whose tiles would cross a part's start, 256 on parts off 256-column edges, prints an error line and is left out).
Each copy of the weight has an adapter of its own, as each layer of a served model has: one adapter shared by the
copies could stay in the L2 cache, which the server's adapters cannot (section 20 of the speed log: the served step's
kernel time grew with the adapter far more than these products did).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import one_line  # noqa: E402


def graph_ms(calls: list, iters: int) -> float:
    """Milliseconds per call, from replays of one CUDA graph of every callable in `calls` (each product of a decode step
    takes microseconds, less than launching it from Python; the server replays its step as a graph too)."""
    from benchmarks.profile_decode import replay_ms

    for fn in calls[:2]:  # compile, allocate
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return replay_ms(graph, iters) / len(calls)


def timed(calls: list, iters: int):
    try:
        return round(graph_ms(calls, iters), 4)
    except Exception as e:  # a path this GPU or library cannot capture or run: the others go on
        return f"failed: {one_line(e)[:160]}"


# (BN, split_k, num_warps, num_stages, lookup) around the defaults. The first sweeps (2026-12-06, H100) found the first
# design bound by its instructions, not by loads in flight (docs/speed/h100_2026-12-06_nf4_kernel.md; today's kernels
# wait on latency instead, per Nsight Compute's counters in docs/serving.md); the kernel since then
# decodes by byte permutes (one row: warp shuffles) and scales the product's sums; "gather" is its table read by
# tl.gather instead (one row: by loads).
# A sixth value caps the registers per thread (maxnreg). A cap of 168 (fewer instructions, the same occupancy) served no
# faster (docs/serving.md). 128 is expected to let a fourth program of 4 warps onto an SM at 32 rows, where the
# kernel's 137 registers allow 3 (Nsight Compute found it waiting on latency at that occupancy), if the driver then
# gives shared memory a larger share (4 x 45 KB; the counters show shared memory also allowing 3 at the carveout it
# chose); ptxas spills 13 loads or stores in the loop for it (nf4_kernel_sass.py --maxnreg 128, on a CPU). Untimed.
CONFIGS = [(BN, split, warps, 4, "ptx") for BN in (64, 128, 256) for split in (4, 8, 16) for warps in (4, 8)] + [
    (BN, split, 4, stages, "ptx") for BN in (128, 256) for split in (8, 16) for stages in (1, 2)] + [
    (128, 8, 4, 4, "gather"), (64, 4, 4, 4, "gather")] + [
    (BN, split, 4, stages, "ptx", 128) for BN in (64, 128) for split in (4, 8) for stages in (2, 4)]


# One row of bf16 runs gemv_kernel: (BN, BK, split_k, num_warps, num_stages) around its defaults (32, 256, K parts by
# nf4_matmul._one_row_parts, 2, 3); split_k None is that default. The first sweep (2026-12-06, H100) found 2 warps
# ahead of 4 and 8; the one of 2026-12-07 K in 4 parts ahead of 8 for qkv and fc and behind it for proj and down, and
# register caps of 64-96 (at 8 parts) never among the three fastest of any shape
# (docs/speed/h100_2026-12-06_nf4_kernel.md, section 17).
GEMV_CONFIGS = [(BN, BK, None, warps, stages) for BN in (16, 32, 64) for BK in (256, 512) for warps in (1, 2, 4)
                for stages in (2, 3)] + [(32, 256, split, 2, 3) for split in (2, 4, 8, 16)] + [(128, 256, 8, 4, 3)]


def random_adapter(name: str, n: int, k: int, rank: int, config):
    """A random adapter of `rank` per part over an (n, k) weight of `config`'s blocks, as a served LoRA adapter on every
    linear layer has (qkv: q, k and v, three parts), in the layout the server gives the kernel (adapter_segments): (A,
    B, lora_starts) in bf16 on the GPU, or None for rank 0."""
    from generate.nf4_matmul import adapter_segments
    from lora import place_B, qkv_parts

    if not rank:
        return None
    parts = qkv_parts(config, "qkv") if name == "qkv" else [(0, n)]
    B = torch.randn(sum(end - start for start, end in parts), rank, device="cuda", dtype=torch.bfloat16) * 0.02
    return adapter_segments(torch.randn(len(parts) * rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5,
                            place_B(B, parts, rank, n), parts, rank)


def tiles_of(config: tuple) -> dict:
    if not isinstance(config[4], str):  # gemv_kernel's
        return {**dict(zip(("BN", "BK", "split_k", "num_warps", "num_stages", "maxnreg"), config)), "lookup": True}
    tiles = dict(zip(("BN", "split_k", "num_warps", "num_stages", "lookup", "maxnreg"), config))
    return {**tiles, "lookup": tiles["lookup"] == "ptx"}


def main(model: str = "Mistral-7B-v0.1", rows: str = "1,8,32", iters: int = 20, adapter_rank: int = 0,
         sweep: bool = True) -> None:
    """Args:
        model: a registered config: its block's linear shapes are timed.
        rows: decode rows (the bucket's batch), comma-separated.
        iters: timed repetitions (median).
        adapter_rank: a random adapter of this rank per part in every product of several rows (0: none).
        sweep: also time the configurations around the defaults (CONFIGS, GEMV_CONFIGS); else the defaults alone.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    from benchmarks.gpu_fp8_kernels import block_linears
    from generate.nf4_matmul import kernel_table, nf4_matmul, scales_of, segments_delta
    from model import Config

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_nf4_gemm.py needs a CUDA GPU")
    row_counts = [int(r) for r in rows.split(",")]
    step = {m: {} for m in row_counts}  # rows -> config -> one block's products, ms
    failed = {m: set() for m in row_counts}  # configs that failed for some shape: no whole block to rank them by
    blocks = Config.from_name(model)  # not `config`: the sweep's loop below names its tiles so
    for name, ((n, k), count) in block_linears(blocks).items():
        # Copies enough that the 4-bit ones (and the bf16 ones) do not fit the GPU's L2 cache together: each call of a
        # graph reads its weight from memory, as a decode step does.
        copies = max(2, min(16, -(-(256 << 20) // (n * k // 2))))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quantized = [BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in weights]
        args = [(packed, state.code, *scales_of(state)) for packed, state in quantized]
        reference_w = BF.dequantize_4bit(*quantized[0])
        table = torch.tensor(kernel_table(tuple(quantized[0][1].code.tolist())), dtype=torch.int32, device="cuda")
        tickets = torch.zeros(-(-n // 16), dtype=torch.int32, device="cuda")  # left at zero by every call
        flat = [BF.dequantize_blockwise(state.absmax, state.state2) + state.offset for _, state in quantized]
        scales = args[0][2]
        read = n * k // 2 + scales.numel() * scales.element_size()
        adapters = [random_adapter(name, n, k, adapter_rank, blocks) for _ in range(copies)]  # one per copy
        for m in row_counts:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with_lora = adapter_rank > 0 and m > 1
            reference = x.float() @ reference_w.float().t()
            if with_lora:
                a, b, starts = adapters[0]
                reference = reference + 0.5 * segments_delta(x.float(), a.float(), b.float(), starts)

            def lora_of(adapter, on: bool = True) -> dict:  # nf4_matmul's adapter arguments, or none
                return {"lora": (adapter[0], adapter[1], 0.5), "lora_starts": adapter[2]} if on and with_lora else {}

            def fused(with_adapter: bool = True, **tiles):
                return [lambda p=p, c=c, s=s, ns=ns, ad=ad: nf4_matmul(x, p, s, c, (n, k), ns, table=table,
                                                                       tickets=tickets, **lora_of(ad, with_adapter),
                                                                       **tiles)
                        for (p, c, s, ns), ad in zip(args, adapters)]

            timings = {
                "bf16 weights (cuBLAS)": timed([lambda w=w: x @ w.t() for w in weights], iters),
                "bitsandbytes matmul_4bit": timed([lambda q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])
                                                   for q in quantized], iters),
                "dequantize + cuBLAS": timed([lambda q=q: x @ BF.dequantize_4bit(*q).t() for q in quantized], iters),
                "fused nf4 (defaults, as served)": timed(fused(lookup=True), iters)}
            if with_lora:
                timings["fused nf4 (defaults, no adapter)"] = timed(fused(False, lookup=True), iters)
            swept = {}
            for config in (GEMV_CONFIGS if m == 1 else CONFIGS) if sweep else ():
                ms = timed(fused(**tiles_of(config)), iters)
                if isinstance(ms, str):
                    print(json.dumps({"shape": name, "rows": m, "config": config, "error": ms}))
                    failed[m].add(config)
                    continue
                swept[config] = ms
                step[m][config] = step[m].get(config, 0.0) + count * ms
            y = fused(lookup=True)[0]()
            row = {"shape": name, "out_in": [n, k], "rows": m, "weight_copies": copies, **timings,
                   "fused_rel_error": round(((y.float() - reference).norm() / reference.norm()).item(), 6),
                   "bf16_output_rounding": round(((reference.bfloat16().float() - reference).norm()
                                                  / reference.norm()).item(), 6)}
            if swept:
                top = sorted(swept, key=swept.get)[:3]
                tiles = tiles_of(top[0])
                row.update({"fused nf4 (best)": swept[top[0]], "fused_best_GBps": round(
                    (read + 2 * m * (n + k)) / swept[top[0]] / 1e6, 1),
                    "top3_configs": [[*c, swept[c]] for c in top],
                    # the same tiles with the scales decoded to fp32 beforehand (no double quantization in the loop)
                    "fused nf4 (best, fp32 scales)": timed([lambda p=p, c=c, f=f, ad=ad: nf4_matmul(
                        x, p, f, c, (n, k), None, table=table, tickets=tickets, **lora_of(ad), **tiles)
                        for (p, c, _, _), f, ad in zip(args, flat, adapters)], iters)})
            print(json.dumps(row), flush=True)
    for m, totals in step.items():
        top = sorted(set(totals) - failed[m], key=totals.get)[:5]
        print(json.dumps({"rows": m, "block_ms_best_configs": [[*c, round(totals[c], 4)] for c in top]}))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
