"""Merge a LoRA adapter into its base model and write a standalone checkpoint (bf16 by default).

    python scripts/merge_lora.py --adapter out/lora/run/adapter.safetensors --out_dir checkpoints/merged

The adapter file knows its base checkpoint, rank, alpha and targets, so no training flags are repeated. The base
streams through tensor by tensor (host RAM stays near one tensor plus one output shard). For an adapter trained on a
4-bit base (QLoRA), `--base_weights trained` (default) merges onto the base weights as the adapter saw them
(quantized, then dequantized with bitsandbytes), so the merged model computes what was trained; `original` merges
onto the unquantized weights instead. The result (model_config.json, oneday/weights*.safetensors, tokenizer files,
prompt_style.json) loads like any converted checkpoint and scripts/convert_lit_checkpoint.py exports it.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import InputError  # noqa: E402
from generate.base import pick_device  # noqa: E402
from lora import LoRAConfig, check_adapter_fits, delta_weight, read_adapter, target_modules  # noqa: E402
from utils import (adapter_base, install_shards, iter_checkpoint, load_config, output_folder,  # noqa: E402
                   save_safetensors, shard_part)

SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "qwen.tiktoken")


def main(
    adapter: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    checkpoint_dir: Optional[str] = None,
    base_weights: Literal["trained", "original"] = "trained",
    precision: Literal["bf16", "fp16", "fp32"] = "bf16",
    device: str = "auto",
) -> None:
    """Merge an adapter into its base model.

    Args:
        adapter: adapter.safetensors written by finetune/lora.py (or its folder).
        out_dir: folder for the merged checkpoint (created; existing model files are replaced); default
            <adapter folder>/merged.
        checkpoint_dir: base checkpoint; default the one the adapter was trained on (stored in the adapter).
        base_weights: for adapters trained on a 4-bit base: merge onto the weights as trained (quantized and
            dequantized, default) or onto the original unquantized weights.
        precision: dtype of the merged weights.
        device: where the merge arithmetic runs (cuda, cpu or auto).
    """
    if adapter is None:
        raise InputError("--adapter is required: the adapter.safetensors written by finetune/lora.py")
    adapter = Path(adapter)
    settings, tensors = read_adapter(adapter)
    checkpoint_dir = adapter_base(adapter, settings, checkpoint_dir)
    config = load_config(checkpoint_dir)
    check_adapter_fits(settings, config, adapter)
    device = pick_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    lora = LoRAConfig(**settings["lora"])
    quantize = settings.get("quantize") if base_weights == "trained" else None
    if quantize == "bnb.int8":
        quantize = None  # LLM.int8 computes outliers in 16 bit: its weights are not a fixed dequantized matrix
    if quantize is not None:
        from quantize import is_quantized_linear, roundtrip

    deltas = {}
    for module, parts in target_modules(config, lora).items():
        A, B = tensors[f"{module}.lora_A"].to(device), tensors[f"{module}.lora_B"].to(device)
        if parts is None:  # the whole output; only the fused qkv has parts
            out_features = B.shape[0]
            parts = [(0, out_features)]
        else:
            out_features = (config.n_head + 2 * config.n_query_groups) * config.head_size
        deltas[f"{module}.weight"] = (A, B, parts, out_features)

    def merged(name: str, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(device=device, dtype=dtype)
        if quantize is not None and is_quantized_linear(name):
            w = roundtrip(w.to(torch.bfloat16 if dtype == torch.float16 else dtype), quantize).to(dtype)
        if name in deltas:
            A, B, parts, out_features = deltas[name]
            w = (w.float() + delta_weight(A, B, parts, lora.r, lora.scaling, out_features)).to(dtype)
        return w.cpu()

    out_dir = output_folder(out_dir or (adapter.parent if adapter.is_file() else adapter) / "merged", "--out_dir",
                            checkpoint_dir)
    untie = config.tie_embeddings and "lm_head.weight" in deltas
    shards, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            path = shard_part(out_dir, len(shards))
            save_safetensors(shard, path, metadata={"format": "pt"})
            shards.append(path)
            shard, size = {}, 0

    n = 0
    for name, tensor in iter_checkpoint(checkpoint_dir):
        outputs = [(name, merged(name, tensor))]
        if untie and name == "wte.weight":  # a LoRA head on tied embeddings: the head gets its own merged copy
            outputs.append(("lm_head.weight", merged("lm_head.weight", tensor)))
        for out_name, t in outputs:
            shard[out_name] = t.contiguous()
            size += t.numel() * t.element_size()
            n += 1
        if size >= SHARD_BYTES:
            flush()
        if n % 64 == 0:
            print(f"merged {n} tensors", file=sys.stderr)
    flush()
    install_shards(out_dir, shards)  # replaces the weights of an earlier merge into out_dir

    if untie:
        config.tie_embeddings = False
    config.to_json(out_dir / "model_config.json")
    for f in TOKENIZER_FILES:
        if (checkpoint_dir / f).is_file():
            shutil.copy(checkpoint_dir / f, out_dir / f)
    style = adapter.parent / "prompt_style.json" if adapter.is_file() else adapter / "prompt_style.json"
    if style.is_file():
        shutil.copy(style, out_dir / "prompt_style.json")
    elif (checkpoint_dir / "prompt_style.json").is_file():
        shutil.copy(checkpoint_dir / "prompt_style.json", out_dir / "prompt_style.json")
    else:
        print(f"note: no prompt_style.json next to {adapter} or in {checkpoint_dir}; the server will need --prompt_style",
              file=sys.stderr)
    (out_dir / "merge_info.json").write_text(json.dumps({"adapter": str(adapter), "base": str(checkpoint_dir),
                                                          "base_weights": base_weights, "quantize": settings.get("quantize"),
                                                          "lora": settings["lora"], "step": settings.get("step")},
                                                         indent=2) + "\n")
    print(f"Merged {adapter} into {checkpoint_dir} -> {out_dir} ({precision}, {len(shards)} shard(s))", file=sys.stderr)


if __name__ == "__main__":
    from cli import run

    run(main)
