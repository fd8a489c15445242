"""Generate with a base model plus a LoRA adapter from finetune/lora.py (optionally on a 4-bit base).

    python generate/lora.py --adapter out/lora/SmolLM2-135M-Instruct-demo/adapter.safetensors --prompt "Name a colour."

The adapter file names its base checkpoint and LoRA settings, and its folder holds the prompt_style.json it was
trained with, so the prompt is wrapped exactly as in training. Sampling options and decoding are generate/base.py's.
"""

import sys
import time
from pathlib import Path
from typing import List, Literal, Optional, Union

from jsonargparse.typing import NonNegativeFloat, PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import InputError  # noqa: E402
from generate.base import Precision, Quantize, TopP, generate_and_print, pick_device, pick_dtype  # noqa: E402
from lora import load_adapter, merge_lora, read_adapter  # noqa: E402
from prompts import get_style, load_style, render  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from utils import adapter_base, load_model  # noqa: E402


def main(
    prompt: str = "What is the capital of France?",
    adapter: Optional[Path] = None,
    checkpoint_dir: Optional[str] = None,
    prompt_style: Optional[str] = None,
    input: str = "",
    num_samples: PositiveInt = 1,
    max_new_tokens: PositiveInt = 100,
    temperature: NonNegativeFloat = 0.8,
    top_k: Optional[PositiveInt] = 200,
    top_p: TopP = 1.0,
    seed: Optional[int] = None,
    stop: Optional[List[str]] = None,
    quantize: Optional[Union[Literal["auto", "none"], Quantize]] = "auto",
    precision: Precision = "auto",
    device: str = "auto",
    merge: bool = True,
) -> None:
    """Generate text with base model + LoRA adapter.

    Args:
        prompt: the instruction; it is wrapped in the prompt style the adapter was trained with.
        adapter: adapter.safetensors written by finetune/lora.py (or its folder).
        checkpoint_dir: base checkpoint; default the one the adapter was trained on.
        prompt_style: a style name (alpaca, chatml, ...) or "none" for the raw prompt; default the adapter folder's
            prompt_style.json.
        input: optional extra input/context shown in the style's input section.
        num_samples: how many completions to draw (decoded together as one batch).
        max_new_tokens: the most tokens to generate per completion.
        temperature: 0 (or anything at most 1e-6) is greedy.
        top_k: sample among the k most likely tokens only; null: all tokens.
        top_p: sample within the smallest set of tokens whose probability reaches p (0 < p <= 1).
        seed: random seed for reproducible sampling.
        stop: strings that end a completion; default the prompt style's stop strings.
        quantize: base weights: auto (as in training when on a GPU), none, bnb.nf4, bnb.nf4-dq, bnb.fp4,
            bnb.fp4-dq, bnb.int8.
        precision: bf16, fp16 or fp32; auto is bf16 on a GPU that supports it, else fp32.
        device: cuda, cpu or auto.
        merge: fold the adapter into an unquantized base before decoding (same outputs, faster).
    """
    if adapter is None:
        raise InputError("--adapter is required: the adapter.safetensors written by finetune/lora.py")
    adapter = Path(adapter)
    settings, _ = read_adapter(adapter)
    adapter_dir = adapter if adapter.is_dir() else adapter.parent
    device = pick_device(device)
    if quantize == "auto":
        quantize = settings.get("quantize") if device.startswith("cuda") else None
    quantize = None if quantize in (None, "none") else quantize
    dtype = pick_dtype(precision, device)
    checkpoint_dir = adapter_base(adapter, settings, checkpoint_dir)
    if prompt_style is None:
        style = load_style(adapter_dir, default=None) if (adapter_dir / "prompt_style.json").is_file() else \
            load_style(checkpoint_dir, default="plain")
    else:
        style = get_style("plain" if prompt_style == "none" else prompt_style)

    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    load_adapter(model, adapter)  # one clear error if the adapter belongs to another model
    if merge and quantize is None:
        merge_lora(model)
    model.eval()
    print(f"Loaded {checkpoint_dir} ({quantize or precision}) + {adapter} (step {settings.get('step')}) in "
          f"{time.perf_counter() - t0:.1f}s; prompt style {style.name!r}", file=sys.stderr)

    text = render(style, prompt, input) if prompt_style != "none" else prompt
    stops = list(stop) if stop is not None else list(style.stop)
    generate_and_print(model, tokenizer, text, num_samples, max_new_tokens, temperature, top_k, top_p, seed, stops)


if __name__ == "__main__":
    from cli import run

    run(main)
