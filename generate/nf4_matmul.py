"""The decode step's 4-bit matrix products as one Triton kernel that decodes NF4 inside its tiles (`--fused_4bit`).

A decode step reads every weight once. bitsandbytes multiplies a 4-bit weight by one row through its gemv_4bit kernel
and by more rows by dequantizing the whole weight to bf16 first (writing and reading a bf16 copy of every weight per
step); the serving table measured both far from the bandwidth bound of the 4-bit bytes (docs/serving.md). Here each
program holds a BN-column slice of W and one of `split_k` parts of K; per BK step it loads BN x BK/2 bytes, decodes
them through the 16-entry code table times their block's scale (double-quantized scales decoded in the kernel too),
and multiplies on the tensor cores (rows padded to 16). Splitting K gives a product with few rows enough programs to
keep the memory system busy; the parts are summed after, by the caller's compiled code in the server's step. For
16-32 rows that is about twice bitsandbytes' speed on an H100, yet bound by the decoding rather than by memory
(docs/speed/h100_2026-12-06_nf4_kernel.md); one row stays with bitsandbytes' gemv_4bit, the faster there.

The layout is bitsandbytes' (`Params4bit` data and `QuantState`): the flattened (out, in) weight two codes per byte,
high nibble first, one scale per block of `blocksize` consecutive values. Checked against dequantize-then-matmul in
Triton's CPU interpreter (tests/test_nf4_matmul.py) and, on a GPU, by `self_check` before use; timed against
bitsandbytes by benchmarks/gpu_nf4_gemm.py.
"""

import functools
import importlib.util
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn


def available(device: torch.device) -> bool:
    """Triton runs on CUDA GPUs, and on the CPU in its interpreter (TRITON_INTERPRET=1, set before triton's import)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def kernel():
    """Defined on first call, so that a process started with TRITON_INTERPRET=1 runs it on the CPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_matmul_kernel(x, packed, absmax, code, absmax2, code2, offset, out, M, N, K, K_PART,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE: tl.constexpr,
                          BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, IEEE: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)  # output columns = rows of W
        part = tl.program_id(1)
        rows = tl.arange(0, BM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # The 16 code values in registers, read by tl.gather: several times faster than a load per value.
        table = tl.broadcast_to(tl.load(code + tl.arange(0, 16))[None, :], (BN, 16))
        for k0 in range(part * K_PART, tl.minimum((part + 1) * K_PART, K), BK):
            ks = k0 + tl.arange(0, BK)
            xs = tl.load(x + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            half = k0 // 2 + tl.arange(0, BK // 2)  # byte c of a row holds W[n, 2c] (high nibble) and W[n, 2c + 1]
            valid = (cols[:, None] < N) & (half[None, :] < K // 2)
            byte = tl.load(packed + cols[:, None].to(tl.int64) * (K // 2) + half[None, :], mask=valid, other=0)
            byte = byte.to(tl.int32)
            # One scale per BLOCKSIZE values of a row (rows are whole blocks: K % BLOCKSIZE == 0), loaded once per tile
            # as (BN, BK / BLOCKSIZE) and spread over the block's BLOCKSIZE / 2 bytes.
            nth = tl.arange(0, BK // BLOCKSIZE)
            block = (cols[:, None].to(tl.int64) * K + k0) // BLOCKSIZE + nth[None, :]
            in_range = (cols[:, None] < N) & (k0 + nth[None, :] * BLOCKSIZE < K)
            if NESTED:  # QLoRA's double quantization: 8-bit codes of the scales, one fp32 scale per BLOCKSIZE2 of them
                scale = tl.load(code2 + tl.load(absmax + block, mask=in_range, other=0).to(tl.int32))
                scale = scale * tl.load(absmax2 + block // BLOCKSIZE2, mask=in_range, other=0.0) + tl.load(offset)
            else:
                scale = tl.load(absmax + block, mask=in_range, other=0.0)
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, BK // BLOCKSIZE, BLOCKSIZE // 2)), (BN, BK // 2))
            hi = tl.gather(table, byte >> 4, axis=1) * scale
            lo = tl.gather(table, byte & 15, axis=1) * scale
            w = tl.interleave(hi, lo).to(xs.dtype)  # (BN, BK), k in order
            if IEEE:
                acc += tl.dot(xs, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xs, tl.trans(w))
        tl.store(out + part * M * N + rows[:, None] * N + cols[None, :], acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    return nf4_matmul_kernel


# They set the shape of the operator's output (K parts), which its fake computes from them too.
DEFAULT_BK, DEFAULT_SPLIT_K = 128, 4


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               shape: Tuple[int, int], nested: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = None,
               BN: int = 64, BK: int = DEFAULT_BK, split_k: int = DEFAULT_SPLIT_K, num_warps: int = 4,
               num_stages: int = 3, parts: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, for a bitsandbytes 4-bit W of `shape` (N, K): `packed` its bytes,
    `absmax` its block scales (fp32, or their 8-bit codes when `nested` = (absmax2, code2, offset, blocksize2) holds
    the double quantization), `code` its 16-value table. split_k: K parts, each summed by its own programs (the
    defaults were the fastest for a Mistral-7B block at 1, 16 and 32 rows on an H100, benchmarks/gpu_nf4_gemm.py).
    parts: return the fp32 (parts, M, N) sums unsummed, so that a compiled caller fuses the sum into what follows."""
    import triton

    N, K = shape
    M = x.size(0)
    blocksize = N * K // absmax.numel()
    if K % blocksize or BK % blocksize:
        raise ValueError(f"nf4_matmul: rows of {K} values and steps of {BK} must be whole blocks of {blocksize}")
    BM = max(16, triton.next_power_of_2(M))
    k_part, n_parts = _k_parts(K, BK, split_k)
    out = torch.empty((n_parts, M, N), device=x.device, dtype=torch.float32)
    absmax2, code2, offset, blocksize2 = nested if nested is not None else (absmax, code, code, 1)
    kernel()[(-(-N // BN), out.size(0))](
        x.contiguous(), packed.reshape(-1), absmax, code.float(), absmax2.float(), code2.float(), offset.float(),
        out, M, N, K, k_part, BM=BM, BN=BN, BK=BK, BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2,
        NESTED=nested is not None, IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out if parts else out.sum(0).to(x.dtype)


def _k_parts(K: int, BK: int, split_k: int) -> Tuple[int, int]:
    """K per part (whole steps of BK) and how many parts: at most split_k."""
    k_part = -(-K // max(1, min(split_k, K // BK)) // BK) * BK
    return k_part, -(-K // k_part)


# An operator of its own, so that torch.compile treats the kernel launch as one opaque call with a known output shape.
@torch.library.custom_op("oneday::nf4_matmul", mutates_args=())
def nf4_matmul_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                  n: int, k: int, blocksize2: int) -> torch.Tensor:
    nested = (absmax2, code2, offset, blocksize2) if absmax2 is not None else None
    return nf4_matmul(x, packed, absmax, code, (n, k), nested, parts=True)


@nf4_matmul_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, n, k, blocksize2):
    return x.new_empty((_k_parts(k, DEFAULT_BK, DEFAULT_SPLIT_K)[1], x.size(0), n), dtype=torch.float32)


def scales_of(state) -> Tuple[torch.Tensor, Optional[tuple]]:
    """nf4_matmul's `absmax` and `nested` for a bitsandbytes QuantState: the fp32 block scales and None, or with
    double quantization their 8-bit codes and (absmax2, code2, offset, blocksize2)."""
    if not state.nested:
        return state.absmax.float(), None
    state2 = state.state2
    return state.absmax, (state2.absmax.float(), state2.code.float(), state.offset.float().reshape(1), state2.blocksize)


class FusedNF4Linear(nn.Module):
    """A bitsandbytes NF4 Linear4bit's forward through nf4_matmul_op, on the same bytes (nothing copied but the small
    code tables, in fp32). The fast decode step puts it in the layer's place for the step (generate/fast_decode.py)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        state = layer.weight.quant_state
        absmax, nested = scales_of(state)
        absmax2, code2, offset, self.blocksize2 = nested if nested is not None else (None, None, None, 1)
        self.register_buffer("packed", layer.weight.data, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("code", state.code.float(), persistent=False)
        self.register_buffer("absmax2", absmax2, persistent=False)
        self.register_buffer("code2", code2, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.bias, self.quant_state, self.compute_dtype = layer.bias, state, layer.compute_dtype
        self.out_features, self.in_features = layer.out_features, layer.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) == 1:  # bitsandbytes' gemv_4bit is the faster for one row (benchmarks/gpu_nf4_gemm.py)
            # as Linear4bit.forward calls it: in the layer's compute dtype, the output back in the input's
            y = bnb.matmul_4bit(rows.to(self.compute_dtype or rows.dtype), self.packed.t(),
                                quant_state=self.quant_state).to(x.dtype)
        else:  # the K parts' sum is left to the caller's compiled code, which fuses it into what follows
            y = nf4_matmul_op(rows, self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset,
                              self.out_features, self.in_features, self.blocksize2).sum(0).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def is_nf4(layer: nn.Module) -> bool:
    """A bitsandbytes NF4 layer whose rows are whole blocks of scales (every real model's are)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return (state is not None and getattr(state, "quant_type", None) == "nf4" and layer.weight.dim() == 2
            and layer.in_features % state.blocksize == 0)


def self_check(layers: List[Tuple[nn.Module, "FusedNF4Linear"]], dtype: torch.dtype) -> Optional[str]:
    """None if the kernel agrees with bitsandbytes on this device, else why not: (layer, its FusedNF4Linear) pairs,
    one of each shape checked, at 3 and 17 rows in `dtype` (one row runs bitsandbytes' own gemv), against the same rows
    times bitsandbytes' dequantized weight in fp32. Both multiply the same rounded weights with fp32 sums; in 16 bits
    the output's rounding to `dtype` is the difference (1.7e-3 in bf16 on an H100, benchmarks/gpu_nf4_gemm.py), so the
    limit is half the dtype's epsilon (3.9e-3 in bf16): a misread nibble or scale throughout is off by about 1, one
    wrong tile of 64 columns in the widest weight (14336) by a few 1e-2. Triton's CPU interpreter computes bf16 products
    wrongly (2026-12, Triton 3.9): there a bf16 model fails the check."""
    import bitsandbytes.functional as BF

    for layer, fused in {(m.out_features, m.in_features): (m, f) for m, f in layers}.values():
        w = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        for rows in (3, 17):
            x = torch.randn(rows, layer.in_features, device=w.device).to(dtype)
            # fp32 a slice of W at a time: a whole fp32 copy of the widest weight would raise the server's start-up
            # peak by hundreds of MB, on a card that may have no more to spare
            expected = torch.cat([x.float() @ part.float().t() for part in w.split(1024)], dim=-1)
            expected = expected + (0 if layer.bias is None else layer.bias.float())
            error = ((fused(x).float() - expected).norm() / expected.norm()).item()
            if not error < (1e-3 if dtype == torch.float32 else torch.finfo(dtype).eps / 2):
                return f"the kernel is off from bitsandbytes by {error:.1e} ({rows} rows, weight {tuple(w.shape)})"
    return None


def fused_layers(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module, FusedNF4Linear]]:
    """(parent, attribute, NF4 layer, its FusedNF4Linear) for every bitsandbytes NF4 layer of `model`."""
    return [(parent, name, layer, FusedNF4Linear(layer))
            for parent in model.modules() for name, layer in parent.named_children() if is_nf4(layer)]
