"""Generate text with a converted checkpoint: greedy or sampled, batched prompts, stop strings, optional 4-bit weights.

    python generate/base.py --checkpoint_dir smollm2-135m --prompt "What is the capital of France?"
"""

import sys
import time
from pathlib import Path
from typing import Callable, List, Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt, restricted_number_type

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import InputError  # noqa: E402
from model import GPT, padded_mask  # noqa: E402
from quantize import Mode as Quantize  # noqa: E402,F401  (the scripts' --quantize type)
from tokenizer import Tokenizer  # noqa: E402
from utils import load_model, resolve_checkpoint_dir  # noqa: E402

GREEDY_TEMPERATURE = 1e-6  # at or below this, sampling is argmax (HELM asks for greedy with 1e-7)
# Flag types shared by the generate/ scripts (quantize.MODES; tests/test_generate.py checks they agree).
Precision = Literal["auto", "bf16", "fp16", "fp32"]
TopP = restricted_number_type("TopP", float, [(">", 0), ("<=", 1)])


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,)."""
    if temperature <= GREEDY_TEMPERATURE:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), num_samples=1,
                             generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample` draws from: logits (B, vocab) at a temperature, cut to top-k and top-p, softmaxed.
    Row by row, so one call for rows of the same settings gives each row what a call for it alone gives."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Keep the smallest set of most likely tokens whose probability reaches top_p: drop a token once the
        # tokens before it already reach it.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


@torch.inference_mode()
def generate(model: GPT, prompts: List[torch.Tensor], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: float = 1.0, eos_id: Optional[int] = None,
             stop: Optional[Callable[[List[int]], bool]] = None,
             generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """Decodes a batch of prompts of different lengths together with a KV cache; returns each row's new tokens.

    Prompts are left-padded; the mask keeps padding out of attention and each row's RoPE positions start at 0, so
    a row's tokens are the ones it would get alone. A row ends at `eos_id` (not returned) or when `stop(new_tokens)`
    says so (the tokens up to then are returned; cutting a stop string out of the text is the caller's job).
    """
    device = model.wte.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    total = longest + max_new_tokens
    if total > model.config.block_size:
        raise InputError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"of {model.config.block_size} tokens; shorten the prompt or ask for fewer tokens")
    B = len(prompts)
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    key_valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        idx[row, longest - len(p):] = p.to(device)
        key_valid[row, longest - len(p):] = True
    pad = torch.tensor([longest - n for n in lengths], device=device)

    model.set_kv_cache(B, total)
    try:
        input_pos = torch.arange(longest, device=device)
        out = [[] for _ in range(B)]
        done = [max_new_tokens == 0] * B
        window = model.config.sliding_window
        for _ in range(max_new_tokens):
            pos_ids = (input_pos.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
            logits = model(idx, input_pos=input_pos, pos_ids=pos_ids, mask=padded_mask(key_valid, input_pos, window))
            next_ids = sample(logits[:, -1], temperature, top_k, top_p, generator)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if token == eos_id:
                    done[row] = True
                    continue
                out[row].append(token)
                if stop is not None and stop(out[row]):
                    done[row] = True
            if all(done):
                break
            input_pos = input_pos[-1:] + 1
            key_valid[:, input_pos] = True
            idx = next_ids.unsqueeze(1)
        return out
    finally:
        model.clear_kv_cache()


def render_chat(tokenizer: Tokenizer, user_message: str) -> str:
    """The checkpoint's own chat template (Jinja, as shipped in tokenizer_config.json) around one user message."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tokenizer.chat_template)
    return template.render(messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                           bos_token="", eos_token="")


def stop_at_strings(tokenizer: Tokenizer, stop_strings: List[str]) -> Optional[Callable[[List[int]], bool]]:
    if not stop_strings:
        return None
    return lambda tokens: any(s in tokenizer.decode(tokens) for s in stop_strings)


def cut_at_stop(text: str, stop_strings: List[str]) -> str:
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


def seeded_generator(device, seed: int) -> torch.Generator:
    # torch takes seeds in [-2**63, 2**64); JSON and the command line allow any integer.
    return torch.Generator(device).manual_seed(seed % 2**64)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def pick_dtype(precision: str, device: str) -> torch.dtype:
    """bf16, fp16 or fp32; auto is bf16 on a GPU that supports it, else fp32."""
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in dtypes:
        raise InputError(f"--precision {precision!r}: choose bf16, fp16, fp32 or auto")
    return dtypes[precision]


def check_quantize_device(quantize: Optional[str], device: str) -> None:
    if quantize is not None and not device.startswith("cuda"):
        raise InputError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); drop it to run on {device}")


def main(
    prompt: str = "What is the capital of France?",
    checkpoint_dir: str = "smollm2-135m",
    chat: Optional[bool] = None,
    num_samples: PositiveInt = 1,
    max_new_tokens: PositiveInt = 100,
    temperature: NonNegativeFloat = 0.8,
    top_k: Optional[PositiveInt] = 200,
    top_p: TopP = 1.0,
    seed: Optional[int] = None,
    stop: Optional[List[str]] = None,
    quantize: Optional[Quantize] = None,
    precision: Precision = "auto",
    device: str = "auto",
) -> None:
    """Generate text from a prompt.

    Args:
        prompt: the input text.
        checkpoint_dir: a converted checkpoint folder or a registered name (e.g. mistral-7b, smollm2-135m).
        chat: wrap the prompt in the checkpoint's chat template; default: yes when the checkpoint has one.
        num_samples: how many completions to draw (decoded together as one batch).
        max_new_tokens: the most tokens to generate per completion.
        temperature: 0 (or anything at most 1e-6) is greedy.
        top_k: sample among the k most likely tokens only; null: all tokens.
        top_p: sample within the smallest set of tokens whose probability reaches p (0 < p <= 1).
        seed: random seed for reproducible sampling.
        stop: strings that end a completion (cut from the output).
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8 base weights through bitsandbytes (GPU only).
        precision: bf16, fp16 or fp32; auto is bf16 on a GPU that supports it, else fp32.
        device: cuda, cpu or auto.
    """
    device = pick_device(device)
    dtype = pick_dtype(precision, device)
    check_quantize_device(quantize, device)
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    print(f"Loaded {checkpoint_dir} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    if chat is None:
        chat = tokenizer.chat_template is not None
    text = render_chat(tokenizer, prompt) if chat else prompt
    generate_and_print(model, tokenizer, text, num_samples, max_new_tokens, temperature, top_k, top_p, seed, stop or [])


def generate_and_print(model: GPT, tokenizer: Tokenizer, text: str, num_samples: int, max_new_tokens: int,
                       temperature: float, top_k: Optional[int], top_p: float, seed: Optional[int],
                       stops: List[str]) -> None:
    """The command-line tail shared with generate/lora.py: sample, print each completion, then speed and memory."""
    device = model.wte.weight.device
    generator = seeded_generator(device, seed) if seed is not None else None
    stops = [s for s in stops if s]  # an empty stop string would end every completion before it starts
    t0 = time.perf_counter()
    outputs = generate(model, [tokenizer.encode(text)] * num_samples, max_new_tokens, temperature, top_k, top_p,
                       tokenizer.eos_id, stop_at_strings(tokenizer, stops), generator)
    elapsed = time.perf_counter() - t0
    for tokens in outputs:
        print(cut_at_stop(tokenizer.decode(tokens), stops))
        print("-" * 40)
    n = sum(len(t) for t in outputs)
    print(f"{n} tokens in {elapsed:.2f}s ({n / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    if device.type == "cuda":
        print(f"Peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)


if __name__ == "__main__":
    from cli import run

    run(main)
