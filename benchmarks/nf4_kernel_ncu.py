"""generate/nf4_matmul.py's kernels launched once each, for Nsight Compute to read their hardware counters.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats python3 benchmarks/nf4_kernel_ncu.py

Timing says how long a product takes (benchmarks/gpu_nf4_gemm.py); the counters say why: the share of memory bandwidth
and of issue slots used, the warps resident per scheduler, and what the warps waited on. Each (shape, rows, adapter) of
`cases` runs twice unprofiled (compile, warm caches), then once between cudaProfilerStart and Stop, so that with
--profile-from-start off ncu sees exactly one launch per case, in the order printed.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(model: str = "Mistral-7B-v0.1", cases: str = "fc:1,fc:32,qkv:32:16,fc:32:16") -> None:
    """Args:
        model: a registered config: its block's linear shapes.
        cases: shape:rows[:adapter rank per part], comma-separated (qkv has three parts: q, k and v).
    """
    import bitsandbytes.functional as BF

    from benchmarks.gpu_fp8_kernels import block_linears
    from generate.nf4_matmul import kernel_table, nf4_matmul, pad_adapter, scales_of
    from model import Config

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_kernel_ncu.py needs a CUDA GPU")
    shapes = {name: shape for name, (shape, _) in block_linears(Config.from_name(model)).items()}
    calls = []
    for case in cases.split(","):
        name, rows, *rank = case.split(":")
        (n, k), rows, rank = shapes[name], int(rows), int(rank[0]) if rank else 0
        packed, state = BF.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64,
                                         quant_type="nf4", compress_statistics=True)
        absmax, nested = scales_of(state)
        table = torch.tensor(kernel_table(tuple(state.code.tolist())), dtype=torch.int32, device="cuda")
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ranks = rank * (3 if name == "qkv" else 1)
        lora = (*pad_adapter(torch.randn(ranks, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5,
                             torch.randn(n, ranks, device="cuda", dtype=torch.bfloat16) * 0.02), 0.5) if ranks else None
        calls.append((case, lambda x=x, p=packed, a=absmax, c=state.code, s=(n, k), ns=nested, t=table, lo=lora:
                      nf4_matmul(x, p, a, c, s, ns, lookup=True, table=t, lora=lo)))
    for _, call in calls:
        call(), call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for case, call in calls:
        print(f"profiled: {case}", flush=True)
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
