"""Hugging Face <-> project names, shared by convert_hf_checkpoint.py and convert_lit_checkpoint.py.

Everything both directions need lives here once: the weight-name tables per family, the q/k/v (un)fusing, and the
config.json <-> Config field mapping. A "family" is the Hugging Face `model_type`:
  llama, mistral, qwen2  Llama layout (model.layers.N.self_attn.q_proj ...); qwen2 adds q/k/v biases
  qwen                   first-generation Qwen (QWenLMHeadModel, remote code): fused c_attn with bias
  gpt_neox               GPT-NeoX / Pythia: fused query_key_value interleaved per head, LayerNorm, parallel residual
"""

import re
from typing import Dict, List, Optional, Tuple

import torch

from cli import InputError
from model import Config

FAMILIES = ("llama", "mistral", "qwen2", "qwen", "gpt_neox")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen": "QWenLMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}

# Hugging Face name -> (our name, part). `{}` is the layer index. part None: the same tensor under another name;
# "q"/"k"/"v": a slice of our fused attn.qkv; "neox_qkv": the whole fused projection, reordered (see below).
_LLAMA_NAMES = {
    "model.embed_tokens.weight": ("wte.weight", None),
    "model.layers.{}.input_layernorm.weight": ("blocks.{}.norm_1.weight", None),
    **{f"model.layers.{{}}.self_attn.{p}_proj.{kind}": (f"blocks.{{}}.attn.qkv.{kind}", p)
       for p in "qkv" for kind in ("weight", "bias")},
    "model.layers.{}.self_attn.o_proj.weight": ("blocks.{}.attn.proj.weight", None),
    "model.layers.{}.post_attention_layernorm.weight": ("blocks.{}.norm_2.weight", None),
    "model.layers.{}.mlp.gate_proj.weight": ("blocks.{}.mlp.fc_1.weight", None),
    "model.layers.{}.mlp.up_proj.weight": ("blocks.{}.mlp.fc_2.weight", None),
    "model.layers.{}.mlp.down_proj.weight": ("blocks.{}.mlp.proj.weight", None),
    "model.norm.weight": ("ln_f.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
}
_QWEN_NAMES = {
    "transformer.wte.weight": ("wte.weight", None),
    "transformer.h.{}.ln_1.weight": ("blocks.{}.norm_1.weight", None),
    "transformer.h.{}.attn.c_attn.weight": ("blocks.{}.attn.qkv.weight", None),  # already [q; k; v]
    "transformer.h.{}.attn.c_attn.bias": ("blocks.{}.attn.qkv.bias", None),
    "transformer.h.{}.attn.c_proj.weight": ("blocks.{}.attn.proj.weight", None),
    "transformer.h.{}.ln_2.weight": ("blocks.{}.norm_2.weight", None),
    # Qwen computes w1(x) * silu(w2(x)): w2 is the gate, w1 the up projection.
    "transformer.h.{}.mlp.w2.weight": ("blocks.{}.mlp.fc_1.weight", None),
    "transformer.h.{}.mlp.w1.weight": ("blocks.{}.mlp.fc_2.weight", None),
    "transformer.h.{}.mlp.c_proj.weight": ("blocks.{}.mlp.proj.weight", None),
    "transformer.ln_f.weight": ("ln_f.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
}
_NEOX_NAMES = {
    "gpt_neox.embed_in.weight": ("wte.weight", None),
    **{f"gpt_neox.layers.{{}}.{hf}.{kind}": (f"blocks.{{}}.{ours}.{kind}", None)
       for hf, ours in [("input_layernorm", "norm_1"), ("attention.dense", "attn.proj"),
                        ("post_attention_layernorm", "norm_2"), ("mlp.dense_h_to_4h", "mlp.fc_1"),
                        ("mlp.dense_4h_to_h", "mlp.proj")]
       for kind in ("weight", "bias")},
    **{f"gpt_neox.layers.{{}}.attention.query_key_value.{kind}": (f"blocks.{{}}.attn.qkv.{kind}", "neox_qkv")
       for kind in ("weight", "bias")},
    "gpt_neox.final_layer_norm.weight": ("ln_f.weight", None),
    "gpt_neox.final_layer_norm.bias": ("ln_f.bias", None),
    "embed_out.weight": ("lm_head.weight", None),
}
NAMES = {"llama": _LLAMA_NAMES, "mistral": _LLAMA_NAMES, "qwen2": _LLAMA_NAMES, "qwen": _QWEN_NAMES,
         "gpt_neox": _NEOX_NAMES}
# Buffers some checkpoints carry that the model recomputes (RoPE frequencies, causal masks).
IGNORED_SUFFIXES = (".inv_freq", ".attention.bias", ".attention.masked_bias", "rotary_emb._cos_cached",
                    "rotary_emb._sin_cached")

_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> Tuple[str, Optional[str]]:
    """'model.layers.7.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', '7')."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


def _neox_to_ours(t: torch.Tensor, config: Config) -> torch.Tensor:
    # GPT-NeoX stores the fused projection per head as [q_h; k_h; v_h]; ours is [all q; all k; all v].
    rest = t.shape[1:]
    return t.reshape(config.n_head, 3, config.head_size, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def _ours_to_neox(t: torch.Tensor, config: Config) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(3, config.n_head, config.head_size, *rest).transpose(0, 1).reshape(t.shape).contiguous()


class HFToLit:
    """Renames Hugging Face tensors one at a time; q/k/v pieces wait here until their layer's three have arrived."""

    def __init__(self, family: str, config: Config) -> None:
        self.names, self.config = NAMES[family], config
        self.family = family
        self.pending: Dict[str, Dict[str, torch.Tensor]] = {}  # our fused name -> {"q": ..., "k": ...}

    def __call__(self, hf_name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        if hf_name.endswith(IGNORED_SUFFIXES):
            return []
        template, layer = _template(hf_name)
        if template not in self.names:
            raise KeyError(f"tensor {hf_name!r} is not part of a {self.family} checkpoint this converter knows")
        ours, part = self.names[template]
        ours = ours.format(layer)
        if ours == "lm_head.weight" and self.config.tie_embeddings:
            return []  # some tied checkpoints still store a copy of the embedding
        if part is None:
            return [(ours, tensor)]
        if part == "neox_qkv":
            return [(ours, _neox_to_ours(tensor, self.config))]
        pieces = self.pending.setdefault(ours, {})
        pieces[part] = tensor
        if len(pieces) < 3:
            return []
        del self.pending[ours]
        return [(ours, torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=0))]

    def leftover(self) -> List[str]:
        """Fused tensors still missing a piece at the end: the checkpoint is incomplete."""
        return [f"{name} (has only {'/'.join(sorted(p))})" for name, p in self.pending.items()]


def lit_to_hf(family: str, config: Config, name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """One of our tensors -> the Hugging Face tensor(s) it came from (q/k/v are split again)."""
    template, layer = _template(name)
    found = [(hf, part) for hf, (ours, part) in NAMES[family].items() if ours == template]
    if not found:
        raise KeyError(f"tensor {name!r} has no {family} Hugging Face name")
    if name == "lm_head.weight" and config.tie_embeddings:
        return []
    if len(found) == 1:
        hf, part = found[0]
        return [(hf.format(layer), _ours_to_neox(tensor, config) if part == "neox_qkv" else tensor)]
    sizes = {"q": config.n_head * config.head_size, "k": config.n_query_groups * config.head_size,
             "v": config.n_query_groups * config.head_size}
    q, k, v = tensor.split([sizes["q"], sizes["k"], sizes["v"]], dim=0)
    by_part = {"q": q, "k": k, "v": v}
    return [(hf.format(layer), by_part[part].contiguous()) for hf, part in found]


def hf_modules(family: str, module: str) -> List[Tuple[str, Optional[str]]]:
    """One of our linear layers ('blocks.3.attn.qkv') -> the Hugging Face module(s) holding its weight, each with the
    part it holds (as in NAMES): [('model.layers.3.self_attn.q_proj', 'q'), ...]. For LoRA adapter exports."""
    template, layer = _template(f"{module}.weight")
    found = [(hf.removesuffix(".weight").format(layer), part) for hf, (ours, part) in NAMES[family].items()
             if ours == template]
    if not found:
        raise KeyError(f"module {module!r} has no {family} Hugging Face name")
    return found


# ---- config.json <-> Config -------------------------------------------------------------------------------------


def family_of(hf_config: dict, path="config.json") -> str:
    family = hf_config.get("model_type")
    if family not in FAMILIES:
        archs = hf_config.get("architectures")
        raise InputError(f"{path}: model_type {family!r} (architectures {archs}) is not supported; "
                         f"supported model_type values: {', '.join(FAMILIES)}")
    return family


def _rope(hf: dict, key: str, legacy: Tuple[str, ...], default):
    """transformers >= 5 writes RoPE settings under rope_parameters; released checkpoints use top-level keys."""
    params = hf.get("rope_parameters") or {}
    if params.get(key) is not None:
        return params[key]
    return next((hf[k] for k in legacy if hf.get(k) is not None), default)


def config_from_hf(hf: dict, name: str = "", path="config.json") -> Config:
    """Our Config from a Hugging Face config.json dict. Raises (one line) on features model.py does not implement."""
    family = family_of(hf, path)

    def unsupported(field, value):
        raise InputError(f"{path}: {field}={value!r} is not supported by model.py ({family})")

    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or (hf.get("rope_parameters") or {}).get("rope_type")
    if rope_type not in (None, "default"):
        unsupported("rope_scaling", rope_type)
    common = dict(name=name, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                  n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"])
    if family in ("llama", "mistral", "qwen2"):
        if hf.get("hidden_act", "silu") != "silu":
            unsupported("hidden_act", hf["hidden_act"])
        if hf.get("mlp_bias"):
            unsupported("mlp_bias", True)
        if family == "llama" and hf.get("attention_bias"):
            unsupported("attention_bias", True)  # it also puts a bias on o_proj, which our attention lacks
        if family == "qwen2" and hf.get("use_sliding_window"):
            unsupported("use_sliding_window", True)  # per-layer windows (max_window_layers)
        window = hf.get("sliding_window") if family == "mistral" else None
        return Config(**common, n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                      head_size=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
                      block_size=hf.get("max_position_embeddings", 4096),
                      rope_base=_rope(hf, "rope_theta", ("rope_theta",), 10000.0),
                      norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                      attn_bias=family == "qwen2", sliding_window=window)
    if family == "qwen":
        if not hf.get("no_bias", True):
            unsupported("no_bias", False)
        # Qwen's config counts both halves of its SwiGLU input (w1 and w2) in intermediate_size.
        return Config(**common, head_size=hf.get("kv_channels"), intermediate_size=hf["intermediate_size"] // 2,
                      block_size=hf.get("seq_length", hf.get("max_position_embeddings", 2048)),
                      rope_base=_rope(hf, "rope_theta", ("rotary_emb_base",), 10000.0),
                      rotary_percentage=hf.get("rotary_pct", 1.0), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                      tie_embeddings=hf.get("tie_word_embeddings", False), attn_bias=True)
    # gpt_neox
    if not hf.get("attention_bias", True):
        unsupported("attention_bias", False)
    gelu = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}
    if hf.get("hidden_act", "gelu") not in gelu:
        unsupported("hidden_act", hf["hidden_act"])
    return Config(**common, intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
                  block_size=hf.get("max_position_embeddings", 2048),
                  rope_base=_rope(hf, "rope_theta", ("rotary_emb_base", "rope_theta"), 10000.0),
                  rotary_percentage=_rope(hf, "partial_rotary_factor", ("rotary_pct",), 0.25),
                  norm_class="LayerNorm", norm_eps=hf.get("layer_norm_eps", 1e-5), gated_mlp=False,
                  gelu_approximate=gelu[hf.get("hidden_act", "gelu")], bias=True,
                  parallel_residual=hf.get("use_parallel_residual", True),
                  tie_embeddings=hf.get("tie_word_embeddings", False))


def guess_family(config: Config) -> str:
    """The Hugging Face family for one of our configs when no config.json says so (e.g. a GGUF import)."""
    if config.norm_class == "LayerNorm":
        return "gpt_neox"
    if config.attn_bias:
        first_gen_qwen = config.name.lower().startswith("qwen-") or config.hf_repo.lower().startswith("qwen/qwen-")
        return "qwen" if first_gen_qwen else "qwen2"
    return "mistral" if config.sliding_window else "llama"


def pick_family(config: Config, source: dict, family: Optional[str] = None) -> str:
    """The family to write: `family` if given, else the model_type of the checkpoint's own config.json (`source`,
    there when converted beside a download), else guessed from the config."""
    if family is None:
        family = source.get("model_type") if source.get("model_type") in FAMILIES else guess_family(config)
    if family not in FAMILIES:
        raise InputError(f"--family {family!r}: choose one of {', '.join(FAMILIES)}")
    return family


def hf_config_from_lit(config: Config, family: str, dtype: str, base: Optional[dict] = None) -> dict:
    """config.json for transformers (or Qwen's remote code). `base` (the source config.json) keeps token ids etc."""
    if family in ("llama", "mistral", "qwen2"):
        if config.bias or config.norm_class != "RMSNorm" or not config.gated_mlp or config.parallel_residual:
            raise InputError(f"config {config.name!r} is not a {family} model (bias/LayerNorm/GELU/parallel residual)")
        if config.attn_bias != (family == "qwen2"):
            raise InputError(f"config {config.name!r}: attn_bias={config.attn_bias} does not fit family {family}")
        fields = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                      intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
                      num_attention_heads=config.n_head, num_key_value_heads=config.n_query_groups,
                      head_dim=config.head_size, hidden_act="silu", max_position_embeddings=config.block_size,
                      rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings)
        rope = {"rope_theta": config.rope_base}
        if family == "llama":
            fields.update(attention_bias=False, mlp_bias=False)
        if family == "mistral":
            fields.update(sliding_window=config.sliding_window)
        elif config.sliding_window:
            raise InputError(f"config {config.name!r} has a sliding window; only family mistral can express it")
        if family == "qwen2":
            fields.update(use_sliding_window=False)
    elif family == "qwen":
        fields = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, kv_channels=config.head_size,
                      intermediate_size=2 * config.intermediate_size, num_hidden_layers=config.n_layer,
                      num_attention_heads=config.n_head, seq_length=config.block_size,
                      layer_norm_epsilon=config.norm_eps, rotary_pct=config.rotary_percentage, no_bias=True,
                      tie_word_embeddings=config.tie_embeddings)
        rope = {"rotary_emb_base": config.rope_base}
    elif family == "gpt_neox":
        approx = {"none": "gelu", "tanh": "gelu_new"}[config.gelu_approximate]
        fields = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                      num_attention_heads=config.n_head, intermediate_size=config.intermediate_size,
                      hidden_act=approx, max_position_embeddings=config.block_size, layer_norm_eps=config.norm_eps,
                      use_parallel_residual=config.parallel_residual, attention_bias=True,
                      tie_word_embeddings=config.tie_embeddings)
        rope = {"rotary_emb_base": config.rope_base, "rotary_pct": config.rotary_percentage}
    else:
        raise InputError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")

    out = dict(base or {})
    out.update(architectures=[ARCHITECTURES[family]], model_type=family, **fields)
    if config.hf_repo:  # lets convert_hf_checkpoint.py pick this registered config again (base vs instruct)
        out["_name_or_path"] = config.hf_repo
    if out.get("rope_parameters"):  # a transformers >= 5 config.json: keep its layout
        new_keys = {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"}
        out["rope_parameters"] = {**out["rope_parameters"], **{new_keys.get(k, k): v for k, v in rope.items()}}
    else:
        out.update(rope)
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype
    return out
