"""A prototype: the serving decode step's 4-bit matrix products as one Triton kernel that decodes NF4 inside its tiles,
timed against what a 4-bit base runs today (bitsandbytes: gemv_4bit for one row, dequantize + cuBLAS for more) and
against the same product on bf16 weights, at a model's shapes and a decode step's row counts.

    python benchmarks/gpu_nf4_gemm.py --model Mistral-7B-v0.1 --rows 1,8,32

Why: the serving table's NF4 rows reach 25% (1 stream) and 8% (30 streams) of the bandwidth bound of their 4-bit
bytes (docs/serving.md). A decode step reads each weight once; in 4 bits that is a quarter of bf16's bytes, so a kernel
that decodes in its tiles could beat bf16 rather than trail it. This file measures whether this one does, before any of
it enters the server: for every shape and row count, the best of a small sweep of tile sizes and K splits, its
effective bandwidth (4-bit bytes + fp32 block scales read, output written) and its error against x @ W^T with W
dequantized by bitsandbytes. Written on 2026-12-06 after the session's GPU time was spent; its correctness is checked
by tests/test_nf4_gemm.py in Triton's CPU interpreter, its speed not yet measured.

The kernel (`nf4_matmul`): y (M, N) = x (M, K) @ W^T for W (N, K) as bitsandbytes stores a 4-bit weight (the flattened
weight two codes per byte, high nibble first; one fp32 scale per block of 64 consecutive values; double-quantized
scales decoded once beforehand). Each program holds a BN-column slice of W and one of SPLIT_K parts of K; per BK step
it loads BN x BK/2 bytes, decodes them through the 16-entry code table times their block's scale into x's dtype and
multiplies on the tensor cores (rows padded to 16). SPLIT_K > 1 gives a GEMV-shaped product enough programs to keep
the memory system busy; the parts are summed after.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kernels():
    """Defined on first call, so that a process started with TRITON_INTERPRET=1 runs them on the CPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_matmul_kernel(x, packed, absmax, code, out, M, N, K, K_PART,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE: tl.constexpr,
                          IEEE: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)  # output columns = rows of W
        part = tl.program_id(1)
        rows = tl.arange(0, BM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(part * K_PART, tl.minimum((part + 1) * K_PART, K), BK):
            ks = k0 + tl.arange(0, BK)
            xs = tl.load(x + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            half = k0 // 2 + tl.arange(0, BK // 2)  # byte c of a row holds W[n, 2c] (high nibble) and W[n, 2c + 1]
            valid = (cols[:, None] < N) & (half[None, :] < K // 2)
            byte = tl.load(packed + cols[:, None].to(tl.int64) * (K // 2) + half[None, :], mask=valid, other=0)
            byte = byte.to(tl.int32)
            scale = tl.load(absmax + (cols[:, None].to(tl.int64) * K + 2 * half[None, :]) // BLOCKSIZE, mask=valid,
                            other=0.0)
            hi = tl.load(code + (byte >> 4)) * scale
            lo = tl.load(code + (byte & 15)) * scale
            w = tl.interleave(hi, lo).to(xs.dtype)  # (BN, BK), k in order
            if IEEE:
                acc += tl.dot(xs, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xs, tl.trans(w))
        tl.store(out + part * M * N + rows[:, None] * N + cols[None, :], acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    def nf4_matmul(x, packed, absmax, code, shape, BN=64, BK=128, split_k=1, num_warps=4):
        """x (M, K) @ W^T for a bitsandbytes 4-bit W of `shape` (N, K) with fp32 block scales `absmax`."""
        N, K = shape
        M = x.size(0)
        blocksize = N * K // absmax.numel()
        BM = max(16, triton.next_power_of_2(M))
        k_part = triton.cdiv(triton.cdiv(K, split_k), BK) * BK
        parts = triton.cdiv(K, k_part)
        out = torch.empty((parts, M, N), device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(N, BN), parts)
        nf4_matmul_kernel[grid](x.contiguous(), packed.reshape(-1), absmax.float().contiguous(),
                                code.float().contiguous(), out, M, N, K, k_part, BM=BM, BN=BN, BK=BK,
                                BLOCKSIZE=blocksize, IEEE=x.dtype == torch.float32, num_warps=num_warps)
        return (out[0] if parts == 1 else out.sum(0)).to(x.dtype)

    return nf4_matmul


def scales_of(state) -> torch.Tensor:
    """A 4-bit weight's fp32 block scales (double-quantized ones decoded, as fast/fp8.py does)."""
    from fast import fp8

    if not state.nested:
        return state.absmax.float()
    return fp8.nested_absmax(state.absmax, state.state2.code, state.state2.absmax, state.offset,
                             state.state2.blocksize)


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
    from model import Config

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_nf4_gemm.py needs a CUDA GPU")
    nf4_matmul = kernels()
    c = Config.from_name(model)
    shapes = {"qkv": ((c.n_head + 2 * c.n_query_groups) * c.head_size, c.n_embd),
              "proj": (c.n_embd, c.n_head * c.head_size), "fc": (c.intermediate_size, c.n_embd),
              "down": (c.n_embd, c.intermediate_size)}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        absmax = scales_of(state)
        reference_w = BF.dequantize_4bit(packed, state)
        read = n * k // 2 + absmax.numel() * 4
        for m in [int(r) for r in rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = (x.float() @ reference_w.float().t())
            timings = {
                "bf16 weights (cuBLAS)": median_ms(lambda: x @ w.t(), iters),
                "bitsandbytes matmul_4bit": median_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), iters),
                "dequantize + cuBLAS": median_ms(lambda: x @ BF.dequantize_4bit(packed, state).t(), iters)}
            best = None
            for BN, BK, split in CONFIGS:
                try:
                    y = nf4_matmul(x, packed, absmax, state.code, (n, k), BN=BN, BK=BK, split_k=split)
                    ms = median_ms(lambda: nf4_matmul(x, packed, absmax, state.code, (n, k), BN=BN, BK=BK,
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
