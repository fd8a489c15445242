"""Times fast/fp8.py's GPU kernels on a model's weight shapes: the 4-bit -> float8 decode (forward order and transposed)
and the per-row activation cast, as the hand-written Triton kernels (what training runs) against torch.compile of the
plain PyTorch math and bitsandbytes' own bf16 dequantization. CUDA events, median of --iters after warm-up; one JSON
line per kernel and shape with its time and effective bandwidth (bytes read + written per second).

    python benchmarks/gpu_fp8_kernels.py --model Mistral-7B-v0.1 --tokens 2048
"""

import json
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fast import fp8  # noqa: E402
from model import Config  # noqa: E402


def block_linears(config: Config) -> Dict[str, Tuple[Tuple[int, int], int]]:
    """A block's linear layers: name -> ((out_features, in_features), how many of that shape a block has)."""
    q = (config.n_head + 2 * config.n_query_groups) * config.head_size
    return {"qkv": ((q, config.n_embd), 1), "proj": ((config.n_embd, config.n_head * config.head_size), 1),
            "fc": ((config.intermediate_size, config.n_embd), 2 if config.gated_mlp else 1),
            "down": ((config.n_embd, config.intermediate_size), 1)}


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(model: str = "Mistral-7B-v0.1", tokens: int = 2048, iters: int = 20) -> None:
    """Args:
        model: a registered config name: its block's linear shapes are timed.
        tokens: rows of the activations cast per row.
        iters: timed repetitions (the median is reported).
    """
    import bitsandbytes.functional as BF

    config = Config.from_name(model)
    linears = block_linears(config)
    triton_decode, triton_cast = fp8.triton_kernels()
    compiled_decode, compiled_cast = torch.compile(fp8.decode_4bit), torch.compile(fp8.cast_rows)
    for name, ((n, k), _) in linears.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        moved = n * k // 2 + n * k // 16  # packed bytes + fp32 scales read
        rows = [("bitsandbytes bf16 dequantize", lambda: BF.dequantize_4bit(packed, state), moved + 2 * n * k)]
        for transpose in (False, True):
            for label, fn in (("triton", triton_decode), ("torch.compile", compiled_decode)):
                rows.append((f"{label} decode{' transposed' if transpose else ''}",
                             lambda fn=fn, t=transpose: fn(packed, state.absmax, state.code, (n, k), t), moved + n * k))
        for label, fn, nbytes in rows:
            ms = median_ms(fn, iters)
            print(json.dumps({"kernel": label, "shape": name, "out_in": [n, k], "ms": round(ms, 4),
                              "gb_per_s": round(nbytes / ms / 1e6, 1)}), flush=True)
    for width in sorted({config.n_embd, config.intermediate_size, linears["qkv"][0][0]}):
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        for label, fn in (("triton", triton_cast), ("torch.compile", compiled_cast)):
            ms = median_ms(lambda fn=fn: fn(x), iters)
            print(json.dumps({"kernel": f"{label} cast_rows", "shape": [tokens, width], "ms": round(ms, 4),
                              "gb_per_s": round(3 * tokens * width / ms / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
