"""Times fast/kernels.py's SwiGLU kernels (fast.fused.lora_gated_mlp on a GPU) on a model's MLP shape against what the unfused
path runs for the same math: the adapters added into the gate and up outputs by two addmm_ and the compiled SwiGLU
(forward); the SwiGLU product recomputed, the down adapter added into its input gradient by addmm_, and the compiled
SwiGLU backward (backward). Also for a few tile shapes, and how many bf16 values equal the plain PyTorch version's.
CUDA events, median of --iters after warm-up; one JSON line per measurement.

    python benchmarks/gpu_lora_kernels.py --model Mistral-7B-v0.1 --tokens 4096
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fast import kernels as triton_swiglu  # noqa: E402
from fast import fused  # noqa: E402
from model import Config  # noqa: E402
from benchmarks.gpu_fp8_kernels import median_ms  # noqa: E402


def main(model: str = "Mistral-7B-v0.1", tokens: int = 4096, rank: int = 16, iters: int = 20) -> None:
    """Args:
        model: a registered config name: its n_embd x intermediate_size MLP is timed.
        tokens: rows (micro-batch x sequence length).
        rank: LoRA rank.
        iters: timed repetitions (the median is reported).
    """
    config = Config.from_name(model)
    M, N = tokens, config.intermediate_size
    compiled = fused.choose_kernels(True, on_gpu=False)  # the compiled SwiGLU the unfused path runs
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * std).to(torch.bfloat16)

    g, u, d, h_g, h_u, dh = rand(M, N), rand(M, N), rand(M, N), rand(M, rank), rand(M, rank), rand(M, rank)
    B_g, B_u, A = rand(N, rank, std=0.05), rand(N, rank, std=0.05), rand(rank, N, std=0.05)
    args = (g, u, h_g, B_g, 2.0, h_u, B_u, 2.0)

    def unfused_forward():
        gate, up = g.clone(), u.clone()  # LoRAMatmul adds into the base output in place; the copy is not timed
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        gate.addmm_(h_g, B_g.t(), alpha=2.0)
        up.addmm_(h_u, B_u.t(), alpha=2.0)
        compiled.swiglu(gate, up)
        return start

    def unfused_backward(keep: bool):
        gate, up, grad = g.clone(), u.clone(), d.clone()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if not keep:
            compiled.swiglu(gate, up)
        grad.addmm_(dh, A)
        compiled.swiglu_backward(gate, up, grad)
        return start

    def timed(fn) -> float:  # fn records its own start event after its untimed setup
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            start = fn()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    unit = M * N * 2  # bytes of one (tokens, intermediate) bf16 tensor
    rows = [("unfused forward (2 addmm_ + compiled swiglu)", timed(unfused_forward), 7 * unit),
            ("unfused backward (swiglu recomputed + addmm_ + compiled swiglu_backward)",
             timed(lambda: unfused_backward(False)), 10 * unit),
            ("unfused backward, product kept", timed(lambda: unfused_backward(True)), 7 * unit)]
    d_timing = d.clone()  # the timed backward writes the SwiGLU product over it
    for tile in (triton_swiglu.TILE, (16, 256), (64, 64), (64, 128)):
        rows += [(f"fused forward, tile {tile}", median_ms(lambda: triton_swiglu.swiglu_lora(*args, tile=tile), iters),
                  3 * unit),
                 (f"fused backward, tile {tile}",
                  median_ms(lambda: triton_swiglu.swiglu_lora_backward(*args, d_timing, dh, A, True, tile=tile), iters),
                  6 * unit),
                 (f"fused backward, product kept, tile {tile}",
                  median_ms(lambda: triton_swiglu.swiglu_lora_backward(*args, d_timing, dh, A, False, tile=tile),
                            iters), 5 * unit)]
    for label, ms, moved in rows:
        print(json.dumps({"kernels": label, "tokens": M, "intermediate": N, "rank": rank, "ms": round(ms, 4),
                          "GB_per_s": round(moved / ms / 1e6)}), flush=True)
    got = [triton_swiglu.swiglu_lora(*args), *triton_swiglu.swiglu_lora_backward(*args, d.clone(), dh, A, True)]
    want = [compiled.swiglu_lora(*args), *compiled.swiglu_lora_backward(*args, d, dh, A, True)]
    for name, a, b in zip(("act", "d gate", "d up", "act (backward)"), got, want):
        a, b = a.float(), b.float()
        print(json.dumps({"check": f"Triton {name} vs plain PyTorch (compiled swiglu), bf16",
                          "fraction_equal": round((a == b).float().mean().item(), 5),
                          "rel_err": (a - b).norm().item() / b.norm().item()}), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
