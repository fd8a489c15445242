"""Host <-> GPU copy speed with pinned memory, alone and beside a bf16 matmul load: what offloaded checkpoints
(finetune/lora.py --offload_checkpoints) can move while the GPU computes.

    python benchmarks/gpu_bandwidth.py --mib 256
"""

import json
import time

import torch


def timed(fn, reps: int) -> float:
    """Seconds per call, after two warm-up calls, synchronised around the whole loop."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main(mib: int = 256, reps: int = 10) -> None:
    """Args:
        mib: size of one copy.
        reps: timed repetitions.
    """
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_bandwidth.py needs a CUDA GPU")
    n = mib * 2**20
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d2h = timed(lambda: host.copy_(gpu, non_blocking=True), reps)
    h2d = timed(lambda: gpu.copy_(host, non_blocking=True), reps)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def matmuls():
        for _ in range(10):
            a @ a

    def matmuls_and_copy():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(gpu, non_blocking=True)
        matmuls()
        torch.cuda.current_stream().wait_stream(side)

    alone, beside = timed(matmuls, 3), timed(matmuls_and_copy, 3)
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "d2h_GBps": round(n / d2h / 1e9, 1),
                      "h2d_GBps": round(n / h2d / 1e9, 1), "matmuls_ms": round(alone * 1e3, 2),
                      "matmuls_with_d2h_ms": round(beside * 1e3, 2), "d2h_ms": round(d2h * 1e3, 2)}))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
