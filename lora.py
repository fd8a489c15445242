"""LoRA written out by hand (no peft): low-rank adapters on any subset of the model's linear layers.

`inject_lora(model, LoRAConfig(...))` swaps the chosen linears (plain, 4-bit or 8-bit) for `LoRALinear`, which adds
`scaling * B @ A @ x` to the frozen base output. Our attention has ONE fused `attn.qkv` projection with rows
[q | k | v] (k and v have n_query_groups * head_size rows under grouped-query attention), so a LoRALinear carries
one (A, B) pair per *part* of its output rows and adds each part's delta to exactly those rows: LoRA on q and v
never touches the k rows (lit-gpt shipped that bug for months; tests/test_lora.py checks every q/k/v subset).

LoRA weights stay fp32 (master weights, like peft) and are cast to the compute dtype on the fly: with bf16 weights,
updates smaller than 1/256 of a weight (routine at lr 2e-5) would round away.

An adapter file is a safetensors file with only the LoRA tensors; its metadata holds the settings that rebuild them
(rank, alpha, targets, base model shape), so merge and generate never need the flags repeated.
"""

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8
import model
from cli import InputError
from model import GPT, Config

# Canonical target names -> where they live. gate/up/down follow the Hugging Face names of the gated MLP; for a
# plain GELU MLP (GPT-NeoX) "up" is the single input projection (fc_1) and there is no "gate".
TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head")
PRESETS = {
    "all": ("q", "k", "v", "o", "gate", "up", "down"),  # every linear of the blocks ("all-linear" in peft)
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "qv": ("q", "v"),
}


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # > 0 leaves the fused LoRAMatmul for the slower generic path
    targets: Tuple[str, ...] = PRESETS["all"]

    def __post_init__(self):
        self.targets = parse_targets(self.targets)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def parse_targets(targets) -> Tuple[str, ...]:
    """"all" | "attn" | "mlp" | "qv" | "q,v,head" | a list of names -> the canonical, ordered tuple of targets."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    names = []
    for t in targets:
        t = t.lower()
        expanded = PRESETS.get(t, (t,))
        for name in expanded:
            if name not in TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; use presets {sorted(PRESETS)} or names from {list(TARGETS)}")
            names.append(name)
    if not names:
        raise ValueError(f"no LoRA targets given; use presets {sorted(PRESETS)} or names from {list(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


class LoRALinear(nn.Module):
    """base(x) + scaling * B A dropout(x), with one (A, B) pair per part of the output rows.

    `parts` lists (start, end) row ranges of the base output that get an adapter; default: all rows. For the fused
    qkv projection with LoRA on q and v only, parts = [(0, q_rows), (q_rows + k_rows, out)] and the k rows get zero.
    `lora_A` stacks the parts' A matrices (n_parts * r, in) so the down-projection is one matmul; `lora_B` stacks
    their B matrices (rows of all parts, r).
    """

    fused_matmul = True  # class-wide switch: False forces the generic path (the unoptimised reference)
    fp8_matmul = None  # class-wide switch (fp8.py; finetune/lora.py --fp8): the fused path's base matmuls in FP8:
    #                    "grad" the input-gradient matmul of the backward pass only, "all" the forward ones too
    fused_mlp = True  # class-wide switch: False runs a gated MLP's three layers as LoRAMatmul, LoRAMatmul and
    #                   SwiGLULoRAMatmul (the previous path, kept for comparison: benchmark_finetune.py +unfusedmlp)
    recompute_inputs = True  # class-wide switch (finetune/lora.py --recompute_inputs): the fused path recomputes an
    #                          RMSNorm output or SwiGLU product it reads in its backward pass; False keeps them
    #                          (more memory, less time: see LoRAMatmul)

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 parts: Optional[Sequence[Tuple[int, int]]] = None) -> None:
        super().__init__()
        self.base = base  # nn.Linear, bnb Linear4bit or Linear8bitLt; frozen
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = [tuple(p) for p in (parts or [(0, self.out_features)])]
        self.r, self.scaling = r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device if base.weight.device.type != "meta" else None
        n_rows = sum(end - start for start, end in self.parts)
        self.lora_A = nn.Parameter(torch.empty(len(self.parts) * r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(n_rows, r, device=device, dtype=torch.float32))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # As in the LoRA paper and peft: A random (Kaiming-uniform), B zero, so training starts at the base model.
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def covers_all_rows(self) -> bool:
        return self.parts == [(0, self.out_features)]

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), shaped like the base output (zero on rows without an adapter)."""
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype)) * self.scaling  # (..., n_parts * r): small, scale here
        return F.linear(h, self.placed_B(x.dtype))

    def placed_B(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, n_parts * r): part i's B on its own rows and its own r columns, zeros elsewhere. One matmul then
        gives every part's delta on exactly its rows (a block-diagonal B when q, k and v all have adapters)."""
        B = self.lora_B.to(dtype)
        if self.covers_all_rows:
            return B
        placed = B.new_zeros(self.out_features, len(self.parts) * self.r)
        row = 0
        for i, (start, end) in enumerate(self.parts):
            placed[start:end, i * self.r:(i + 1) * self.r] = B[row:row + end - start]
            row += end - start
        return placed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.takes_fused_path:
            B = self.lora_B if self.covers_all_rows else self.placed_B(torch.float32)
            return LoRAMatmul.apply(x, self.lora_A, B, self.scaling, self.base, self.fp8_mode, self.recompute_inputs)
        return self.base(x) + self.lora_delta(x)

    def swiglu_forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """self(swiglu(gate, up)) for the down projection of a gated MLP (model.MLP calls it). In training the fused
        path keeps gate and up (which SwiGLU's backward needs anyway) instead of also keeping their product, the
        widest activation of the block, and recomputes the product in the backward pass."""
        if self.merged or not (self.takes_fused_path and self.covers_all_rows):
            return self(model.swiglu(gate, up))
        return SwiGLULoRAMatmul.apply(gate, up, self.lora_A, self.lora_B, self.scaling, self.base, self.fp8_mode,
                                      self.recompute_inputs)

    def gated_mlp_forward(self, x: torch.Tensor, fc_1: nn.Module, fc_2: nn.Module) -> torch.Tensor:
        """self(swiglu(fc_1(x), fc_2(x))) for the down projection of a gated MLP (model.MLP calls it). When the gate
        and up projections are fused-path LoRA layers too, the whole MLP runs as one: their adapters' outputs
        are added inside the SwiGLU kernel instead of into the widest tensors of the block (lora_gated_mlp)."""
        layers = (fc_1, fc_2, self)
        fusable = all(isinstance(m, LoRALinear) and not m.merged and m.takes_fused_path and m.covers_all_rows
                      for m in layers)
        # On a GPU only with the Triton kernels: the plain ones keep more memory than the path below. On a CPU (the
        # tests) the plain ones compute the same math.
        kernels = x.device.type == "cpu" or (swiglu_lora is not _PLAIN["swiglu_lora"]
                                             and kernels_take(x.dtype, fc_1.r, fc_2.r, fc_1.scaling, fc_2.scaling))
        if self.fused_mlp and fusable and kernels and len({m.fp8_mode for m in layers}) == 1:
            return lora_gated_mlp(x, layers, self.fp8_mode, self.recompute_inputs)
        return self.swiglu_forward(fc_1(x), fc_2(x))

    @property
    def takes_fused_path(self) -> bool:
        """LoRAMatmul serves training without dropout on plain and 4-bit bases; int8 (bnb's outlier matmul), dropout
        and inference (bnb's 4-bit matrix-vector kernel, no dequantization) take the generic path."""
        return (self.fused_matmul and torch.is_grad_enabled() and isinstance(self.dropout, nn.Identity)
                and (not is_bnb(self.base) or type(self.base).__name__ != "Linear8bitLt"))

    @property
    def fp8_mode(self) -> Optional[str]:
        """Which of the fused path's base matmuls run in FP8 for this layer: LoRALinear.fp8_matmul ("grad" or "all")
        if its shape takes FP8, else None."""
        return self.fp8_matmul if self.fp8_matmul and fp8.supported(self.base) is None else None

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) fp32 matrix that merging adds to the base weight."""
        return delta_weight(self.lora_A, self.lora_B, self.parts, self.r, self.scaling, self.out_features)

    def merge(self) -> None:
        """Folds the adapter into the base weight. A quantized base is dequantized first (see quantize.py), which
        makes the layer a plain linear of the compute dtype: there is no way back to 4 bits without new error."""
        if self.merged:
            return
        if is_bnb(self.base):
            from quantize import dequantized_linear

            self.base = dequantized_linear(self.base)
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False


class LoRAMatmul(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T in as few kernels as the math allows, for LoRA without dropout.

    W is the frozen base weight: a plain linear's, or a 4-bit layer's dequantized on the spot (once in forward, once
    in backward; never kept). The adapter's output is accumulated into the base output by one addmm, so no separate
    delta tensor is written and read back. Saved for backward: x (shared with any other layer that reads the same
    tensor; when x is an RMSNorm's output, the norm's input instead, see forward), the small x A^T, and bf16 copies
    of A and B. Gradients of the fp32 A and B come back in fp32; the base matmul of the backward pass is skipped when
    x needs no gradient (the first layer's input). With fp8_mode ("grad" or "all", LoRALinear.fp8_matmul) the base
    matmul of the backward pass (and with "all" of the forward pass) runs in FP8 (fp8.py).

    recompute=False (LoRALinear.recompute_inputs) keeps x even when it is a norm's output. For Mistral-7B that is
    two (tokens, 4096) tensors per block, plus the gated MLP's (tokens, 14336) SwiGLU product (SwiGLULoRADown or
    SwiGLULoRAMatmul): 1.35 GiB per 1,000 tokens of a micro-batch, for 128 fewer elementwise kernels a step.
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling, base, fp8_mode, recompute=True):
        y, h, A_c, B_c = lora_matmul(x, A, B, scaling, base, fp8_mode == "all")
        ctx.norm, x_in = norm_source(x, recompute)
        ctx.save_for_backward(x_in, h, A_c, B_c)
        ctx.scaling, ctx.base, ctx.fp8_mode = scaling, base, fp8_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, A_c, B_c = ctx.saved_tensors
        x = renormed(ctx.norm, x)
        dx, dA, dB = lora_matmul_backward(dy, x, h, A_c, B_c, ctx.scaling, ctx.base, ctx.needs_input_grad[0],
                                          ctx.fp8_mode is not None)
        return dx, dA, dB, None, None, None, None


class SwiGLULoRAMatmul(torch.autograd.Function):
    """LoRAMatmul of swiglu(gate, up), saving gate and up but not their product (see LoRALinear.swiglu_forward)."""

    @staticmethod
    def forward(ctx, gate, up, A, B, scaling, base, fp8_mode, recompute=True):
        act = model.swiglu(gate, up)
        y, h, A_c, B_c = lora_matmul(act, A, B, scaling, base, fp8_mode == "all")
        ctx.save_for_backward(gate, up, h, A_c, B_c, *(() if recompute else (act,)))
        ctx.scaling, ctx.base, ctx.fp8_mode = scaling, base, fp8_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, h, A_c, B_c, *kept = ctx.saved_tensors
        # Recomputed unless kept: one cheap fused kernel instead of a stored (tokens, 3.5-5x dim) tensor.
        act = kept.pop() if kept else model.swiglu(gate, up)
        d_act, dA, dB = lora_matmul_backward(dy, act, h, A_c, B_c, ctx.scaling, ctx.base, True,
                                             ctx.fp8_mode is not None)
        del act  # before d_gate and d_up exist, the widest point of a block's backward pass (unless ctx kept it)
        d_gate, d_up = model.swiglu_backward(gate, up, d_act)
        return d_gate, d_up, dA, dB, None, None, None, None


def lora_gated_mlp(x, layers, fp8_mode: Optional[str], recompute: bool = True) -> torch.Tensor:
    """down(swiglu(gate(x), up(x))) for the three LoRA layers (gate, up, down) of a gated MLP, without dropout
    (LoRALinear.gated_mlp_forward).

    LoRAMatmul for each of the three, except where the gate and up adapters' outputs go. LoRAMatmul adds them into
    the base outputs: a read and a write of a (tokens, intermediate) tensor each, the widest of the block. Here the
    base outputs g and u are kept instead (LoRAGateUp), and swiglu_lora adds the adapters' rank-r products inside the
    SwiGLU kernel (SwiGLULoRADown). The backward pass does the same with the down projection's input gradient:
    swiglu_lora_backward adds its adapter's part inside the kernel that computes d gate and d up (and recomputes the
    SwiGLU product, unless recompute=False kept it). On a GPU (compile_kernels) that is three fewer passes over such a
    tensor per block and step. Two autograd functions, not one, so that g and u are freed before the gate and up
    projections' input gradients are computed, as with three LoRAMatmuls.
    """
    gate, up, down = layers
    g, u, h_g, h_u = LoRAGateUp.apply(x, gate.lora_A, up.lora_A, gate.base, up.base, fp8_mode, recompute)
    y = SwiGLULoRADown.apply(g, u, h_g, h_u, gate.lora_B, up.lora_B, down.lora_A, down.lora_B, layers, fp8_mode,
                             recompute)
    return y.view(*x.shape[:-1], y.shape[-1])


class LoRAGateUp(torch.autograd.Function):
    """(x W_g^T, x W_u^T, x A_g^T, x A_u^T) for the gate and up projections: their base outputs and the adapters'
    down-projections, without the adapters' outputs, which SwiGLULoRADown adds (lora_gated_mlp)."""

    @staticmethod
    def forward(ctx, x, A_g, A_u, base_g, base_u, fp8_mode, recompute=True):
        in_fp8 = fp8_mode == "all"
        x2 = x.reshape(-1, x.shape[-1])
        A_gc, A_uc = A_g.to(x.dtype), A_u.to(x.dtype)
        g, u = base_matmul(x2, base_g, in_fp8), base_matmul(x2, base_u, in_fp8)
        ctx.norm, x_in = norm_source(x, recompute)
        ctx.save_for_backward(x_in, A_gc, A_uc)
        ctx.bases, ctx.in_fp8 = (base_g, base_u), fp8_mode is not None
        return g, u, x2 @ A_gc.t(), x2 @ A_uc.t()

    @staticmethod
    def backward(ctx, d_g, d_u, dh_g, dh_u):
        x, A_gc, A_uc = ctx.saved_tensors
        x = renormed(ctx.norm, x)
        x2 = x.reshape(-1, x.shape[-1])
        dA_g, dA_u = (dh_g.t() @ x2).float(), (dh_u.t() @ x2).float()
        dx = None
        if ctx.needs_input_grad[0]:
            base_g, base_u = ctx.bases
            dx = base_input_grad(d_g, base_g, ctx.in_fp8)
            if ctx.in_fp8:
                dx += base_input_grad(d_u, base_u, True)
            else:
                dx.addmm_(d_u, base_weight(base_u, d_u.dtype))
            dx.addmm_(dh_g, A_gc).addmm_(dh_u, A_uc)
            dx = dx.view_as(x)
        return dx, dA_g, dA_u, None, None, None, None


class SwiGLULoRADown(torch.autograd.Function):
    """down(swiglu(g + s_g h_g B_g^T, u + s_u h_u B_u^T)): the gate and up adapters' outputs added inside the SwiGLU
    kernels, then the down projection as in LoRAMatmul (lora_gated_mlp)."""

    @staticmethod
    def forward(ctx, g, u, h_g, h_u, B_g, B_u, A_d, B_d, layers, fp8_mode, recompute=True):
        gate, up, down = layers
        B_gc, B_uc = B_g.to(g.dtype), B_u.to(u.dtype)
        act = swiglu_lora(g, u, h_g, B_gc, gate.scaling, h_u, B_uc, up.scaling)
        y, h_d, A_dc, B_dc = lora_matmul(act, A_d, B_d, down.scaling, down.base, fp8_mode == "all")
        ctx.save_for_backward(g, u, h_g, h_u, B_gc, B_uc, h_d, A_dc, B_dc, *(() if recompute else (act,)))
        ctx.layers, ctx.in_fp8 = layers, fp8_mode is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u, h_g, h_u, B_gc, B_uc, h_d, A_dc, B_dc, *kept = ctx.saved_tensors
        gate, up, down = ctx.layers
        dh_d, dB_d = adapter_grads(dy, h_d, B_dc, down.scaling)  # dh_d: the gradient reaching act A_d^T
        d_act = base_input_grad(dy, down.base, ctx.in_fp8)
        d_g, d_u, act = swiglu_lora_backward(g, u, h_g, B_gc, gate.scaling, h_u, B_uc, up.scaling, d_act, dh_d, A_dc,
                                             not kept)
        dA_d = dh_d.t() @ (kept[0] if kept else act)
        del act, d_act
        dh_g, dB_g = adapter_grads(d_g, h_g, B_gc, gate.scaling)
        dh_u, dB_u = adapter_grads(d_u, h_u, B_uc, up.scaling)
        return (d_g, d_u, dh_g, dh_u, dB_g.float(), dB_u.float(), dA_d.float(), dB_d.float(), None, None, None)


def norm_source(x: torch.Tensor, recompute: bool):
    """(norm, x_in) when x = norm(x_in) (model.RMSNorm tags its output) and may be recomputed: a fused matmul then
    keeps x_in, which the norm keeps for its own backward anyway, and recomputes x in backward (renormed), one cheap
    elementwise kernel, instead of keeping a second tensor. (None, x) otherwise."""
    if recompute and hasattr(x, "normed_from"):
        norm, source, source_version, version = x.normed_from
        src = source()
        if src is not None and src._version == source_version and x._version == version:
            return norm, src
    return None, x


def renormed(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return x
    with torch.no_grad():
        return norm.forward(x)  # not norm(x): the module's hooks ran in the forward pass already


def lora_matmul(x, A, B, scaling: float, base: nn.Module, in_fp8: bool = False):
    """LoRAMatmul's forward math: (y, x A^T, A and B in x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    A_c, B_c = A.to(x.dtype), B.to(x.dtype)
    y = base_matmul(x2, base, in_fp8)
    h = x2 @ A_c.t()
    y.addmm_(h, B_c.t(), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1]), h, A_c, B_c


def adapter_grads(dy2: torch.Tensor, h: torch.Tensor, B_c: torch.Tensor, scaling: float):
    """For an adapter output scaling * h B^T that received the gradient dy2 (M, out): (the gradient reaching
    h = x A^T (M, rank), B's gradient (out, rank)), in dy2's dtype."""
    return (dy2 @ B_c) * scaling, (dy2.t() @ h) * scaling


def base_matmul(x2: torch.Tensor, base: nn.Module, in_fp8: bool) -> torch.Tensor:
    """x2 (M, in) @ W^T (+ bias) for the frozen base weight, in FP8 or in x2's dtype."""
    if in_fp8:
        return fp8.linear(x2, base)
    W = base_weight(base, x2.dtype)
    return x2 @ W.t() if base.bias is None else torch.addmm(base.bias.to(x2.dtype), x2, W.t())


def base_input_grad(dy2: torch.Tensor, base: nn.Module, in_fp8: bool) -> torch.Tensor:
    """dy2 (M, out) @ W: the gradient reaching a base layer's input."""
    return fp8.input_grad(dy2, base) if in_fp8 else dy2 @ base_weight(base, dy2.dtype)


def lora_matmul_backward(dy, x, h, A_c, B_c, scaling: float, base: nn.Module, need_dx: bool, in_fp8: bool = False):
    """LoRAMatmul's backward math: (dx or None, fp32 dA, fp32 dB)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dh, dB = adapter_grads(dy2, h, B_c, scaling)
    dA = dh.t() @ x2
    dx = None
    if need_dx:
        dx = base_input_grad(dy2, base, in_fp8)
        dx.addmm_(dh, A_c)
        dx = dx.view_as(x)
    return dx, dA.float(), dB.float()


def base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen (out, in) weight a plain or 4-bit base layer computes with, in `dtype`."""
    if not is_bnb(base):
        return base.weight.to(dtype)
    from quantize import dequantize_weight

    return dequantize_weight(base).to(dtype)


# lora_gated_mlp's SwiGLU with the gate and up adapters added inside. Plain PyTorch here: the reference, and what a CPU
# runs; compile_kernels swaps in the Triton kernels of triton_kernels on a GPU.

def swiglu_lora(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float) -> torch.Tensor:
    """swiglu(g + s_g h_g B_g^T, u + s_u h_u B_u^T): g and u (M, N) the gate and up projections' base outputs, h
    (M, r) = x A^T and B (N, r) their adapters'."""
    return model.swiglu(*with_adapters(g, u, h_g, B_g, s_g, h_u, B_u, s_u))


def with_adapters(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float):
    """(g + s_g h_g B_g^T, u + s_u h_u B_u^T): the gate and up projections' outputs, as new tensors."""
    return torch.addmm(g, h_g, B_g.t(), alpha=s_g), torch.addmm(u, h_u, B_u.t(), alpha=s_u)


def swiglu_lora_backward(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float, d, dh, A, need_act: bool):
    """(d gate, d up, swiglu_lora's output or None) for the gradient d + dh A reaching swiglu_lora's output: d (M, N)
    the down projection's base input gradient, dh (M, r) (scaled) and A (r, N) its adapter's part. The Triton
    version writes the output over d."""
    gate, up = with_adapters(g, u, h_g, B_g, s_g, h_u, B_u, s_u)
    act = model.swiglu(gate, up) if need_act else None
    d_gate, d_up = model.swiglu_backward(gate, up, torch.addmm(d, dh, A))
    return d_gate, d_up, act


def triton_kernels():
    """swiglu_lora and swiglu_lora_backward as Triton kernels (lora_kernels.py, imported on first call so that a
    process started with TRITON_INTERPRET=1 runs them on the CPU, as the tests do)."""
    import lora_kernels

    return lora_kernels.swiglu_lora, lora_kernels.swiglu_lora_backward


_PLAIN = {"swiglu_lora": swiglu_lora, "swiglu_lora_backward": swiglu_lora_backward}


def kernels_take(dtype: torch.dtype, r_g: int, r_u: int, s_g: float, s_u: float) -> bool:
    """Whether the Triton kernels take a gate and up projection's adapters of these ranks and scalings in this
    dtype: bf16 or fp16, one rank, scalings not 0 (the kernels divide by them). lora_kernels.py runs the plain
    versions otherwise, which LoRALinear.gated_mlp_forward avoids on a GPU."""
    return dtype in (torch.bfloat16, torch.float16) and r_g == r_u and s_g != 0 and s_u != 0


def compile_kernels(enable: bool = True, rank: int = 16) -> None:
    """On a GPU: swiglu_lora and swiglu_lora_backward become the Triton kernels of triton_kernels() (enable=False
    puts the plain versions back). finetune/lora.py does this with --fused on a GPU. The kernels are first compiled
    for the LoRA `rank` and checked against the plain versions on a small input on this GPU (self_check); if that
    fails or they disagree, they are not used, with a warning (and LoRALinear.gated_mlp_forward then runs the gated
    MLP as three LoRA matmuls)."""
    g = globals()
    g.update(_PLAIN)
    if enable:
        try:
            kernels = triton_kernels()
            error = self_check(*kernels, rank=rank)
        except Exception as e:  # no Triton, an older GPU, out of resources at this rank
            print(f"Warning: lora.py's Triton SwiGLU kernels did not run on this GPU ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); using the (slower) PyTorch path", file=sys.stderr)
            return
        if error < 1e-2:
            g["swiglu_lora"], g["swiglu_lora_backward"] = kernels
        else:
            print(f"Warning: lora.py's Triton SwiGLU kernels differ from the PyTorch versions by {error:.1%} on this "
                  "GPU; using the (slower) PyTorch path", file=sys.stderr)


def self_check(forward, backward, device: str = "cuda", rank: int = 12) -> float:
    """The largest relative error (norm of the difference / norm) of the kernels' outputs against _PLAIN's on a
    random bf16 input on `device` at this LoRA rank; sizes that leave partial tiles, so the masks are exercised.
    Rounding differences give ~1e-3; a kernel that drops or misplaces an adapter's product gives ~1e-1."""
    gen = torch.Generator(device=device).manual_seed(0)
    M, N, r = 200, 328, rank

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * std).to(torch.bfloat16)

    g, u, d, h_g, h_u, dh = rand(M, N), rand(M, N), rand(M, N), rand(M, r), rand(M, r), rand(M, r)
    B_g, B_u, A = rand(N, r, std=0.2), rand(N, r, std=0.2), rand(r, N, std=0.2)
    args = (g, u, h_g, B_g, 0.5, h_u, B_u, 2.0)
    got = [forward(*args), *backward(*args, d.clone(), dh, A, True)]
    want = [_PLAIN["swiglu_lora"](*args), *_PLAIN["swiglu_lora_backward"](*args, d, dh, A, True)]
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want))


def is_bnb(module: nn.Module) -> bool:
    """bitsandbytes layers subclass nn.Linear, so isinstance cannot tell them apart."""
    return type(module).__module__.startswith("bitsandbytes")


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, parts, r: int, scaling: float, out_features: int
                 ) -> torch.Tensor:
    """scaling * B_i @ A_i on each part's rows, zero elsewhere: (out, in) fp32."""
    delta = torch.zeros(out_features, lora_A.shape[1], device=lora_A.device, dtype=torch.float32)
    row = 0
    for i, (start, end) in enumerate(parts):
        delta[start:end] = lora_B[row:row + end - start].float() @ lora_A[i * r:(i + 1) * r].float() * scaling
        row += end - start
    return delta


def qkv_parts(config: Config, targets: Sequence[str]) -> List[Tuple[int, int]]:
    """Row ranges of the fused qkv projection that belong to the chosen q/k/v targets."""
    q = config.n_head * config.head_size
    kv = config.n_query_groups * config.head_size
    ranges = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    return [ranges[t] for t in ("q", "k", "v") if t in targets]


def target_modules(config: Config, lora: LoRAConfig) -> Dict[str, Optional[List[Tuple[int, int]]]]:
    """Qualified module names that get an adapter -> their row parts (None = all rows)."""
    if "gate" in lora.targets and not config.gated_mlp:
        raise ValueError(f"LoRA target 'gate': model {config.name!r} has a plain MLP without a gate; use 'up' (its fc_1)")
    found = {}
    for i in range(config.n_layer):
        prefix = f"blocks.{i}"
        parts = qkv_parts(config, lora.targets)
        if parts:
            found[f"{prefix}.attn.qkv"] = parts
        if "o" in lora.targets:
            found[f"{prefix}.attn.proj"] = None
        if "gate" in lora.targets:
            found[f"{prefix}.mlp.fc_1"] = None
        if "up" in lora.targets:
            found[f"{prefix}.mlp.fc_2" if config.gated_mlp else f"{prefix}.mlp.fc_1"] = None
        if "down" in lora.targets:
            found[f"{prefix}.mlp.proj"] = None
    if "head" in lora.targets:
        found["lm_head"] = None
    return found


def inject_lora(model: GPT, lora: LoRAConfig) -> GPT:
    """Replaces the targeted linears with LoRALinear (in place) and freezes everything but the LoRA weights."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parts in target_modules(model.config, lora).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        adapted = LoRALinear(base, lora.r, lora.alpha, lora.dropout, parts)
        setattr(parent, child, adapted.train(base.training))
    model.lora_config = lora
    return model


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if "lora_" in name.rpartition(".")[2]}


def merge_lora(model: GPT) -> None:
    """Folds every adapter into its base weight (in place; `unmerge_lora` undoes it for unquantized bases)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, LoRALinear) and head.base.weight is model.wte.weight:
        # A tied head shares the embedding: merging into it would change the embedding too. Give it its own copy.
        head.base.weight = nn.Parameter(model.wte.weight.detach().clone(), requires_grad=False)
        model.config.tie_embeddings = False
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def strip_lora(model: GPT) -> GPT:
    """Merges every adapter and puts the plain (merged) base linears back, so parameter names are the base's again."""
    merge_lora(model)
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    del model.lora_config
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Adapter files


def config_fingerprint(config: Config) -> str:
    """Hash of the fields that decide tensor shapes: an adapter fits any checkpoint with the same fingerprint."""
    shape_fields = ("vocab_size", "n_layer", "n_head", "n_query_groups", "n_embd", "head_size", "intermediate_size",
                    "gated_mlp", "bias", "attn_bias", "tie_embeddings")
    blob = json.dumps({k: getattr(config, k) for k in shape_fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_adapter(model: GPT, path: Path, extra: Optional[dict] = None) -> None:
    """LoRA tensors + their settings in the safetensors metadata; written atomically (see utils.save_safetensors)."""
    from utils import save_safetensors

    lora: LoRAConfig = model.lora_config
    settings = {"lora": lora.to_dict(), "base_model": model.config.name, "base_fingerprint": config_fingerprint(model.config),
                **(extra or {})}
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_safetensors(tensors, Path(path), metadata={"oneday_adapter": json.dumps(settings)})


def read_adapter(path: Path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(settings, tensors) of an adapter file; one clear error if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "adapter.safetensors"
    if not path.is_file():
        raise InputError(f"{path}: adapter not found; pass the adapter.safetensors written by finetune/lora.py")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if "oneday_adapter" not in meta:
        raise InputError(f"{path}: no LoRA settings in its metadata; it was not written by finetune/lora.py")
    return json.loads(meta["oneday_adapter"]), tensors


def check_adapter_fits(settings: dict, config: Config, path: Path) -> None:
    """The one error for an adapter trained on a model of another shape."""
    if settings["base_fingerprint"] != config_fingerprint(config):
        raise InputError(f"{path}: adapter was trained on {settings['base_model']!r}, which has another shape than "
                         f"base model {config.name!r}; pass the base checkpoint it was trained on (--checkpoint_dir)")


def load_adapter(model: GPT, path: Path) -> dict:
    """Injects LoRA as the adapter file says and loads its weights; returns the adapter's settings."""
    settings, tensors = read_adapter(path)
    check_adapter_fits(settings, model.config, Path(path))
    if not hasattr(model, "lora_config"):
        inject_lora(model, LoRAConfig(**settings["lora"]))
    params = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(tensors) != expected:
        raise InputError(f"{path}: adapter tensors do not match its own settings "
                         f"({sorted(set(tensors) ^ expected)[:3]} ...); "
                         "the file is corrupt, use another checkpoint")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return settings
