"""The two ceilings of this GPU that the speed figures are measured against: device memory bandwidth (a 2 GiB copy,
bytes read plus written, as benchmarks/serve_table.py measures it) and the matrix-product rate at a model's training
shapes, bf16 through cuBLAS and float8 through torch._scaled_mm (as fast/fp8.py calls it, activations cast per row
beforehand, so the cast is not timed). Random inputs; the products timed with CUDA events, median of --iters after
warm-up.

    python benchmarks/gpu_ceilings.py --model Mistral-7B-v0.1 --tokens 4096

Per linear layer of a block: the forward product (tokens, in) x (in, out) and the backward's input gradient
(tokens, out) x (out, in), each in TFLOP/s. Last, the rate over one whole step's base matrix products (every block's
linears and the head, forward and input gradient, weighted by their FLOPs; the head in bf16 for both kinds, as
training runs it) and what it means for QLoRA training: tokens/s if a step did nothing but those products (2 x 2 x
matmul parameters FLOP per token). A training table's tokens/s over that figure is the share of a step left after
the rest (attention, 4-bit decoding, norms, adapters).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_fp8_kernels import block_linears, median_ms  # noqa: E402
from benchmarks.serve_table import copy_bandwidth  # noqa: E402
from fast import fp8  # noqa: E402
from model import Config  # noqa: E402


def product_ms(n: int, k: int, tokens: int, kinds, iters: int) -> dict:
    """{(kind, direction): ms} for an (n, k) weight: forward x @ W^T and input gradient dy @ W."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    products = {("bf16", "forward"): lambda: x @ w.t(), ("bf16", "input_grad"): lambda: dy @ w}
    if "fp8" in kinds:
        w8, scale = fp8.cast_weight(w, transpose=False)
        w8t, scale_t = fp8.cast_weight(w, transpose=True)
        (x8, xs), (dy8, dys) = fp8.cast_rows(x), fp8.cast_rows(dy)
        columns, columns_t = fp8.column_scales(scale, n), fp8.column_scales(scale_t, k)
        products[("fp8", "forward")] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=columns,
                                                                out_dtype=torch.bfloat16)
        products[("fp8", "input_grad")] = lambda: torch._scaled_mm(dy8, w8t.t(), scale_a=dys, scale_b=columns_t,
                                                                   out_dtype=torch.bfloat16)
    return {key: median_ms(fn, iters) for key, fn in products.items()}


def main(model: str = "Mistral-7B-v0.1", tokens: int = 4096, iters: int = 20, fp8_too: bool = True) -> None:
    """Args:
        model: a registered config name: its linear shapes are timed.
        tokens: rows of the activations (micro-batch x sequence).
        iters: timed repetitions (the median is reported).
        fp8_too: time the float8 products too (needs a GPU with float8 tensor cores).
    """
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_ceilings.py needs a CUDA GPU")
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "copy_TBps": round(copy_bandwidth("cuda") / 1e12, 3)}),
          flush=True)
    c = Config.from_name(model)
    block = block_linears(c)
    linears = {**{name: shape for name, (shape, _) in block.items()}, "head": (c.vocab_size, c.n_embd)}
    counts = {**{name: c.n_layer * count for name, (_, count) in block.items()}, "head": 1}
    kinds = ["bf16"] + (["fp8"] if fp8_too and fp8.device_problem(torch.device("cuda")) is None else [])
    step_ms = {kind: 0.0 for kind in kinds}
    step_flop = 0.0
    for name, (n, k) in linears.items():
        flop = 2 * tokens * n * k
        timed = product_ms(n, k, tokens, kinds if name != "head" else ["bf16"], iters)
        for (kind, direction), ms in timed.items():
            print(json.dumps({"kind": kind, "linear": name, "direction": direction, "out_in": [n, k],
                              "tokens": tokens, "ms": round(ms, 4), "TFLOPs": round(flop / ms / 1e9, 1)}), flush=True)
        for kind in kinds:
            as_kind = "bf16" if name == "head" else kind  # the head stays in bf16 under --speed.fp8 too
            step_ms[kind] += counts[name] * sum(ms for (of, _), ms in timed.items() if of == as_kind)
        step_flop += 2 * counts[name] * flop
    for kind in kinds:
        print(json.dumps({"kind": kind, "model": model, "tokens": tokens,
                          "step_matmuls_TFLOPs": round(step_flop / step_ms[kind] / 1e9, 1),
                          "tokens_per_s_if_only_these": round(tokens / step_ms[kind] * 1e3)}))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
