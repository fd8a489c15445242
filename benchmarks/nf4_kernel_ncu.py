r"""generate/nf4_matmul.py's kernels launched once each, for Nsight Compute to read their hardware counters.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \
        --section InstructionStats --section ComputeWorkloadAnalysis python3 benchmarks/nf4_kernel_ncu.py
    M='regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second'
    M="$M,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active"
    M="$M,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
    M="$M,dram__throughput.avg.pct_of_peak_sustained_elapsed"
    ncu --clock-control none --profile-from-start off --page raw --metrics "$M" python3 benchmarks/nf4_kernel_ncu.py \
        --cases fc:1,fc:32

The first gives time, bandwidth, issue slots, registers, occupancy and the stalls' summary; the second every pipe's
share of its rate and every stall reason per instruction. Timing says how long a product takes
(benchmarks/gpu_nf4_gemm.py); the counters say why. Each (shape, rows, adapter) of
`cases` runs twice unprofiled (compiling the kernel), then once between cudaProfilerStart and Stop, so that with
--profile-from-start off ncu sees one launch of the kernel per case, in the order printed (ncu empties the caches
before each, by default). The raw files of docs/speed/h100_2026-12-06_nf4_kernel/16_* were taken before each case had
its tickets made in advance, so they also hold a small fill kernel per case.
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
    from benchmarks.gpu_nf4_gemm import random_adapter
    from generate.nf4_matmul import kernel_table, nf4_matmul, scales_of
    from model import Config

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_kernel_ncu.py needs a CUDA GPU")
    blocks = Config.from_name(model)
    shapes = {name: shape for name, (shape, _) in block_linears(blocks).items()}
    calls = []
    for case in cases.split(","):
        name, rows, *rank = case.split(":")
        if name not in shapes:
            raise SystemExit(f"--cases: {case!r} names no linear shape of {model}; use one of {', '.join(shapes)}")
        (n, k), rows, rank = shapes[name], int(rows), int(rank[0]) if rank else 0
        packed, state = BF.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64,
                                         quant_type="nf4", compress_statistics=True)
        absmax, nested = scales_of(state)
        table = torch.tensor(kernel_table(tuple(state.code.tolist())), dtype=torch.int32, device="cuda")
        tickets = torch.zeros(-(-n // 16), dtype=torch.int32, device="cuda")  # not made inside the profiled range
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        adapter = random_adapter(name, n, k, rank, blocks)
        lora, starts = ((*adapter[:2], 0.5), adapter[2]) if adapter is not None else (None, None)
        calls.append((case, lambda x=x, p=packed, a=absmax, c=state.code, s=(n, k), ns=nested, t=table, ti=tickets,
                      lo=lora, st=starts: nf4_matmul(x, p, a, c, s, ns, lookup=True, table=t, tickets=ti, lora=lo,
                                                     lora_starts=st)))
    for _, call in calls:
        call()
        call()
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
