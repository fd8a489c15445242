"""Triton kernels for the fast path's gated MLP (fast/fused.py, lora_gated_mlp): SwiGLU with the gate and up adapters
added inside.

Each kernel reads its (tokens, intermediate) inputs once and writes its outputs once; the adapters' rank-r products
are computed per tile on the tensor cores, and the sums are rounded to the input dtype where fast.fused.swiglu_lora
(the plain PyTorch version, the reference) rounds them. fast.speed_up uses them on a GPU after checking them against
the plain versions (fast.fused.checked_triton_kernels); the tests run them in fp16 under Triton's CPU interpreter
(TRITON_INTERPRET=1; Triton 3.5's interpreter gets bf16 dots wrong and rounds to bf16 by truncation). Imported only
there, so that machines without Triton never need it. This file imports nothing of the project's: the caller checks
that the kernels take its inputs (fast.fused.kernels_take).
"""

import os

import torch
import triton
import triton.language as tl

TILE = (32, 128)  # (rows, columns) per program, 4 warps: with (16, 256) the fastest of the shapes that
#                   benchmarks/gpu_lora_kernels.py times, on an H100 for Mistral-7B's MLP
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def add_low_rank(x, s, h, B, stride_bn, stride_br, rows, cols, M, N, R: tl.constexpr, RP: tl.constexpr):
    # x + s h B^T on a tile of fp32 x: h (M, R) contiguous, element (n, r) of B at B + n * stride_bn + r * stride_br,
    # the rank padded with zeros to RP (a power of two >= 16, what tl.dot takes). The tensor cores accumulate the
    # product onto x / s: adding it after the dot instead (a layout conversion between the two) made the kernels
    # slower on an H100 (docs/speed/h100_2026-11-24_f.md). The fp32 division and multiplication round far
    # below the bf16 result.
    r = tl.arange(0, RP)
    ht = tl.load(h + rows[:, None] * R + r[None, :], mask=(rows[:, None] < M) & (r[None, :] < R), other=0.0)
    bt = tl.load(B + cols[None, :] * stride_bn + r[:, None] * stride_br, mask=(cols[None, :] < N) & (r[:, None] < R),
                 other=0.0)
    return tl.dot(ht, bt, acc=x / s) * s


@triton.jit
def gate_up(g, u, h_g, B_g, s_g, h_u, B_u, s_u, offs, mask, rows, cols, M, N, R: tl.constexpr, RP: tl.constexpr):
    # g + s_g h_g B_g^T and u + s_u h_u B_u^T on a tile, rounded to g's dtype, in fp32
    dtype = g.dtype.element_ty
    gate = add_low_rank(tl.load(g + offs, mask=mask, other=0.0).to(tl.float32), s_g, h_g, B_g, R, 1, rows, cols, M,
                        N, R, RP)
    up = add_low_rank(tl.load(u + offs, mask=mask, other=0.0).to(tl.float32), s_u, h_u, B_u, R, 1, rows, cols, M, N,
                      R, RP)
    return gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)


@triton.jit
def forward_kernel(g, u, h_g, B_g, s_g, h_u, B_u, s_u, out, M, N, R: tl.constexpr, RP: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    offs, mask = rows[:, None] * N + cols[None, :], (rows[:, None] < M) & (cols[None, :] < N)
    gate, up = gate_up(g, u, h_g, B_g, s_g, h_u, B_u, s_u, offs, mask, rows, cols, M, N, R, RP)
    tl.store(out + offs, (gate * tl.sigmoid(gate) * up).to(out.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(g, u, h_g, B_g, s_g, h_u, B_u, s_u, d, dh, A, d_gate, d_up, M, N, R: tl.constexpr,
                    RP: tl.constexpr, R2: tl.constexpr, RP2: tl.constexpr, WRITE_ACT: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    offs, mask = rows[:, None] * N + cols[None, :], (rows[:, None] < M) & (cols[None, :] < N)
    dtype = d.dtype.element_ty
    gate, up = gate_up(g, u, h_g, B_g, s_g, h_u, B_u, s_u, offs, mask, rows, cols, M, N, R, RP)
    grad = tl.load(d + offs, mask=mask, other=0.0).to(tl.float32)
    grad = add_low_rank(grad, 1.0, dh, A, 1, N, rows, cols, M, N, R2, RP2).to(dtype).to(tl.float32)  # A is (R2, N)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(d_gate + offs, (grad * up * sig * (1 + gate * (1 - sig))).to(dtype), mask=mask)
    tl.store(d_up + offs, (grad * silu).to(dtype), mask=mask)
    if WRITE_ACT:  # over d: this program has read its tile of d already, and no other program reads it
        tl.store(d + offs, (silu * up).to(dtype), mask=mask)


def padded(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def grid(g: torch.Tensor, tile):
    return triton.cdiv(g.shape[0], tile[0]), triton.cdiv(g.shape[1], tile[1])


def check(g: torch.Tensor, h_g: torch.Tensor, h_u: torch.Tensor, s_g: float, s_u: float) -> None:
    if (not (g.is_cuda or INTERPRET) or g.dtype not in (torch.bfloat16, torch.float16) or h_g.shape[1] != h_u.shape[1]
            or s_g == 0 or s_u == 0):
        raise ValueError(f"the Triton SwiGLU kernels take bf16 or fp16 on a GPU, one LoRA rank and scalings other than "
                         f"0, not {g.dtype} on {g.device}, ranks {h_g.shape[1]} and {h_u.shape[1]}, scalings {s_g} "
                         f"and {s_u} (fast.fused.kernels_take tells before the call)")


def swiglu_lora(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float, tile=TILE) -> torch.Tensor:
    """fast.fused.swiglu_lora in one kernel (programs of `tile` rows x columns)."""
    check(g, h_g, h_u, s_g, s_u)
    g, u, h_g, B_g, h_u, B_u = (t.contiguous() for t in (g, u, h_g, B_g, h_u, B_u))
    out = torch.empty_like(g)
    R = h_g.shape[1]
    forward_kernel[grid(g, tile)](g, u, h_g, B_g, s_g, h_u, B_u, s_u, out, g.shape[0], g.shape[1], R=R,
                                  RP=padded(R), BM=tile[0], BN=tile[1], num_warps=4)
    return out


def swiglu_lora_backward(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float, d, dh, A, need_act: bool, tile=TILE):
    """fast.fused.swiglu_lora_backward in one kernel; the SwiGLU product (need_act) is written over d."""
    check(g, h_g, h_u, s_g, s_u)
    g, u, h_g, B_g, h_u, B_u, d, dh, A = (t.contiguous() for t in (g, u, h_g, B_g, h_u, B_u, d, dh, A))
    d_gate, d_up = torch.empty_like(g), torch.empty_like(u)
    R, R2 = h_g.shape[1], dh.shape[1]
    backward_kernel[grid(g, tile)](g, u, h_g, B_g, s_g, h_u, B_u, s_u, d, dh, A, d_gate, d_up, g.shape[0],
                                   g.shape[1], R=R, RP=padded(R), R2=R2, RP2=padded(R2), WRITE_ACT=need_act,
                                   BM=tile[0], BN=tile[1], num_warps=4)
    return d_gate, d_up, (d if need_act else None)
