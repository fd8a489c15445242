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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8
import model
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
    two (tokens, 4096) tensors per block, plus SwiGLULoRAMatmul's (tokens, 14336) product: 1.35 GiB per 1,000
    tokens of a micro-batch, for 128 fewer elementwise kernels a step.
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling, base, fp8_mode, recompute=True):
        y, h, A_c, B_c = lora_matmul(x, A, B, scaling, base, fp8_mode == "all")
        # x = norm(x_in) (model.RMSNorm tags its output): keep x_in, which the norm keeps for its own backward
        # anyway, and recompute x in backward, one cheap elementwise kernel, instead of keeping a second tensor.
        ctx.norm, x_in = None, x
        if recompute and hasattr(x, "normed_from"):
            norm, source, source_version, version = x.normed_from
            src = source()
            if src is not None and src._version == source_version and x._version == version:
                ctx.norm, x_in = norm, src
        ctx.save_for_backward(x_in, h, A_c, B_c)
        ctx.scaling, ctx.base, ctx.fp8_mode = scaling, base, fp8_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, A_c, B_c = ctx.saved_tensors
        if ctx.norm is not None:
            with torch.no_grad():
                x = ctx.norm.forward(x)  # not ctx.norm(x): the module's hooks ran in the forward pass already
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


def lora_matmul(x, A, B, scaling: float, base: nn.Module, in_fp8: bool = False):
    """LoRAMatmul's forward math: (y, x A^T, A and B in x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    A_c, B_c = A.to(x.dtype), B.to(x.dtype)
    if in_fp8:
        y = fp8.linear(x2, base)
    else:
        W = base_weight(base, x.dtype)
        y = x2 @ W.t() if base.bias is None else torch.addmm(base.bias.to(x.dtype), x2, W.t())
    h = x2 @ A_c.t()
    y.addmm_(h, B_c.t(), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1]), h, A_c, B_c


def lora_matmul_backward(dy, x, h, A_c, B_c, scaling: float, base: nn.Module, need_dx: bool, in_fp8: bool = False):
    """LoRAMatmul's backward math: (dx or None, fp32 dA, fp32 dB)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dh = (dy2 @ B_c) * scaling  # (N, rank): the gradient reaching x A^T
    dA = dh.t() @ x2
    dB = (dy2.t() @ h) * scaling
    dx = None
    if need_dx:
        dx = fp8.input_grad(dy2, base) if in_fp8 else dy2 @ base_weight(base, dy.dtype)
        dx.addmm_(dh, A_c)
        dx = dx.view_as(x)
    return dx, dA.float(), dB.float()


def base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen (out, in) weight a plain or 4-bit base layer computes with, in `dtype`."""
    if not is_bnb(base):
        return base.weight.to(dtype)
    from quantize import dequantize_weight

    return dequantize_weight(base).to(dtype)


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
        raise FileNotFoundError(f"{path}: adapter not found; pass the adapter.safetensors written by finetune/lora.py")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if "oneday_adapter" not in meta:
        raise ValueError(f"{path}: no LoRA settings in its metadata; it was not written by finetune/lora.py")
    return json.loads(meta["oneday_adapter"]), tensors


def check_adapter_fits(settings: dict, config: Config, path: Path) -> None:
    """The one error for an adapter trained on a model of another shape."""
    if settings["base_fingerprint"] != config_fingerprint(config):
        raise ValueError(f"{path}: adapter was trained on {settings['base_model']!r}, which has another shape than "
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
        raise ValueError(f"{path}: adapter tensors do not match its own settings ({sorted(set(tensors) ^ expected)[:3]} ...); "
                         "the file is corrupt, use another checkpoint")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return settings
