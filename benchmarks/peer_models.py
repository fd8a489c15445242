"""Random-weight Hugging Face checkpoints for the peer trainers (Unsloth, transformers+peft) to load, written on the
GPU machine before benchmarks/bench_vs_peers.sh times them:

    python3 benchmarks/peer_models.py --arch llama-2-13b      # -> /tmp/llama-2-13b-random (skipped if already there)

mistral-7b is written by ../shared/anchors/anchor_hf_qlora.py's own build() (imported from .anchors/), so its
figures stay comparable with the anchors'; llama-2-13b (not in the anchor) is written the same way: the model built
in bf16 on the GPU, saved as bf16 safetensors, plus the anchor's stand-in WordLevel tokenizer (32,000 ids, <s>=1,
</s>=2). The folder is written under a temporary name and renamed when complete, so a run killed halfway never
leaves a folder that the next run would skip.
"""

import gc
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = [ROOT / ".anchors", ROOT.parent / "shared" / "anchors"]  # the carried copy first
# The Hugging Face configs of the models our table names (model.py's Mistral-7B-v0.1 and Llama-2-13b-hf shapes).
LLAMA_2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5,
                   tie_word_embeddings=False)
ARCHS = {"mistral-7b": "Mistral-7B-v0.1", "llama-2-13b": "Llama-2-13b-hf"}  # arch -> our registered name


def default_dir(arch: str) -> Path:
    return Path(f"/tmp/{arch}-random")


def load_anchor(filename: str):
    """Import one of ../shared/anchors' scripts as a module (its __main__ block does not run)."""
    env_dir = os.environ.get("ANCHORS_DIR")
    for folder in ([Path(env_dir)] if env_dir else []) + ANCHORS:
        path = folder / filename
        if path.is_file():
            spec = importlib.util.spec_from_file_location(Path(filename).stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise SystemExit(f"{filename}: not found in {', '.join(map(str, ANCHORS))}; build .anchors with "
                     "`bash ../shared/anchors/make_site.sh` and carry it to the GPU machine (or set ANCHORS_DIR)")


def is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and \
        any(path.glob("model*.safetensors"))


def write_stand_in_tokenizer(path: Path) -> None:
    """The anchor's stand-in: a WordLevel vocabulary t3..t31999 plus <unk>/<s>/</s> (no tokenizer is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(3, 32000)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>", model_max_length=32768).save_pretrained(path)


def write_llama(hf_config: dict, path: Path, device: str) -> None:
    """A random LlamaForCausalLM in bf16 straight away (a 13B in fp32 first would need 52 GB of GPU memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**hf_config))
    finally:
        torch.set_default_dtype(previous)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    write_stand_in_tokenizer(path)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(arch: str = "mistral-7b", out_dir: Optional[Path] = None, device: str = "cuda", force: bool = False) -> Path:
    """Write a random-weight Hugging Face checkpoint for a peer trainer unless it is already there.

    Args:
        arch: mistral-7b (the anchor's config) or llama-2-13b.
        out_dir: where to write it (default /tmp/<arch>-random, where the anchors look).
        device: where the random weights are made before saving (cuda is fast; cpu is for tests).
        force: rewrite it even if a complete folder is there.
    """
    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    path = Path(out_dir) if out_dir else default_dir(arch)
    if is_complete(path) and not force:
        print(json.dumps({"model_dir": str(path), "arch": arch, "built": False, "reason": "already there"}), flush=True)
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.time()
    print(f"writing random {arch} to {path} on {device} ...", file=sys.stderr, flush=True)
    if arch == "mistral-7b":
        if device != "cuda":
            raise SystemExit("--arch mistral-7b is written by the anchor's build(), which runs on cuda only")
        load_anchor("anchor_hf_qlora.py").build(arch, str(partial))
    else:
        write_llama(LLAMA_2_13B, partial, device)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    gib = sum(f.stat().st_size for f in path.iterdir()) / 2**30
    print(json.dumps({"model_dir": str(path), "arch": arch, "built": True, "s": round(time.time() - start, 1),
                      "disk_gib": round(gib, 1)}), flush=True)
    return path


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
