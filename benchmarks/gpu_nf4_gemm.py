"""generate/nf4_matmul.py's kernel (the server's --fused_4bit: NF4 decoded inside the tiles of the decode step's
matrix products) against what a 4-bit base runs otherwise (bitsandbytes: gemv_4bit for one row, dequantize + cuBLAS
for more) and against the same product on bf16 weights, at a model's shapes and a decode step's row counts, timed as
replays of a CUDA graph (as the server runs its step) over copies of the weight that together overflow the L2 cache.

    python benchmarks/gpu_nf4_gemm.py --model Mistral-7B-v0.1 --rows 1,8,32

Why: the serving table's NF4 rows reach 25% (1 stream) and 8% (30 streams) of the bandwidth bound of their 4-bit
bytes (docs/serving.md). A decode step reads each weight once; in 4 bits that is a quarter of bf16's bytes, so a kernel
that decodes in its tiles could beat bf16 rather than trail it. Per shape and row count: the kernel with its default
tiles and K split, the best of a sweep of tile sizes, K splits and the code table's place (loaded per value, or
held in registers and read by tl.gather), its effective bandwidth (4-bit bytes and
block scales read, output written) and its error against x @ W^T with W dequantized by bitsandbytes (double-quantized
scales, as QLoRA's bnb.nf4-dq). Written on 2026-12-06 after the session's GPU time was spent: not yet run on a GPU.
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


CONFIGS = [(BN, BK, split, gather) for BN in (32, 64) for BK in (128, 256) for split in (1, 2, 4, 8)
           for gather in (False, True)]


def main(model: str = "Mistral-7B-v0.1", rows: str = "1,8,32", iters: int = 20) -> None:
    """Args:
        model: a registered config: its block's linear shapes are timed.
        rows: decode rows (the bucket's batch), comma-separated.
        iters: timed repetitions (median).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    from generate.nf4_matmul import nf4_matmul, scales_of
    from model import Config

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_nf4_gemm.py needs a CUDA GPU")
    c = Config.from_name(model)
    shapes = {"qkv": ((c.n_head + 2 * c.n_query_groups) * c.head_size, c.n_embd),
              "proj": (c.n_embd, c.n_head * c.head_size), "fc": (c.intermediate_size, c.n_embd),
              "down": (c.n_embd, c.intermediate_size)}
    for name, (n, k) in shapes.items():
        # Copies enough that the 4-bit ones (and the bf16 ones) do not fit the GPU's L2 cache together: each call of a
        # graph reads its weight from memory, as a decode step does.
        copies = max(2, min(16, -(-(256 << 20) // (n * k // 2))))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quantized = [BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in weights]
        args = [(packed, state.code, *scales_of(state)) for packed, state in quantized]
        reference_w = BF.dequantize_4bit(*quantized[0])
        scales = args[0][2]
        read = n * k // 2 + scales.numel() * scales.element_size()
        for m in [int(r) for r in rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ reference_w.float().t()

            def fused(**tiles):
                return [lambda p=p, c=c, s=s, ns=ns: nf4_matmul(x, p, s, c, (n, k), ns, **tiles)
                        for p, c, s, ns in args]

            timings = {
                "bf16 weights (cuBLAS)": timed([lambda w=w: x @ w.t() for w in weights], iters),
                "bitsandbytes matmul_4bit": timed([lambda q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])
                                                   for q in quantized], iters),
                "dequantize + cuBLAS": timed([lambda q=q: x @ BF.dequantize_4bit(*q).t() for q in quantized], iters),
                "fused nf4 (defaults)": timed(fused(), iters)}
            best = None
            for BN, BK, split, gather in CONFIGS:
                ms = timed(fused(BN=BN, BK=BK, split_k=split, gather=gather), iters)
                if isinstance(ms, str):
                    print(json.dumps({"shape": name, "rows": m, "config": [BN, BK, split, gather], "error": ms}))
                    continue
                if best is None or ms < best[0]:
                    best = (ms, (BN, BK, split, gather))
            y = fused()[0]()
            row = {"shape": name, "out_in": [n, k], "rows": m, "weight_copies": copies, **timings,
                   "fused_rel_error": round(((y.float() - reference).norm() / reference.norm()).item(), 6)}
            if best:
                ms, config = best
                row.update({"fused nf4 (best)": ms, "config_BN_BK_splitK_gather": config,
                            "fused_best_GBps": round((read + 2 * m * (n + k)) / ms / 1e6, 1)})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
