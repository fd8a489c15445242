"""Convert a downloaded Hugging Face checkpoint folder into the project's checkpoint format, beside the download.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/mistralai/Mistral-7B-v0.1

Reads config.json and the weight shards (model*.safetensors preferred, else pytorch_model*.bin), one shard at a
time and tensor by tensor, so a 14B model never sits twice in RAM: only q/k/v pieces waiting to be fused are held
across tensors. Writes one of our shards per input shard (oneday/weights*.safetensors, see utils.WEIGHTS), then
model_config.json. The Hugging Face files are never changed, so transformers and vLLM still load the same folder.
A folder converted by an older version (our tensors in model*.safetensors) has its shards moved to oneday/.
Name tables: scripts/hf_names.py.
"""

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from safetensors import SafetensorError, safe_open

from cli import InputError
from hf_names import HFToLit, config_from_hf, family_of
from model import Config, configs
from utils import (CONVERTED_BY, WEIGHTS, checkpoint_files, install_shards, old_weight_files, output_folder,
                   save_safetensors, shard_part)

# Files a checkpoint folder keeps next to the weights (tokenizer, chat template, generation defaults, Qwen's code).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "qwen.tiktoken")
# Config fields that describe the architecture; a registered config is used only if all of them agree.
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_query_groups", "n_embd", "head_size", "intermediate_size",
                "rotary_percentage", "rope_base", "norm_class", "norm_eps", "gated_mlp", "gelu_approximate", "bias",
                "attn_bias", "parallel_residual", "tie_embeddings", "sliding_window")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A download's weight files, preferred first, and the index that lists its shards.
HF_WEIGHTS = (("model*.safetensors", "model.safetensors.index.json"),
              ("pytorch_model*.bin", "pytorch_model.bin.index.json"))


def setup(checkpoint_dir: Path, model_name: Optional[str] = None,
          dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None, out_dir: Optional[Path] = None,
          drop_source: bool = False) -> None:
    """Convert the Hugging Face files in a folder (from scripts/download.py) into our checkpoint format.

    Args:
        checkpoint_dir: Folder with config.json, model*.safetensors or pytorch_model*.bin, and tokenizer files.
        model_name: A registered config name (model.py) to use; default: the registered config whose fields match
            config.json, else a config built from config.json itself (named after the folder).
        dtype: Cast the weights to float32, bfloat16 or float16; default: keep the checkpoint's dtype.
        out_dir: Write our checkpoint here instead of beside the download (tokenizer files and config.json are copied).
        drop_source: Once converted, delete the download's weight files (and their index), keeping its config and
            tokenizer: a 7B model then takes its size on disk once, not twice (transformers can no longer load the
            folder; scripts/convert_lit_checkpoint.py exports ours back).
    """
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir
    old = old_weight_files(checkpoint_dir)
    if old:  # the download those versions replaced is gone: renaming is all there is to do
        moved = install_shards(checkpoint_dir, old)
        print(f"{checkpoint_dir}: moved {', '.join(f.name for f in old)} (converted by an older version) to "
              f"{', '.join(str(f.relative_to(checkpoint_dir)) for f in moved)}", file=sys.stderr)
        return
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: not found; download the model first "
                         "(python scripts/download.py --repo_id ORG/NAME)")
    try:
        hf_config = json.loads(config_path.read_text())
        family = family_of(hf_config, config_path)
        derived = config_from_hf(hf_config, name=checkpoint_dir.name, path=config_path)
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as e:  # not JSON, fields missing or odd
        raise InputError(f"{config_path}: not a usable Hugging Face config ({type(e).__name__}: {e}); "
                         "download the model again") from None
    config = pick_config(derived, model_name, checkpoint_dir, hf_config.get("_name_or_path") or "")
    if already_converted(out_dir):
        if not newer_download(checkpoint_dir, out_dir):
            print(f"{out_dir}: already converted ({WEIGHTS}*.safetensors and model_config.json are there); "
                  f"delete {(out_dir / WEIGHTS).parent} to convert again", file=sys.stderr)
            if drop_source:
                delete_download(checkpoint_dir)
            return
        # A newer revision downloaded into the same folder: our shards are of the old one
        print(f"{checkpoint_dir}: the download is newer than {out_dir / 'model_config.json'}; converting again",
              file=sys.stderr)
    files = weight_files(checkpoint_dir)

    output_folder(out_dir, "--out_dir")
    convert = HFToLit(family, config)
    started = time.perf_counter()
    written: List[Path] = []
    for i, file in enumerate(files):
        tensors: Dict[str, torch.Tensor] = {}
        for hf_name, tensor in read_shard(file):
            try:
                converted = convert(hf_name, tensor)
            except KeyError as e:
                raise InputError(f"{file}: {e.args[0]}") from None
            for name, t in converted:
                tensors[name] = t.to(DTYPES[dtype]).contiguous() if dtype else t.contiguous()
        # Written under a temporary name: shards get their final names once every one converted.
        part = shard_part(out_dir, i)
        save_safetensors(tensors, part, metadata={"format": "pt", "converted_by": CONVERTED_BY})
        written.append(part)
        size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
        print(f"[{i + 1}/{len(files)}] {file.name}: {len(tensors)} tensors, {size:.2f} GB, "
              f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
        del tensors
    if convert.leftover():
        for part in written:
            part.unlink()
        raise InputError(f"{checkpoint_dir}: incomplete checkpoint, missing q/k/v pieces for "
                         f"{'; '.join(convert.leftover()[:3])}; download it again")

    if out_dir.resolve() != checkpoint_dir.resolve():
        keep = [checkpoint_dir / name for name in TOKENIZER_FILES + ("config.json",)]
        for file in keep + sorted(checkpoint_dir.glob("*.py")):  # *.py: Qwen's remote code, for the way back
            if file.is_file():
                shutil.copy2(file, out_dir / file.name)
    finals = install_shards(out_dir, written)
    if (out_dir / "qwen.tiktoken").is_file() and not (out_dir / "tokenizer.json").is_file():
        from tokenizer import convert_tiktoken  # first-generation Qwen: so the runtime needs only `tokenizers`

        convert_tiktoken(out_dir)
    config.to_json(out_dir / "model_config.json")
    shards = ", ".join(str(f.relative_to(out_dir)) for f in finals)
    print(f"{out_dir}: wrote model_config.json ({config.name}) and {shards} in {time.perf_counter() - started:.0f}s",
          file=sys.stderr)
    if drop_source:
        delete_download(checkpoint_dir)


def download_files(checkpoint_dir: Path) -> List[Path]:
    """Every weight file and index of the download in the folder (HF_WEIGHTS; our shards live in oneday/)."""
    return [f for pattern, index in HF_WEIGHTS for f in [*sorted(checkpoint_dir.glob(pattern)), checkpoint_dir / index]
            if f.is_file()]


def delete_download(checkpoint_dir: Path) -> None:
    """The Hugging Face weight files and their index (--drop_source): never our shards, config or tokenizer."""
    files = download_files(checkpoint_dir)
    for file in files:
        file.unlink()
    if files:
        print(f"{checkpoint_dir}: deleted the download's weights ({len(files)} files, --drop_source)", file=sys.stderr)


def pick_config(derived: Config, model_name: Optional[str], checkpoint_dir: Path, source_repo: str = "") -> Config:
    """The registered config for these weights (by name, or the one whose fields all match), else `derived`.

    source_repo: config.json's `_name_or_path` (our exports write the hf_repo there), to tell apart variants that
    share their shapes (SmolLM2-135M and -Instruct)."""
    if model_name is not None:
        try:
            registered = Config.from_name(model_name)  # unknown names raise with close suggestions
        except ValueError as e:
            raise InputError(str(e)) from None
        for field in SHAPE_FIELDS:
            if getattr(registered, field) != getattr(derived, field):
                raise InputError(f"--model_name {model_name}: {field}={getattr(registered, field)!r} but "
                                 f"{checkpoint_dir / 'config.json'} says {getattr(derived, field)!r}; "
                                 "leave --model_name out to use config.json")
        return registered
    matches = [c for c in configs if all(getattr(Config(**c), f) == getattr(derived, f) for f in SHAPE_FIELDS)]
    # Base and instruct variants share their shapes: prefer the one config.json or the folder is named after.
    matches.sort(key=lambda c: (c["hf_repo"].lower() != source_repo.lower(),
                                c["hf_repo"].split("/")[-1].lower() != checkpoint_dir.name.lower()))
    if matches:
        print(f"{checkpoint_dir}: using registered config {matches[0]['name']}", file=sys.stderr)
        return Config(**matches[0])
    print(f"{checkpoint_dir}: no registered config matches config.json; using it as is (name {derived.name!r})",
          file=sys.stderr)
    return derived


def weight_files(checkpoint_dir: Path) -> List[Path]:
    """The weight shards in order; a missing shard raises, naming the file."""
    for pattern, index_name in HF_WEIGHTS:
        index = checkpoint_dir / index_name
        if index.is_file():
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [checkpoint_dir / name for name in listed]
        else:
            files = sorted(p for p in checkpoint_dir.glob(pattern) if p.is_file())
            # "model-00002-of-00003.safetensors" says how many shards there should be.
            m = re.search(r"-(\d+)-of-(\d+)\.", files[0].name) if files else None
            if m:
                head, tail, width = files[0].name[: m.start(1)], files[0].name[m.end(1):], len(m.group(1))
                files = [checkpoint_dir / f"{head}{i:0{width}d}{tail}" for i in range(1, int(m.group(2)) + 1)]
        if files:
            for file in files:
                if not file.is_file():
                    raise InputError(f"{file}: missing checkpoint shard; download the model again")
            return files
    raise InputError(f"{checkpoint_dir}: no model*.safetensors or pytorch_model*.bin weights; "
                     "download the model first (python scripts/download.py --repo_id ORG/NAME)")


def already_converted(folder: Path) -> bool:
    try:
        return bool(checkpoint_files(folder)) and (folder / "model_config.json").is_file()
    except InputError:
        return False


def newer_download(checkpoint_dir: Path, out_dir: Path) -> bool:
    """Whether a Hugging Face weight file or config.json changed after our conversion wrote model_config.json."""
    converted = (out_dir / "model_config.json").stat().st_mtime
    sources = [checkpoint_dir / "config.json", *download_files(checkpoint_dir)]
    return any(f.is_file() and f.stat().st_mtime > converted for f in sources)


def read_shard(file: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one shard, read lazily (safetensors) or memory-mapped (.bin)."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise InputError(f"{file}: unreadable safetensors shard ({e}); it may be truncated, "
                             "download it again") from None
        return
    try:
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip/pickle errors of a truncated download come in many types
        reason = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{file}: unreadable PyTorch shard ({type(e).__name__}: {reason}); it may be truncated, "
                         "download it again") from None
    for name in list(state):
        yield name, state.pop(name)


if __name__ == "__main__":
    from cli import run

    run(setup)
