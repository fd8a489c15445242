"""LoRA written out by hand (no peft): low-rank adapters on any subset of the model's linear layers.

`inject_lora(model, LoRAConfig(...))` swaps the chosen linears (plain, 4-bit or 8-bit) for `LoRALinear`, which adds
`scaling * B @ A @ x` to the frozen base output. Our attention has ONE fused `attn.qkv` projection with rows
[q | k | v] (k and v have n_query_groups * head_size rows under grouped-query attention), so a LoRALinear carries
one (A, B) pair per *part* of its output rows and adds each part's delta to exactly those rows: LoRA on q and v
never touches the k rows (lit-gpt shipped that bug for months; tests/test_lora.py checks every q/k/v subset).

LoRA weights stay fp32 (master weights, like peft) and are cast to the compute dtype on the fly: with bf16 weights,
updates smaller than 1/256 of a weight (routine at lr 2e-5) would round away.

This is the plain LoRA, the reference: `fast.speed_up(model)` (fast/fused.py) turns each LoRALinear into a
FusedLoRALinear with the same parameters, which computes the same thing in fewer kernels and less memory for training.

An adapter file is a safetensors file with only the LoRA tensors; its metadata holds the settings that rebuild them
(rank, alpha, targets, base model shape), so merge and generate never need the flags repeated.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    dropout: float = 0.0  # > 0 keeps the fast path's fused matmuls (fast/fused.py) off this model's layers
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
        self.register_buffer("served_A", None, persistent=False)  # freeze(): A and the placed B in the served dtype
        self.register_buffer("served_B", None, persistent=False)
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
        if self.served_A is not None and self.served_A.dtype == x.dtype:
            A, B = self.served_A, self.served_B
        else:
            A, B = self.lora_A.to(x.dtype), self.placed_B(x.dtype)
        h = F.linear(self.dropout(x), A) * self.scaling  # (..., n_parts * r): small, scale here
        return F.linear(h, B)

    def freeze(self, dtype: torch.dtype) -> None:
        """For serving: keep A and the placed B in `dtype`, which lora_delta then multiplies as they are, where it
        converted the fp32 parameters (and placed B) at every call: a few small kernels per adapted layer and decode
        step, the same bits out. A frozen layer no longer sees changes to its parameters: training never freezes."""
        with torch.no_grad():
            self.served_A, self.served_B = self.lora_A.detach().to(dtype), self.placed_B(dtype).detach()

    def placed_B(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, n_parts * r): part i's B on its own rows and its own r columns, zeros elsewhere. One matmul then
        gives every part's delta on exactly its rows (a block-diagonal B when q, k and v all have adapters)."""
        B = self.lora_B.to(dtype)
        return B if self.covers_all_rows else place_B(B, self.parts, self.r, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + self.lora_delta(x)

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


def is_bnb(module: nn.Module) -> bool:
    """bitsandbytes layers subclass nn.Linear, so isinstance cannot tell them apart."""
    return type(module).__module__.startswith("bitsandbytes")


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, parts, r: int, scaling: float, out_features: int
                 ) -> torch.Tensor:
    """scaling * B_i @ A_i on each part's rows, zero elsewhere: (out, in) fp32."""
    delta = torch.zeros(out_features, lora_A.shape[1], device=lora_A.device, dtype=torch.float32)
    for rows, a, b in part_slices(parts, r):
        delta[rows] = lora_B[b].float() @ lora_A[a].float() * scaling
    return delta


def place_B(lora_B: torch.Tensor, parts, r: int, out_features: int) -> torch.Tensor:
    """(out, n_parts * r): part i's B on its own rows and its own r columns, zeros elsewhere."""
    placed = lora_B.new_zeros(out_features, len(parts) * r)
    for rows, a, b in part_slices(parts, r):
        placed[rows, a] = lora_B[b]
    return placed


def part_slices(parts, r: int):
    """Per part of a layer with an adapter on some of its output rows (qkv_parts): (its rows of the output, its rows
    of lora_A, its rows of lora_B) as slices. Each part has its own pair: the A matrices stacked in lora_A (r rows
    each), the B matrices in lora_B, in the order of `parts`."""
    row = 0
    for i, (start, end) in enumerate(parts):
        yield slice(start, end), slice(i * r, (i + 1) * r), slice(row, row + end - start)
        row += end - start


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


def freeze_lora(model: nn.Module, dtype: torch.dtype) -> None:
    """LoRALinear.freeze for every adapter of `model` (the server freezes the one it keeps unmerged over a quantized
    base)."""
    for m in lora_modules(model).values():
        m.freeze(dtype)


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
