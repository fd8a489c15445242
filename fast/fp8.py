"""FP8 base matmuls for LoRA training (finetune/lora.py --speed.fp8 grad|all, fast.speed_up(model, fp8=...)).

A LoRA layer's frozen base weight costs up to three matmuls per training step: the forward pass, its recomputation
under activation checkpointing, and the gradient of the layer's input (a frozen weight has no gradient of its own).
They are most of a QLoRA step's time. With fp8="all" they run on the FP8 tensor cores (torch._scaled_mm; compute
capability 8.9+), which do twice the bf16 tensor cores' operations per cycle; fp8="grad" puts only the last of them
there (measured speed: docs/training-speed.md):

- The weight is decoded from its 4-bit blocks straight to float8 e4m3 with one scale per tensor (the largest block
  scale / 448): one kernel that writes 1 byte per weight, where bf16 dequantization writes 2. The backward pass
  decodes it again, transposed, because FP8 matmuls take both operands contracted along their rows. Neither copy is
  kept. A plain (bf16) base weight is scaled and cast the same way.
- The activation going in (x in forward, the output gradient in backward) is cast per row, each token with its own
  scale (its largest magnitude / 448), so one large token does not flush the others' small values to zero.
- The product comes out in bf16. The adapters (x A^T, B), norms, attention and the loss stay as they were.

Numerics: e4m3 keeps 3 mantissa bits, so each weight and activation entering a base matmul carries up to 1/16
relative rounding error on top of the 4-bit quantization. In the forward pass these errors add up across the blocks
and move the model's output: measure it with benchmarks/fp8_accuracy.py and compare validation losses against the
plain path with benchmarks/e2e_gpu.sh compare (results: docs/training-speed.md). "grad" keeps the forward pass exact
and puts FP8 only in the backward pass's input-gradient matmuls.

The decode and the per-row cast are written twice: in plain PyTorch (the reference, and what a CPU runs, where
torch._scaled_mm computes the same math: how the tests check this file) and as Triton kernels that a GPU runs
(gpu_kernels), checked against the PyTorch ones by the tests under Triton's interpreter and on the GPU by
tests/gpu/check_fused.py.
"""

import functools
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def is_4bit(base: nn.Module) -> bool:
    return type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes")


def supported(base: nn.Module) -> Optional[str]:
    """None if `base` can take the FP8 path, else why not (the caller keeps bf16 for that layer)."""
    if base.in_features % 16 or base.out_features % 16:
        return f"{base.in_features}x{base.out_features} is not a multiple of 16 (FP8 matmuls need that)"
    if type(base).__module__.startswith("bitsandbytes") and not is_4bit(base):
        return f"{type(base).__name__} base layers are not supported; use a 4-bit or bf16 base"
    return None


def device_problem(device: torch.device) -> Optional[str]:
    """None if FP8 matmuls run on `device`, else a one-line reason."""
    if device.type == "cpu":
        return None  # emulated: correct but not fast (how the tests run it)
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"FP8 matmuls need compute capability 8.9+ (L4, RTX 4090, H100, B200); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}; drop --speed.fp8")
    return None


def nested_absmax(absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                  blocksize2: int) -> torch.Tensor:
    """QLoRA's double quantization: the 4-bit blocks' fp32 scales from their 8-bit codes (bitsandbytes'
    dequantize_blockwise, plus the offset bitsandbytes subtracted before quantizing them)."""
    n = absmax.numel()
    scales = absmax2.float().repeat_interleave(blocksize2)[:n]
    return code2.float()[absmax.long()] * scales + offset.float()


def decode_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: Tuple[int, int],
                transpose: bool, scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A bitsandbytes 4-bit weight (two codes per byte, high nibble first, one fp32 scale per block of the flattened
    weight) as (float8 e4m3 weight, fp32 scalar scale): weight ~ w8 * scale. Shape (out, in), or (in, out) when
    `transpose`, contiguous either way. `scale` (what weight_scale returns) is computed when not given."""
    scale = weight_scale(absmax) if scale is None else scale
    packed = packed.reshape(-1)
    idx = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(absmax.numel(), -1).long()
    w = code.float()[idx] * (absmax.float() / scale)[:, None]
    w = w.reshape(shape)
    if transpose:
        w = w.t()
    return w.to(E4M3).contiguous(), scale


def weight_scale(absmax: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight's float8 scale: its largest block scale / 448, so that its largest value becomes 448."""
    return absmax.float().amax() / E4M3_MAX


def cast_weight(weight: torch.Tensor, transpose: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """A full-precision (out, in) weight as (float8 e4m3 weight, fp32 scalar scale), (in, out) when `transpose`."""
    w = weight.float()
    scale = w.abs().amax().clamp(min=1e-12) / E4M3_MAX
    w = w / scale
    if transpose:
        w = w.t()
    return w.to(E4M3).contiguous(), scale


def cast_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (float8 e4m3 (M, K), fp32 (M, 1) per-row scales): x ~ x8 * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


def triton_kernels():
    """decode_4bit and cast_rows as hand-written Triton kernels: what the GPU runs (gpu_kernels). Hand-written because
    torch.compile's kernels of the same math were slower (benchmarks/gpu_fp8_kernels.py times both). Defined on first call, so
    that a process started with TRITON_INTERPRET=1 runs them on the CPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(packed, absmax, code, scale, out, n_bytes, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        # (out, in) order: BLOCK bytes of the flattened weight -> 2 * BLOCK float8 values, the high nibble's first.
        # (An earlier version packed each pair into an int16 through integer bitcasts; on an H100 a quarter of its
        # values came out wrong. gpu_kernels' self_check and tests/gpu/check_fused.py now catch such a kernel.)
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(packed + offs, mask=mask, other=0).to(tl.int32)
        s = tl.load(absmax + offs // (BLOCKSIZE // 2), mask=mask, other=0.0) / tl.load(scale)
        hi = (tl.load(code + (byte >> 4)) * s).to(tl.float8e4nv)
        lo = (tl.load(code + (byte & 15)) * s).to(tl.float8e4nv)
        pairs = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + pairs, tl.interleave(hi, lo), mask=pairs < 2 * n_bytes)

    @triton.jit
    def decode_t_kernel(packed, absmax, code, scale, out, N, K, BLOCKSIZE: tl.constexpr, BN: tl.constexpr,
                        BC: tl.constexpr):
        # (in, out) order: a tile of BN rows x BC bytes of the (N, K) weight; byte c of row n holds W[n, 2c] (high
        # nibble) and W[n, 2c+1], stored at out[2c, n] and out[2c+1, n].
        rows = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
        cols = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
        mask = (rows < N) & (cols < K // 2)
        byte = tl.load(packed + rows * (K // 2) + cols, mask=mask, other=0).to(tl.int32)
        s = tl.load(absmax + (rows * (K // 2) + cols) // (BLOCKSIZE // 2), mask=mask, other=0.0) / tl.load(scale)
        hi = (tl.load(code + (byte >> 4)) * s).to(tl.float8e4nv)
        lo = (tl.load(code + (byte & 15)) * s).to(tl.float8e4nv)
        tl.store(out + (2 * cols) * N + rows, hi, mask=mask)
        tl.store(out + (2 * cols + 1) * N + rows, lo, mask=mask)

    @triton.jit
    def cast_rows_kernel(x, out, scales, K, BLOCK: tl.constexpr):
        # One row per program, held in registers: read once, its maximum, then the scaled cast.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        v = tl.load(x + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / 448.0
        tl.store(scales + row, scale)
        tl.store(out + row * K + cols, (v / scale).to(tl.float8e4nv), mask=cols < K)

    def decode(packed, absmax, code, shape, transpose, scale=None):
        N, K = shape
        scale = weight_scale(absmax) if scale is None else scale
        absmax, code = absmax.float().contiguous(), code.float().contiguous()
        blocksize = (N * K) // absmax.numel()
        if transpose:
            out = torch.empty((K, N), device=packed.device, dtype=E4M3)
            BN, BC = 64, 32
            grid = (triton.cdiv(N, BN), triton.cdiv(K // 2, BC))
            decode_t_kernel[grid](packed, absmax, code, scale, out, N, K, BLOCKSIZE=blocksize, BN=BN, BC=BC)
        else:
            out = torch.empty((N, K), device=packed.device, dtype=E4M3)
            n_bytes, BLOCK = N * K // 2, 4096  # bytes per program; a one-off H100 sweep of 1024-4096 favoured 4096
            decode_kernel[(triton.cdiv(n_bytes, BLOCK),)](packed, absmax, code, scale, out, n_bytes,
                                                         BLOCKSIZE=blocksize, BLOCK=BLOCK)
        return out, scale

    def cast(x):
        x = x.contiguous()
        M, K = x.shape
        out = torch.empty((M, K), device=x.device, dtype=E4M3)
        scales = torch.empty((M, 1), device=x.device, dtype=torch.float32)
        BLOCK = triton.next_power_of_2(K)
        cast_rows_kernel[(M,)](x, out, scales, K, BLOCK=BLOCK, num_warps=min(16, max(4, BLOCK // 1024)))
        return out, scales

    return decode, cast


@dataclass(frozen=True)
class Kernels:
    """The implementations of the elementwise steps that the FP8 matmuls below call: the plain PyTorch functions of
    this file (the reference, and what a CPU runs) unless `gpu_kernels` chose faster ones. One per model, chosen by
    fast.speed_up, so that two models in one process can run different ones."""
    decode_4bit: Callable = decode_4bit
    cast_rows: Callable = cast_rows
    cast_weight: Callable = cast_weight
    nested_absmax: Callable = nested_absmax


PLAIN = Kernels()


def gpu_kernels() -> Kernels:
    """On a GPU: decode_4bit and cast_rows as the Triton kernels of triton_kernels(), cast_weight and nested_absmax
    torch.compile'd (one fused kernel each instead of a chain of elementwise ones). Each Triton kernel is first
    checked against its PyTorch version on a small input on this GPU (self_check); one that disagrees is not used,
    with a warning."""
    decode, cast = triton_kernels()
    wrong = self_check(decode, cast)
    for name, fraction in wrong.items():
        print(f"Warning: fast/fp8.py's Triton {name} agrees with its PyTorch version on only {fraction:.1%} of values "
              f"on this GPU; using the (slower) PyTorch version", file=sys.stderr)
    return Kernels(decode_4bit=decode_4bit if "decode_4bit" in wrong else decode,
                   cast_rows=cast_rows if "cast_rows" in wrong else cast,
                   cast_weight=compiled(cast_weight), nested_absmax=compiled(nested_absmax))


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """One torch.compile wrapper per function for the whole process, so that models sped up one after the other
    share its compiled kernels instead of compiling them again."""
    return torch.compile(fn)


def self_check(decode, cast, device: str = "cuda", shape: Tuple[int, int] = (192, 256)) -> dict:
    """{kernel name: fraction of float8 values equal} for the Triton kernels that differ from the plain ones on a random
    input on `device`; {} when all agree. Triton's fp32 division may differ from PyTorch's in the last bit,
    which can tip a rare rounding tie, hence a threshold rather than equality."""
    gen = torch.Generator(device=device).manual_seed(0)
    n, k = shape
    packed = torch.randint(0, 256, (n * k // 2,), device=device, dtype=torch.uint8, generator=gen)
    absmax = torch.rand(n * k // 64, device=device, generator=gen) + 0.1
    code = torch.linspace(-1, 1, 16, device=device)
    x = torch.randn(64, k, device=device, generator=gen, dtype=torch.bfloat16)
    x[1] *= 1000
    pairs = [("cast_rows", cast(x)[0], cast_rows(x)[0])]
    for transpose in (False, True):
        pairs.append(("decode_4bit", decode(packed, absmax, code, shape, transpose)[0],
                      decode_4bit(packed, absmax, code, shape, transpose)[0]))
    wrong = {}
    for name, got, want in pairs:
        fraction = (got.float() == want.float()).float().mean().item() if got.shape == want.shape else 0.0
        if fraction < 0.999:
            wrong[name] = min(fraction, wrong.get(name, 1.0))
    return wrong


def weight_fp8(base: nn.Module, transpose: bool, kernels: Kernels = PLAIN) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen weight of `base` (a plain or bitsandbytes 4-bit linear) in float8 with its scalar scale."""
    if not is_4bit(base):
        return kernels.cast_weight(base.weight, transpose)
    state = base.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = kernels.nested_absmax(absmax, state.state2.code, state.state2.absmax, state.offset, state.state2.blocksize)
    scale = getattr(state, "fp8_scale", None)
    if scale is None:  # frozen weight: computed once (two fewer kernels in each of the step's decodes)
        scale = state.fp8_scale = weight_scale(absmax)
    return kernels.decode_4bit(base.weight, absmax, state.code, (base.out_features, base.in_features), transpose,
                               scale)


def scaled_mm(a: torch.Tensor, b8: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
              kernels: Kernels = PLAIN) -> torch.Tensor:
    """a (M, K) @ (b8 * b_scale)^T for b8 (N, K) float8 and a scalar or (1, N) b_scale: a is cast per row, the
    product comes out in `out_dtype`."""
    a8, a_scale = kernels.cast_rows(a)
    return torch._scaled_mm(a8, b8.t(), scale_a=a_scale, scale_b=column_scales(b_scale, b8.shape[0]),
                            out_dtype=out_dtype)


def column_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A scalar scale as the (1, n) row of per-column scales that row-wise scaled matmuls want."""
    return scale if scale.dim() == 2 else scale.reshape(1, 1).expand(1, n).contiguous()


def base_fp8(base: nn.Module, transpose: bool, kernels: Kernels = PLAIN) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight_fp8 with the scale already as scaled_mm's (1, N) row; a frozen 4-bit weight's is made once and kept
    on its quant_state (one fewer kernel per matmul)."""
    w8, scale = weight_fp8(base, transpose, kernels)
    if not is_4bit(base):
        return w8, scale
    state = base.weight.quant_state
    if getattr(state, "fp8_columns", None) is None:
        state.fp8_columns = {}
    if transpose not in state.fp8_columns:
        state.fp8_columns[transpose] = column_scales(scale, w8.shape[0])
    return w8, state.fp8_columns[transpose]


def linear(x2: torch.Tensor, base: nn.Module, kernels: Kernels = PLAIN) -> torch.Tensor:
    """x2 (M, in) @ W^T (+ bias) with the base weight in FP8: the forward (and recomputed) base matmul."""
    w8, scale = base_fp8(base, False, kernels)
    y = scaled_mm(x2, w8, scale, x2.dtype, kernels)
    return y if base.bias is None else y.add_(base.bias.to(y.dtype))


def input_grad(dy2: torch.Tensor, base: nn.Module, kernels: Kernels = PLAIN) -> torch.Tensor:
    """dy2 (M, out) @ W with the base weight in FP8: the backward pass's base matmul."""
    w8t, scale = base_fp8(base, True, kernels)  # (in, out): rows are contracted, as _scaled_mm wants
    return scaled_mm(dy2, w8t, scale, dy2.dtype, kernels)
