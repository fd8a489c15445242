"""Export one of our checkpoints back to the Hugging Face layout, for transformers or vLLM users.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/merged --out_dir out/merged-hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/merged-hf')"

Writes model.safetensors (or model-0000i-of-0000N.safetensors + model.safetensors.index.json), config.json for the
family's transformers class and copies the tokenizer files. First-generation Qwen has no transformers class: its
original names and config.json are written (load with trust_remote_code and Qwen's code files, copied when present).
Name tables: scripts/hf_names.py.
"""

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from jsonargparse.typing import PositiveFloat
from safetensors import safe_open

from cli import InputError
from convert_hf_checkpoint import TOKENIZER_FILES
from hf_names import FAMILIES, hf_config_from_lit, lit_to_hf, pick_family
from utils import iter_checkpoint, load_config, output_folder, resolve_checkpoint_dir, save_safetensors


def setup(checkpoint_dir: Path, out_dir: Path, family: Optional[Literal[FAMILIES]] = None,
          max_shard_size_gb: PositiveFloat = 5.0) -> None:
    """Export a checkpoint folder (model_config.json + oneday/weights*.safetensors) as a Hugging Face model folder.

    Args:
        checkpoint_dir: Our checkpoint folder (from convert_hf_checkpoint.py, convert_gguf_checkpoint.py or a merged
            fine-tune).
        out_dir: Folder to write (created); must differ from checkpoint_dir.
        family: Hugging Face model_type to write: llama, mistral, qwen2, qwen (first-generation) or gpt_neox.
            Default: the model_type of checkpoint_dir/config.json when there is one, else guessed from the config.
        max_shard_size_gb: Start a new safetensors shard past this many GB.
    """
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    config = load_config(checkpoint_dir)
    source_path = checkpoint_dir / "config.json"  # the original config.json when converted in place
    source = json.loads(source_path.read_text()) if source_path.is_file() else {}
    family = pick_family(config, source, family)
    base = source if source.get("model_type") == family else None
    hf_config_from_lit(config, family, "float32", base)  # a config the family cannot express fails before writing

    out_dir = output_folder(out_dir, "--out_dir", checkpoint_dir)
    started = time.perf_counter()
    current: Dict[str, torch.Tensor] = {}
    shard_bytes, dtype = 0, None
    parts: List[Path] = []
    for name, tensor in iter_checkpoint(checkpoint_dir):
        dtype = dtype or tensor.dtype
        try:
            converted = lit_to_hf(family, config, name, tensor)
        except KeyError as e:
            raise InputError(f"{checkpoint_dir}: {e.args[0]}; is --family right?") from None
        for hf_name, t in converted:
            nbytes = t.numel() * t.element_size()
            if shard_bytes and shard_bytes + nbytes > max_shard_size_gb * 1e9:
                parts.append(_write_part(current, out_dir, len(parts), started))
                current, shard_bytes = {}, 0  # drop the written tensors
            current[hf_name] = t
            shard_bytes += nbytes
    parts.append(_write_part(current, out_dir, len(parts), started))

    # Shard names carry the count, known only now (as save_pretrained names them).
    finals = ["model.safetensors"] if len(parts) == 1 else [
        f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    weight_map = {}
    for part, final in zip(parts, finals):
        with safe_open(str(part), framework="pt") as f:
            weight_map.update({k: final for k in f.keys()})
        part.replace(out_dir / final)
    if len(parts) > 1:
        total = sum((out_dir / f).stat().st_size for f in finals)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = hf_config_from_lit(config, family, dtype_name, base)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    copied = []
    extra = sorted(checkpoint_dir.glob("*.py")) if family == "qwen" else []  # Qwen's remote code
    for file in [checkpoint_dir / n for n in TOKENIZER_FILES] + extra:
        if file.is_file():
            shutil.copy2(file, out_dir / file.name)
            copied.append(file.name)
    print(f"{out_dir}: {family} ({hf_config['architectures'][0]}), {len(weight_map)} tensors in {len(parts)} shard(s), "
          f"copied {', '.join(copied) or 'no tokenizer files'}; {time.perf_counter() - started:.0f}s", file=sys.stderr)


def _write_part(tensors: Dict[str, torch.Tensor], out_dir: Path, i: int, started: float) -> Path:
    part = out_dir / f"shard-{i:05d}.safetensors.part"
    # transformers refuses safetensors files without format metadata.
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, part, metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    print(f"[shard {i + 1}] {len(tensors)} tensors, {size:.2f} GB, {time.perf_counter() - started:.0f}s",
          file=sys.stderr)
    return part


if __name__ == "__main__":
    from cli import run

    run(setup)
