"""generate/nf4_matmul.py's kernel (the server's --fused_4bit: NF4 decoded inside the tiles of the decode step's
matrix products) timed against what a 4-bit base runs otherwise (bitsandbytes: gemv_4bit for one row, dequantize +
cuBLAS for more) and against the same product on bf16 weights, at a model's shapes and a decode step's row counts.

    python benchmarks/gpu_nf4_gemm.py --model Mistral-7B-v0.1 --rows 1,8,32

Why: the serving table's NF4 rows reach 25% (1 stream) and 8% (30 streams) of the bandwidth bound of their 4-bit
bytes (docs/serving.md). A decode step reads each weight once; in 4 bits that is a quarter of bf16's bytes, so a kernel
that decodes in its tiles could beat bf16 rather than trail it. Per shape and row count: the kernel with its default
tiles and K split, the best of a small sweep of tile sizes and K splits, its effective bandwidth (4-bit bytes and
block scales read, output written) and its error against x @ W^T with W dequantized by bitsandbytes (double-quantized
scales, as QLoRA's bnb.nf4-dq). Written on 2026-12-06 after the session's GPU time was spent: not yet run on a GPU.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


CONFIGS = [(BN, BK, split) for BN in (32, 64) for BK in (128, 256) for split in (1, 2, 4, 8)]


def main(model: str = "Mistral-7B-v0.1", rows: str = "1,8,32", iters: int = 20) -> None:
    """Args:
        model: a registered config: its block's linear shapes are timed.
        rows: decode rows (the bucket's batch), comma-separated.
        iters: timed repetitions (median).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    from benchmarks.gpu_fp8_kernels import median_ms
    from generate.nf4_matmul import nested_of, nf4_matmul
    from model import Config

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_nf4_gemm.py needs a CUDA GPU")
    c = Config.from_name(model)
    shapes = {"qkv": ((c.n_head + 2 * c.n_query_groups) * c.head_size, c.n_embd),
              "proj": (c.n_embd, c.n_head * c.head_size), "fc": (c.intermediate_size, c.n_embd),
              "down": (c.n_embd, c.intermediate_size)}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        absmax, nested = (state.absmax if state.nested else state.absmax.float()), nested_of(state)
        reference_w = BF.dequantize_4bit(packed, state)
        read = n * k // 2 + absmax.numel() * absmax.element_size()
        for m in [int(r) for r in rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ reference_w.float().t()
            timings = {
                "bf16 weights (cuBLAS)": median_ms(lambda: x @ w.t(), iters),
                "bitsandbytes matmul_4bit": median_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
                                                      iters),
                "dequantize + cuBLAS": median_ms(lambda: x @ BF.dequantize_4bit(packed, state).t(), iters)}
            timings["fused nf4 (defaults)"] = median_ms(
                lambda: nf4_matmul(x, packed, absmax, state.code, (n, k), nested), iters)
            best = None
            for BN, BK, split in CONFIGS:
                try:
                    y = nf4_matmul(x, packed, absmax, state.code, (n, k), nested, BN=BN, BK=BK, split_k=split)
                    ms = median_ms(lambda: nf4_matmul(x, packed, absmax, state.code, (n, k), nested, BN=BN, BK=BK,
                                                      split_k=split), iters)
                except Exception as e:  # a configuration this GPU or Triton refuses: the others go on
                    print(json.dumps({"shape": name, "rows": m, "config": [BN, BK, split], "error": str(e)[:200]}))
                    continue
                error = ((y.float() - reference).norm() / reference.norm()).item()
                if best is None or ms < best[0]:
                    best = (ms, (BN, BK, split), error)
            row = {"shape": name, "out_in": [n, k], "rows": m, **{key: round(v, 4) for key, v in timings.items()}}
            if best:
                ms, config, error = best
                row.update({"fused nf4 (best)": round(ms, 4), "config_BN_BK_splitK": config,
                            "fused_GBps": round((read + 2 * m * (n + k)) / ms / 1e6, 1),
                            "fused_rel_error": round(error, 5)})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
