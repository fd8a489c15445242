"""The fast path's modules: the same parameters and math as model.py and lora.py, in fewer kernels and less memory.

fast.speed_up swaps each module's class for the subclass below (parameters, names and state_dict keys unchanged):

- FusedLoRALinear: a LoRA layer's training forward and backward as one autograd function (LoRAMatmul), with its base
  matmuls optionally in FP8 (fast/fp8.py);
- FastMLP: a gated MLP whose three layers all have adapters runs as one (lora_gated_mlp): the gate and up adapters'
  outputs are added inside the SwiGLU kernel instead of into the block's widest tensors;
- FastBlock and FastRMSNorm: the residual add after attention and the norm after it in one kernel; each norm output
  is tagged so that a fused matmul reading it can keep the norm's input instead and recompute it (norm_source);
- FastAttention: RoPE as one compiled kernel; packed rows' attention through FlexAttention with a BlockMask
  (fast/attention.py).

Which kernels run is a Kernels object per model: the plain PyTorch functions (the reference), or torch.compile'd
versions of them and the Triton kernels of fast/kernels.py, each checked against its plain version before use.
"""

import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import flex_attention

import model
from cli import one_line
from fast import attention, fp8
from fast.attention import BlockMask
from lora import LoRALinear, is_bnb

# ---------------------------------------------------------------------------------------------------------------------
# Plain elementwise math the fast path adds to model.py's: what a CPU runs, and the reference of every kernel.


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + h, rms_norm(x + h)): a residual add and the norm after it; compiled, one kernel each way."""
    x = x + h
    return x, model.rms_norm(x, weight, eps)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """Gradients of swiglu(gate, up) for an incoming gradient, in fp32 inside: (d gate, d up)."""
    g, u, d = gate.float(), up.float(), grad.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    return (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (d * silu).to(up.dtype)


def swiglu_lora(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float, swiglu: Callable = model.swiglu) -> torch.Tensor:
    """swiglu(g + s_g h_g B_g^T, u + s_u h_u B_u^T): g and u (M, N) the gate and up projections' base outputs, h
    (M, r) = x A^T and B (N, r) their adapters'. fast/kernels.py computes it in one Triton kernel."""
    return swiglu(*with_adapters(g, u, h_g, B_g, s_g, h_u, B_u, s_u))


def with_adapters(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float):
    """(g + s_g h_g B_g^T, u + s_u h_u B_u^T): the gate and up projections' outputs, as new tensors."""
    return torch.addmm(g, h_g, B_g.t(), alpha=s_g), torch.addmm(u, h_u, B_u.t(), alpha=s_u)


def swiglu_lora_backward(g, u, h_g, B_g, s_g: float, h_u, B_u, s_u: float, d, dh, A, need_act: bool,
                         swiglu: Callable = model.swiglu, swiglu_backward: Callable = swiglu_backward):
    """(d gate, d up, swiglu_lora's output or None) for the gradient d + dh A reaching swiglu_lora's output: d (M, N)
    the down projection's base input gradient, dh (M, r) (scaled) and A (r, N) its adapter's part. The Triton
    version writes the output over d."""
    gate, up = with_adapters(g, u, h_g, B_g, s_g, h_u, B_u, s_u)
    act = swiglu(gate, up) if need_act else None
    d_gate, d_up = swiglu_backward(gate, up, torch.addmm(d, dh, A))
    return d_gate, d_up, act


# ---------------------------------------------------------------------------------------------------------------------
# Which kernels a fast model runs


@dataclass(frozen=True)
class Kernels:
    """The implementation of each elementwise step a fast model calls; one object per model (fast.speed_up)."""
    rms_norm: Callable = model.rms_norm
    add_rms_norm: Callable = add_rms_norm
    apply_rope: Callable = model.apply_rope
    swiglu: Callable = model.swiglu
    swiglu_backward: Callable = swiglu_backward
    swiglu_lora: Callable = swiglu_lora
    swiglu_lora_backward: Callable = swiglu_lora_backward
    triton_mlp: bool = False  # swiglu_lora and swiglu_lora_backward are fast/kernels.py's
    fp8: "fp8.Kernels" = fp8.PLAIN  # the FP8 matmuls' (fast/fp8.py)
    # packed rows' attention over a BlockMask (fast/attention.py); None: fast.packed_mask gives them model.py's dense
    # document mask instead
    flex_attention: Optional[Callable] = None


PLAIN = Kernels()
ELEMENTWISE = ("rms_norm", "add_rms_norm", "apply_rope", "swiglu", "swiglu_backward")


def choose_kernels(compile_ops: bool, on_gpu: bool, rank: int = 16, fp8_on: bool = False,
                   backend: str = "inductor", attention_shape: Optional[tuple] = None) -> Kernels:
    """PLAIN, or: RMSNorm (alone and after a residual add), RoPE and SwiGLU (forward and backward) torch.compile'd,
    and on a GPU the Triton SwiGLU kernels (checked_triton_kernels), compiled FlexAttention for packed rows and with
    FP8 the FP8 kernels (fp8.gpu_kernels).

    Eager PyTorch runs each elementwise step as several kernels that write fp32 or bf16 intermediates and keeps
    several for the backward pass; compiled, each is one fused kernel forward and one backward that keep only their
    inputs. Matmuls are untouched, and so is attention over unpacked rows (SDPA's causal flash kernel). FlexAttention
    only pays compiled (eager, it computes the whole score matrix) and has no backward pass on a CPU."""
    if not compile_ops:
        return PLAIN
    ops = {name: compiled(getattr(PLAIN, name), backend) for name in ELEMENTWISE}
    triton = checked_triton_kernels(rank) if on_gpu else None
    mlp = triton or (functools.partial(swiglu_lora, swiglu=ops["swiglu"]),
                     functools.partial(swiglu_lora_backward, swiglu=ops["swiglu"],
                                       swiglu_backward=ops["swiglu_backward"]))
    return Kernels(**ops, swiglu_lora=mlp[0], swiglu_lora_backward=mlp[1], triton_mlp=triton is not None,
                   fp8=fp8.gpu_kernels() if fp8_on and on_gpu else fp8.PLAIN,
                   flex_attention=flex_kernel(attention_shape, backend) if on_gpu else None)


def flex_kernel(attention_shape: Optional[tuple], backend: str) -> Optional[Callable]:
    """Compiled FlexAttention, checked on this GPU at the model's (n_head, n_kv, head_size, window) when given."""
    if attention_shape is None or backend != "inductor":
        return compiled(flex_attention, backend)
    options = attention.checked_tiles(*attention_shape)
    if options is None:
        return None
    return functools.partial(compiled(flex_attention), kernel_options=options) if options else compiled(flex_attention)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, backend: str = "inductor") -> Callable:
    """One torch.compile wrapper per function and backend for the whole process, so that models sped up one after
    the other share its compiled kernels."""
    # The norms round where eager rounds (the residual sum, the normalised value before the weight): LoRAMatmul
    # recomputes a norm from its stored input with rms_norm, and must get the values that add_rms_norm gave the
    # forward pass (inductor's default skips those roundings, differently in each kernel)
    rounds = fn in (model.rms_norm, add_rms_norm) and backend == "inductor"
    return torch.compile(fn, backend=backend, options={"emulate_precision_casts": True} if rounds else None)


def triton_kernels():
    """swiglu_lora and swiglu_lora_backward as Triton kernels (fast/kernels.py, imported on first call so that
    machines without Triton never need it, and a process started with TRITON_INTERPRET=1 runs them on the CPU)."""
    from fast import kernels

    return kernels.swiglu_lora, kernels.swiglu_lora_backward


def checked_triton_kernels(rank: int):
    """triton_kernels(), compiled for this LoRA rank and checked against the plain versions on a small input on this
    GPU (self_check); None with a warning if they fail or disagree (the gated MLP then runs as three LoRA matmuls)."""
    try:
        kernels = triton_kernels()
        error = self_check(*kernels, rank=rank)
    except Exception as e:  # no Triton, an older GPU, out of resources at this rank
        print(f"Warning: fast/kernels.py's Triton SwiGLU kernels did not run on this GPU ({one_line(e)}); using the "
              "(slower) PyTorch path", file=sys.stderr)
        return None
    if error < 1e-2:
        return kernels
    print(f"Warning: fast/kernels.py's Triton SwiGLU kernels differ from the PyTorch versions by {error:.1%} on this "
          "GPU; using the (slower) PyTorch path", file=sys.stderr)
    return None


def self_check(forward, backward, device: str = "cuda", rank: int = 12) -> float:
    """The largest relative error (norm of the difference / norm) of the kernels' outputs against the plain ones on a
    random bf16 input on `device` at this LoRA rank; sizes that leave partial tiles, so the masks are exercised.
    Rounding differences stay near bf16's precision; a kernel that drops or misplaces an adapter's product is off
    by the size of that product."""
    gen = torch.Generator(device=device).manual_seed(0)
    M, N, r = 200, 328, rank

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * std).to(torch.bfloat16)

    g, u, d, h_g, h_u, dh = rand(M, N), rand(M, N), rand(M, N), rand(M, r), rand(M, r), rand(M, r)
    B_g, B_u, A = rand(N, r, std=0.2), rand(N, r, std=0.2), rand(r, N, std=0.2)
    args = (g, u, h_g, B_g, 0.5, h_u, B_u, 2.0)
    got = [forward(*args), *backward(*args, d.clone(), dh, A, True)]
    want = [swiglu_lora(*args), *swiglu_lora_backward(*args, d, dh, A, True)]
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want))


def kernels_take(dtype: torch.dtype, r_g: int, r_u: int, s_g: float, s_u: float) -> bool:
    """Whether the Triton kernels take a gate and up projection's adapters of these ranks and scalings in this
    dtype: bf16 or fp16, one rank, scalings not 0 (the kernels divide by them)."""
    return dtype in (torch.bfloat16, torch.float16) and r_g == r_u and s_g != 0 and s_u != 0


# ---------------------------------------------------------------------------------------------------------------------
# The fast modules


class FusedLoRALinear(LoRALinear):
    """LoRALinear whose training forward is LoRAMatmul. Its own settings (set by fast.speed_up): fp8_matmuls (None,
    "grad": the base matmul of the backward pass in FP8, "all": the forward ones too), recompute (see LoRAMatmul)
    and kernels."""

    def set_up(self, fp8_matmuls: Optional[str], recompute: bool, kernels: Kernels) -> None:
        self.fp8_matmuls, self.recompute, self.kernels = fp8_matmuls, recompute, kernels

    @property
    def takes_fused_path(self) -> bool:
        """LoRAMatmul serves training without dropout on plain and 4-bit bases; int8 (bnb's outlier matmul), dropout
        and inference (bnb's 4-bit matrix-vector kernel, no dequantization) take LoRALinear's plain path."""
        return (not self.merged and torch.is_grad_enabled() and isinstance(self.dropout, nn.Identity)
                and (not is_bnb(self.base) or type(self.base).__name__ != "Linear8bitLt"))

    @property
    def fp8_mode(self) -> Optional[str]:
        """fp8_matmuls if this layer's shape takes FP8, else None."""
        return self.fp8_matmuls if self.fp8_matmuls and fp8.supported(self.base) is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_fused_path:
            return super().forward(x)
        B = self.lora_B if self.covers_all_rows else self.placed_B(torch.float32)
        return LoRAMatmul.apply(x, self.lora_A, B, self.scaling, self.base, self.fp8_mode, self.recompute,
                                self.kernels)

    def swiglu_forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """self(swiglu(gate, up)) for the down projection of a gated MLP. In training it keeps gate and up (which
        SwiGLU's backward needs anyway) instead of also keeping their product, the widest activation of the block,
        and recomputes the product in the backward pass."""
        if not (self.takes_fused_path and self.covers_all_rows):
            return self(self.kernels.swiglu(gate, up))
        return SwiGLULoRAMatmul.apply(gate, up, self.lora_A, self.lora_B, self.scaling, self.base, self.fp8_mode,
                                      self.recompute, self.kernels)


class FastMLP(model.MLP):
    """A gated MLP whose gate, up and down projections are FusedLoRALinear runs as lora_gated_mlp (unless fuse_lora
    is False: then as three fused LoRA matmuls, the earlier path, kept for comparison)."""

    def set_up(self, fuse_lora: bool, kernels: Kernels) -> None:
        self.fuse_lora, self.kernels = fuse_lora, kernels

    def forward(self, x):
        if self.fc_2 is None:
            return super().forward(x)
        layers = (self.fc_1, self.fc_2, self.proj)
        if self.fuse_lora and self.fusable(x, layers):
            return lora_gated_mlp(x, layers, self.proj.fp8_mode, self.proj.recompute, self.kernels)
        gate, up = self.fc_1(x), self.fc_2(x)
        if isinstance(self.proj, FusedLoRALinear):
            return self.proj.swiglu_forward(gate, up)
        return self.proj(self.kernels.swiglu(gate, up))

    def fusable(self, x: torch.Tensor, layers) -> bool:
        if not all(isinstance(m, FusedLoRALinear) and m.takes_fused_path and m.covers_all_rows for m in layers):
            return False
        gate, up, _ = layers
        # On a GPU only with the Triton kernels: the plain ones keep more memory than three LoRA matmuls. On a CPU
        # (the tests) the plain ones compute the same math. The Triton kernels refuse what kernels_take refuses.
        triton = self.kernels.triton_mlp
        kernels = ((x.device.type == "cpu" and not triton)
                   or (triton and kernels_take(x.dtype, gate.r, up.r, gate.scaling, up.scaling)))
        return kernels and len({m.fp8_mode for m in layers}) == 1


class FastRMSNorm(model.RMSNorm):
    def set_up(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def forward(self, x):
        return self.tagged(self.kernels.rms_norm(x, self.weight, self.eps), x)

    def add_forward(self, x, h):
        """(x + h, self(x + h)) in one kernel each way (compiled add_rms_norm): the backward pass adds the gradient
        from the residual path inside the norm's. Called directly by FastBlock, so hooks registered on this module
        do not see it."""
        x, y = self.kernels.add_rms_norm(x, h, self.weight, self.eps)
        return x, self.tagged(y, x)

    def tagged(self, y, x):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Lets a fused matmul that reads y keep x instead (kept for this norm's own backward anyway) and
            # recompute y in its backward: one fewer (tokens, n_embd) tensor per norm. A weak reference, so the tag
            # never keeps x alive itself; the versions tell if x or y was changed in place.
            y.normed_from = (self, weakref.ref(x), x._version, y._version)
        return y


class FastAttention(model.CausalSelfAttention):
    """Takes packed rows' mask as a BlockMask too (fast.packed_mask): FlexAttention skips the tiles where no token
    sees another of its document, and keeps no mask for the backward pass."""

    def set_up(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def rotate(self, x, cos, sin):
        return self.kernels.apply_rope(x, cos, sin)

    def attend(self, q, k, v, mask):
        if isinstance(mask, BlockMask):
            return self.kernels.flex_attention(q, k, v, block_mask=mask, enable_gqa=k.size(1) != q.size(1))
        return super().attend(q, k, v, mask)


class FastBlock(model.Block):
    """The residual add after attention and norm_2 after it in one kernel (FastRMSNorm.add_forward)."""

    def forward(self, x, cos, sin, mask, input_pos):
        if self.parallel_residual or not isinstance(self.norm_2, FastRMSNorm):
            return super().forward(x, cos, sin, mask, input_pos)
        h = self.attn(self.norm_1(x), cos, sin, mask, input_pos)
        x, normed = self.norm_2.add_forward(x, h)
        return x + self.mlp(normed)


FAST_CLASS = {LoRALinear: FusedLoRALinear, model.MLP: FastMLP, model.RMSNorm: FastRMSNorm,
              model.CausalSelfAttention: FastAttention, model.Block: FastBlock}


def convert(net: nn.Module, kernels: Kernels, fp8_matmuls: Optional[str] = None, recompute: bool = True,
            fuse_lora_mlp: bool = True) -> nn.Module:
    """Swaps every plain module of `net` for its fast subclass, in place, and gives each its settings (again, for a
    module that is fast already). Only the class changes: a subclass adds no parameters or buffers, so names,
    state_dict keys and the module tree stay as they were."""
    for name, m in net.named_modules():
        if type(m) is model.Block and "forward" in m.__dict__:
            raise RuntimeError(f"{name} has a forward of its own (activation checkpointing wraps the plain one): "
                               "call fast.speed_up before enabling activation checkpointing")
        if type(m) in FAST_CLASS:
            m.__class__ = FAST_CLASS[type(m)]
        if isinstance(m, FusedLoRALinear):
            m.set_up(fp8_matmuls, recompute, kernels)
        elif isinstance(m, FastMLP):
            m.set_up(fuse_lora_mlp, kernels)
        elif isinstance(m, (FastRMSNorm, FastAttention)):
            m.set_up(kernels)
    return net


# ---------------------------------------------------------------------------------------------------------------------
# The fused LoRA autograd functions


class LoRAMatmul(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T in as few kernels as the math allows, for LoRA without dropout.

    W is the frozen base weight: a plain linear's, or a 4-bit layer's dequantized on the spot (once in forward, once
    in backward; never kept). The adapter's output is accumulated into the base output by one addmm, so no separate
    delta tensor is written and read back. Saved for backward: x (shared with any other layer that reads the same
    tensor; when x is an RMSNorm's output, the norm's input instead, see norm_source), the small x A^T, and bf16
    copies of A and B. Gradients of the fp32 A and B come back in fp32; the base matmul of the backward pass is
    skipped when x needs no gradient (the first layer's input). With fp8_mode ("grad" or "all") the base matmul of
    the backward pass (and with "all" of the forward pass) runs in FP8 (fast/fp8.py).

    recompute=False keeps x even when it is a norm's output: per block, two more (tokens, n_embd) tensors, plus the
    gated MLP's (tokens, intermediate) SwiGLU product (SwiGLULoRADown or SwiGLULoRAMatmul), for fewer elementwise
    kernels in the backward pass.
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling, base, fp8_mode, recompute, kernels):
        y, h, A_c, B_c = lora_matmul(x, A, B, scaling, base, kernels.fp8 if fp8_mode == "all" else None)
        ctx.norm, x_in = norm_source(x, recompute)
        ctx.save_for_backward(x_in, h, A_c, B_c)
        ctx.scaling, ctx.base, ctx.fp8 = scaling, base, kernels.fp8 if fp8_mode else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, A_c, B_c = ctx.saved_tensors
        x = renormed(ctx.norm, x)
        dx, dA, dB = lora_matmul_backward(dy, x, h, A_c, B_c, ctx.scaling, ctx.base, ctx.needs_input_grad[0], ctx.fp8)
        return dx, dA, dB, None, None, None, None, None


class SwiGLULoRAMatmul(torch.autograd.Function):
    """LoRAMatmul of swiglu(gate, up), saving gate and up but not their product (FusedLoRALinear.swiglu_forward)."""

    @staticmethod
    def forward(ctx, gate, up, A, B, scaling, base, fp8_mode, recompute, kernels):
        act = kernels.swiglu(gate, up)
        y, h, A_c, B_c = lora_matmul(act, A, B, scaling, base, kernels.fp8 if fp8_mode == "all" else None)
        ctx.save_for_backward(gate, up, h, A_c, B_c, *(() if recompute else (act,)))
        ctx.scaling, ctx.base, ctx.fp8, ctx.kernels = scaling, base, kernels.fp8 if fp8_mode else None, kernels
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, h, A_c, B_c, *kept = ctx.saved_tensors
        # Recomputed unless kept: one cheap fused kernel instead of a stored (tokens, intermediate) tensor.
        act = kept.pop() if kept else ctx.kernels.swiglu(gate, up)
        d_act, dA, dB = lora_matmul_backward(dy, act, h, A_c, B_c, ctx.scaling, ctx.base, True, ctx.fp8)
        del act  # before d_gate and d_up exist, the widest point of a block's backward pass (unless ctx kept it)
        d_gate, d_up = ctx.kernels.swiglu_backward(gate, up, d_act)
        return d_gate, d_up, dA, dB, None, None, None, None, None


def lora_gated_mlp(x, layers, fp8_mode: Optional[str], recompute: bool, kernels: Kernels) -> torch.Tensor:
    """down(swiglu(gate(x), up(x))) for the three LoRA layers (gate, up, down) of a gated MLP, without dropout
    (FastMLP).

    LoRAMatmul for each of the three, except where the gate and up adapters' outputs go. LoRAMatmul adds them into
    the base outputs: a read and a write of a (tokens, intermediate) tensor each, the widest of the block. Here the
    base outputs g and u are kept instead (LoRAGateUp), and swiglu_lora adds the adapters' rank-r products inside the
    SwiGLU kernel (SwiGLULoRADown). The backward pass does the same with the down projection's input gradient:
    swiglu_lora_backward adds its adapter's part inside the kernel that computes d gate and d up (and recomputes the
    SwiGLU product, unless recompute=False kept it). With the Triton kernels that is three fewer passes over such a
    tensor per block and step. Two autograd functions, not one, so that g and u are freed before the gate and up
    projections' input gradients are computed, as with three LoRAMatmuls.
    """
    gate, up, down = layers
    g, u, h_g, h_u = LoRAGateUp.apply(x, gate.lora_A, up.lora_A, gate.base, up.base, fp8_mode, recompute, kernels)
    y = SwiGLULoRADown.apply(g, u, h_g, h_u, gate.lora_B, up.lora_B, down.lora_A, down.lora_B, layers, fp8_mode,
                             recompute, kernels)
    return y.view(*x.shape[:-1], y.shape[-1])


class LoRAGateUp(torch.autograd.Function):
    """(x W_g^T, x W_u^T, x A_g^T, x A_u^T) for the gate and up projections: their base outputs and the adapters'
    down-projections, without the adapters' outputs, which SwiGLULoRADown adds (lora_gated_mlp)."""

    @staticmethod
    def forward(ctx, x, A_g, A_u, base_g, base_u, fp8_mode, recompute, kernels):
        forward_fp8 = kernels.fp8 if fp8_mode == "all" else None
        x2 = x.reshape(-1, x.shape[-1])
        A_gc, A_uc = A_g.to(x.dtype), A_u.to(x.dtype)
        g, u = base_matmul(x2, base_g, forward_fp8), base_matmul(x2, base_u, forward_fp8)
        ctx.norm, x_in = norm_source(x, recompute)
        ctx.save_for_backward(x_in, A_gc, A_uc)
        ctx.bases, ctx.fp8 = (base_g, base_u), kernels.fp8 if fp8_mode else None
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
            dx = base_input_grad(d_g, base_g, ctx.fp8)
            if ctx.fp8 is not None:
                dx += base_input_grad(d_u, base_u, ctx.fp8)
            else:
                dx.addmm_(d_u, base_weight(base_u, d_u.dtype))
            dx.addmm_(dh_g, A_gc).addmm_(dh_u, A_uc)
            dx = dx.view_as(x)
        return dx, dA_g, dA_u, None, None, None, None, None


class SwiGLULoRADown(torch.autograd.Function):
    """down(swiglu(g + s_g h_g B_g^T, u + s_u h_u B_u^T)): the gate and up adapters' outputs added inside the SwiGLU
    kernels, then the down projection as in LoRAMatmul (lora_gated_mlp)."""

    @staticmethod
    def forward(ctx, g, u, h_g, h_u, B_g, B_u, A_d, B_d, layers, fp8_mode, recompute, kernels):
        gate, up, down = layers
        B_gc, B_uc = B_g.to(g.dtype), B_u.to(u.dtype)
        act = kernels.swiglu_lora(g, u, h_g, B_gc, gate.scaling, h_u, B_uc, up.scaling)
        y, h_d, A_dc, B_dc = lora_matmul(act, A_d, B_d, down.scaling, down.base,
                                         kernels.fp8 if fp8_mode == "all" else None)
        ctx.save_for_backward(g, u, h_g, h_u, B_gc, B_uc, h_d, A_dc, B_dc, *(() if recompute else (act,)))
        ctx.layers, ctx.fp8, ctx.kernels = layers, kernels.fp8 if fp8_mode else None, kernels
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u, h_g, h_u, B_gc, B_uc, h_d, A_dc, B_dc, *kept = ctx.saved_tensors
        gate, up, down = ctx.layers
        dh_d, dB_d = adapter_grads(dy, h_d, B_dc, down.scaling)  # dh_d: the gradient reaching act A_d^T
        d_act = base_input_grad(dy, down.base, ctx.fp8)
        d_g, d_u, act = ctx.kernels.swiglu_lora_backward(g, u, h_g, B_gc, gate.scaling, h_u, B_uc, up.scaling, d_act,
                                                         dh_d, A_dc, not kept)
        dA_d = dh_d.t() @ (kept[0] if kept else act)
        del act, d_act
        dh_g, dB_g = adapter_grads(d_g, h_g, B_gc, gate.scaling)
        dh_u, dB_u = adapter_grads(d_u, h_u, B_uc, up.scaling)
        return (d_g, d_u, dh_g, dh_u, dB_g.float(), dB_u.float(), dA_d.float(), dB_d.float(), None, None, None,
                None)


def norm_source(x: torch.Tensor, recompute: bool):
    """(norm, x_in) when x = norm(x_in) (FastRMSNorm tags its output) and may be recomputed: a fused matmul then
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


# The matmuls. `fp8_kernels` are the FP8 kernels to run a base matmul with (fast/fp8.py), or None for the input's dtype.


def lora_matmul(x, A, B, scaling: float, base: nn.Module, fp8_kernels: Optional[fp8.Kernels] = None):
    """LoRAMatmul's forward math: (y, x A^T, A and B in x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    A_c, B_c = A.to(x.dtype), B.to(x.dtype)
    y = base_matmul(x2, base, fp8_kernels)
    h = x2 @ A_c.t()
    y.addmm_(h, B_c.t(), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1]), h, A_c, B_c


def adapter_grads(dy2: torch.Tensor, h: torch.Tensor, B_c: torch.Tensor, scaling: float):
    """For an adapter output scaling * h B^T that received the gradient dy2 (M, out): (the gradient reaching
    h = x A^T (M, rank), B's gradient (out, rank)), in dy2's dtype."""
    return (dy2 @ B_c) * scaling, (dy2.t() @ h) * scaling


def base_matmul(x2: torch.Tensor, base: nn.Module, fp8_kernels: Optional[fp8.Kernels]) -> torch.Tensor:
    """x2 (M, in) @ W^T (+ bias) for the frozen base weight, in FP8 or in x2's dtype."""
    if fp8_kernels is not None:
        return fp8.linear(x2, base, fp8_kernels)
    W = base_weight(base, x2.dtype)
    return x2 @ W.t() if base.bias is None else torch.addmm(base.bias.to(x2.dtype), x2, W.t())


def base_input_grad(dy2: torch.Tensor, base: nn.Module, fp8_kernels: Optional[fp8.Kernels]) -> torch.Tensor:
    """dy2 (M, out) @ W: the gradient reaching a base layer's input."""
    if fp8_kernels is not None:
        return fp8.input_grad(dy2, base, fp8_kernels)
    return dy2 @ base_weight(base, dy2.dtype)


def lora_matmul_backward(dy, x, h, A_c, B_c, scaling: float, base: nn.Module, need_dx: bool,
                         fp8_kernels: Optional[fp8.Kernels] = None):
    """LoRAMatmul's backward math: (dx or None, fp32 dA, fp32 dB)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dh, dB = adapter_grads(dy2, h, B_c, scaling)
    dA = dh.t() @ x2
    dx = None
    if need_dx:
        dx = base_input_grad(dy2, base, fp8_kernels)
        dx.addmm_(dh, A_c)
        dx = dx.view_as(x)
    return dx, dA.float(), dB.float()


def base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen (out, in) weight a plain or 4-bit base layer computes with, in `dtype`."""
    if not is_bnb(base):
        return base.weight.to(dtype)
    from quantize import dequantize_weight

    return dequantize_weight(base).to(dtype)
