"""The model: one decoder-only transformer that covers the Llama, Mistral, Qwen, GPT-NeoX (Pythia) and SmolLM2 families.

Read top to bottom: Config and the table of named configs, then GPT, Block, attention, MLP, norm, RoPE and the KV cache.
A family difference is a config field and an `if`. Checkpoint names from other projects are translated by the
converters in scripts/, never here. This is the reference math: the training speed layer (fast/, `fast.speed_up`)
swaps some of these modules for subclasses that compute the same thing in fewer kernels, and is checked against it.
"""

import difflib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    name: str = ""
    hf_repo: str = ""  # where scripts/download.py fetches the weights
    block_size: int = 4096  # the context the model was trained for
    vocab_size: int = 32000  # rows of the embedding, as in the checkpoint
    n_layer: int = 32
    n_head: int = 32
    n_query_groups: Optional[int] = None  # key/value heads; n_head means plain multi-head attention
    n_embd: int = 4096
    head_size: Optional[int] = None  # defaults to n_embd // n_head
    intermediate_size: int = 11008
    rotary_percentage: float = 1.0  # GPT-NeoX rotates only the first part of each head
    rope_base: float = 10000.0
    norm_class: str = "RMSNorm"  # or "LayerNorm"
    norm_eps: float = 1e-5
    gated_mlp: bool = True  # SwiGLU (Llama family) or a plain GELU MLP (GPT-NeoX)
    gelu_approximate: str = "none"
    bias: bool = False  # bias on every linear layer (GPT-NeoX)
    attn_bias: bool = False  # bias on the fused q/k/v projection only (Qwen)
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm_1(x)) + mlp(norm_2(x))
    tie_embeddings: bool = False  # the LM head reuses the token embedding (SmolLM2, small Qwen2)
    sliding_window: Optional[int] = None  # Mistral: each token attends to at most this many previous positions

    def __post_init__(self):
        self.n_query_groups = self.n_query_groups or self.n_head
        self.head_size = self.head_size or self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"config {self.name!r}: n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}")
        if self.norm_class not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"config {self.name!r}: norm_class must be RMSNorm or LayerNorm, not {self.norm_class!r}")

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        by_name = {c["name"].lower(): c for c in configs}
        by_name.update({short.lower(): by_name[full.lower()] for short, full in short_names.items()})
        if name.lower() not in by_name:
            close = difflib.get_close_matches(name.lower(), by_name, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model config {name!r}.{hint} Known: python -c 'import model; print(model.known_names())'")
        return cls(**{**by_name[name.lower()], **overrides})

    # A model_config.json must give the sizes: their defaults (Llama-2-7B's) would build another model. A file without
    # one of the other fields (an older one) gets that field's default.
    required = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "intermediate_size")

    @classmethod
    def from_json(cls, path: Path) -> "Config":
        """Every problem with the file is an error whose message starts with its path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model config not found; convert a checkpoint into this folder first (see README)")
        fix = "convert the checkpoint again"
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{...}}, not {type(data).__name__}; {fix}")
        defaults = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(data) - set(defaults))
        if unknown:
            raise ValueError(f"{path}: unknown config fields {unknown}; known fields are {sorted(defaults)}")
        missing = [k for k in cls.required if k not in data]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}; {fix}")
        for key, value in data.items():
            default = defaults[key]
            if key in cls.required or default is None:  # sizes: the optional ones may be null (derived)
                want = "a positive whole number"
                ok = (type(value) is int and value > 0) or (value is None and key not in cls.required)
            else:
                want = f"a {type(default).__name__}"
                ok = type(value) is type(default) or (type(default) is float and type(value) is int)
            if not ok:
                raise ValueError(f"{path}: {key} must be {want}, not {value!r}; {fix}")
        try:
            return cls(**data)
        except ValueError as e:  # __post_init__'s checks across fields
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def known_names() -> list:
    return sorted([c["name"] for c in configs] + list(short_names))


# The table. Adding a model is adding a dict; values follow each model's config.json on the Hugging Face hub.
llama_2 = dict(block_size=4096, vocab_size=32000, norm_eps=1e-5)
configs = [
    dict(name="Mistral-7B-v0.1", hf_repo="mistralai/Mistral-7B-v0.1", block_size=32768, vocab_size=32000, n_layer=32,
         n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336, sliding_window=4096, norm_eps=1e-5),
    dict(name="Llama-2-7b-hf", hf_repo="meta-llama/Llama-2-7b-hf", n_layer=32, n_head=32, n_embd=4096,
         intermediate_size=11008, **llama_2),
    dict(name="Llama-2-13b-hf", hf_repo="meta-llama/Llama-2-13b-hf", n_layer=40, n_head=40, n_embd=5120,
         intermediate_size=13824, **llama_2),
    dict(name="Llama-2-70b-hf", hf_repo="meta-llama/Llama-2-70b-hf", n_layer=80, n_head=64, n_query_groups=8,
         n_embd=8192, intermediate_size=28672, **llama_2),
    dict(name="TinyLlama-1.1B", hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", block_size=2048,
         vocab_size=32000, n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632),
    # First-generation Qwen: fused q/k/v with bias, untied head. Its NTK/log-n tricks only act beyond block_size.
    dict(name="Qwen-7B", hf_repo="Qwen/Qwen-7B", block_size=8192, vocab_size=151936, n_layer=32, n_head=32,
         n_embd=4096, intermediate_size=11008, attn_bias=True, norm_eps=1e-6),
    dict(name="Qwen-14B", hf_repo="Qwen/Qwen-14B", block_size=2048, vocab_size=152064, n_layer=40, n_head=40,
         n_embd=5120, intermediate_size=13696, attn_bias=True, norm_eps=1e-6),
    dict(name="Qwen2-7B", hf_repo="Qwen/Qwen2-7B", block_size=32768, vocab_size=152064, n_layer=28, n_head=28,
         n_query_groups=4, n_embd=3584, intermediate_size=18944, attn_bias=True, norm_eps=1e-6, rope_base=1e6),
    dict(name="Qwen2.5-0.5B", hf_repo="Qwen/Qwen2.5-0.5B", block_size=32768, vocab_size=151936, n_layer=24, n_head=14,
         n_query_groups=2, n_embd=896, intermediate_size=4864, attn_bias=True, norm_eps=1e-6, rope_base=1e6,
         tie_embeddings=True),
    dict(name="Qwen2.5-1.5B", hf_repo="Qwen/Qwen2.5-1.5B", block_size=131072, vocab_size=151936, n_layer=28,
         n_head=12, n_query_groups=2, n_embd=1536, intermediate_size=8960, attn_bias=True, norm_eps=1e-6,
         rope_base=1e6, tie_embeddings=True),
    dict(name="Qwen2.5-7B", hf_repo="Qwen/Qwen2.5-7B", block_size=131072, vocab_size=152064, n_layer=28, n_head=28,
         n_query_groups=4, n_embd=3584, intermediate_size=18944, attn_bias=True, norm_eps=1e-6, rope_base=1e6),
    dict(name="Qwen2.5-14B", hf_repo="Qwen/Qwen2.5-14B", block_size=131072, vocab_size=152064, n_layer=48, n_head=40,
         n_query_groups=8, n_embd=5120, intermediate_size=13824, attn_bias=True, norm_eps=1e-5, rope_base=1e6),
    dict(name="SmolLM2-135M", hf_repo="HuggingFaceTB/SmolLM2-135M", block_size=8192, vocab_size=49152, n_layer=30,
         n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536, rope_base=100000, tie_embeddings=True),
    dict(name="SmolLM2-135M-Instruct", hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct", block_size=8192,
         vocab_size=49152, n_layer=30, n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536,
         rope_base=100000, tie_embeddings=True),
    dict(name="SmolLM2-360M", hf_repo="HuggingFaceTB/SmolLM2-360M", block_size=8192, vocab_size=49152, n_layer=32,
         n_head=15, n_query_groups=5, n_embd=960, intermediate_size=2560, rope_base=100000, tie_embeddings=True),
    dict(name="SmolLM2-1.7B", hf_repo="HuggingFaceTB/SmolLM2-1.7B", block_size=8192, vocab_size=49152, n_layer=24,
         n_head=32, n_embd=2048, intermediate_size=8192, rope_base=130000, tie_embeddings=True),
]
pythia = dict(block_size=2048, vocab_size=50304, rotary_percentage=0.25, norm_class="LayerNorm", norm_eps=1e-5,
              gated_mlp=False, bias=True, parallel_residual=True)
for name, n_layer, n_embd, n_head in [("70m", 6, 512, 8), ("160m", 12, 768, 12), ("410m", 24, 1024, 16),
                                      ("1b", 16, 2048, 8), ("1.4b", 24, 2048, 16), ("2.8b", 32, 2560, 32),
                                      ("6.9b", 32, 4096, 32), ("12b", 36, 5120, 40)]:
    configs.append(dict(name=f"pythia-{name}", hf_repo=f"EleutherAI/pythia-{name}", n_layer=n_layer, n_embd=n_embd,
                        n_head=n_head, intermediate_size=4 * n_embd, **pythia))
# The two largest Pythias pad their vocabularies further (their config.json).
next(c for c in configs if c["name"] == "pythia-6.9b")["vocab_size"] = 50432
next(c for c in configs if c["name"] == "pythia-12b")["vocab_size"] = 50688

# Short names people type on the command line.
short_names = {"mistral-7b": "Mistral-7B-v0.1", "llama-2-7b": "Llama-2-7b-hf", "llama-2-13b": "Llama-2-13b-hf",
               "llama-2-70b": "Llama-2-70b-hf", "qwen-7b": "Qwen-7B", "qwen-14b": "Qwen-14B",
               "tinyllama": "TinyLlama-1.1B", "smollm2-135m": "SmolLM2-135M-Instruct"}


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                pos_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab).

        input_pos: positions (T,) of these tokens in the KV cache (after `set_kv_cache`); None means no cache.
        pos_ids: RoPE positions, (T,) or (B, T); default `input_pos` or 0..T-1. Packed rows restart them per document.
        mask: boolean (B or 1, 1, T, keys) where True may attend; default causal (see the mask helpers below). A model
            sped up by fast/ also takes packed rows' mask as a FlexAttention BlockMask (fast.packed_mask).
        """
        return self.lm_head(self.hidden_states(idx, input_pos, pos_ids, mask))

    def hidden_states(self, idx, input_pos=None, pos_ids=None, mask=None) -> torch.Tensor:
        """The final normed hidden states, for callers that apply the LM head themselves (chunked cross-entropy)."""
        T = idx.size(1)
        if pos_ids is None:
            pos_ids = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        window = self.config.sliding_window
        if mask is None and input_pos is not None:
            mask = causal_mask(input_pos, self.blocks[0].attn.kv_cache.size, window)
        elif mask is None and window is not None and T > window:
            mask = causal_mask(torch.arange(T, device=idx.device), T, window)
        cos, sin = rope(pos_ids, self.config.rope_n_elem, self.config.rope_base)
        x = self.wte(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, mask, input_pos)
        return self.ln_f(x)

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        param = self.wte.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_query_groups, max_seq_length,
                                          self.config.head_size, device or param.device, dtype or param.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x, cos, sin, mask, input_pos):
        h = self.attn(self.norm_1(x), cos, sin, mask, input_pos)
        if self.parallel_residual:
            return x + h + self.mlp(self.norm_2(x))
        x = x + h
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        hs, n_head, n_kv = config.head_size, config.n_head, config.n_query_groups
        # One fused projection, rows [q | k | v]: one matmul (and one 4-bit dequantization) instead of three.
        self.qkv = nn.Linear(config.n_embd, (n_head + 2 * n_kv) * hs, bias=config.bias or config.attn_bias)
        self.proj = nn.Linear(n_head * hs, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        hs, n_head, n_kv = self.config.head_size, self.config.n_head, self.config.n_query_groups
        q, k, v = self.qkv(x).split([n_head * hs, n_kv * hs, n_kv * hs], dim=-1)
        q = q.view(B, T, n_head, hs).transpose(1, 2)  # (B, heads, T, hs)
        k = k.view(B, T, n_kv, hs).transpose(1, 2)
        # A copy, not a view: attention keeps v for its backward, and a view would keep the whole q|k|v output alive
        # beside the rotated q and k (in training, 1.25 x n_embd more per token and layer for Mistral's shapes).
        v = v.contiguous().view(B, T, n_kv, hs).transpose(1, 2)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)
        y = self.attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, n_head * hs))

    def attend(self, q, k, v, mask):
        """q (B, n_head, T, hs) over k and v (B, n_kv, keys, hs) -> (B, n_head, T, hs). A method so that speed layers
        can replace it: fast/ runs packed rows through FlexAttention, generate/fast_decode.py one query per row through
        two matrix products."""
        B, n_head, T, hs = q.shape
        n_kv = k.size(1)
        if n_kv != n_head and mask is not None:
            # The kernels that take a mask do not share K/V across heads. Instead of copying K/V (the whole cache,
            # when decoding) for every query head, fold each group's query heads into the query axis: query head h
            # reads K/V head h // group, so (B, n_head, T) -> (B, n_kv, group * T) with the mask tiled to match.
            group = n_head // n_kv
            y = F.scaled_dot_product_attention(q.reshape(B, n_kv, group * T, hs), k, v,
                                               attn_mask=mask.repeat(1, 1, group, 1))
            return y.reshape(B, n_head, T, hs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=n_kv != n_head)

    def rotate(self, x, cos, sin):
        """RoPE on queries or keys (B, heads, T, hs). A method so that fast/ can run a compiled kernel of it."""
        return apply_rope(x, cos, sin)


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias) if config.gated_mlp else None
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        if self.fc_2 is not None:
            return self.proj(swiglu(self.fc_1(x), self.fc_2(x)))
        return self.proj(F.gelu(self.fc_1(x), approximate=self.gelu_approximate))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and scale in the input dtype, as the reference Llama does, so bf16 results match.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "LayerNorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, eps=config.norm_eps)


def rope(pos_ids: torch.Tensor, n_elem: int, base: float):
    """cos and sin for rotate-half RoPE at the given positions, computed in fp32: (..., T, n_elem)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=pos_ids.device, dtype=torch.int64).float() / n_elem))
    freqs = pos_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hs); cos/sin (T, n) or (B, T, n). Only the first n features of each head rotate."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    n = cos.size(-1)
    x_rot, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rot[..., : n // 2], x_rot[..., n // 2:]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.numel() else rotated


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv, max_seq_length, head_size, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, n_kv, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def size(self) -> int:
        return self.k.size(2)

    def forward(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


# Masks. Each returns a boolean (B or 1, 1, queries, keys) tensor, True where a query may attend to a key.


def causal_mask(input_pos: torch.Tensor, n_keys: int, window: Optional[int] = None) -> torch.Tensor:
    """Queries at `input_pos` (T,) over keys at positions 0..n_keys-1; a sliding window keeps the last `window`."""
    keys = torch.arange(n_keys, device=input_pos.device)
    distance = input_pos.unsqueeze(-1) - keys  # (T, n_keys)
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed[None, None]


def document_mask(segment_ids: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """Packed rows: segment_ids (B, T) numbers the documents in each row; attention never crosses a document."""
    T = segment_ids.size(1)
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return same.unsqueeze(1) & causal_mask(torch.arange(T, device=segment_ids.device), T, window)


def padded_mask(key_valid: torch.Tensor, input_pos: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """Left-padded batches with a KV cache: key_valid (B, n_keys) is False on padding slots.

    A padding query still attends to itself, so no row of the mask is empty (an empty row makes SDPA return NaN);
    real tokens never see padding."""
    causal = causal_mask(input_pos, key_valid.size(1), window)
    itself = input_pos.unsqueeze(-1) == torch.arange(key_valid.size(1), device=key_valid.device)
    return (key_valid[:, None, None, :] & causal) | itself[None, None]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 at the start of each document of a packed row (B, T)."""
    T = segment_ids.size(1)
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx
