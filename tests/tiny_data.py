"""A tiny prepared-data folder in the format prepare_data/ writes (train/val .safetensors with tokens, loss_mask,
offsets; meta.json; prompt_style.json), with a pattern a tiny model learns in a few steps."""

import json
from pathlib import Path
from typing import List, Tuple

import torch
from safetensors.torch import save_file


def write_split(path: Path, samples: List[Tuple[List[int], List[int]]]) -> None:
    """samples: (tokens, loss_mask) pairs."""
    tokens = torch.tensor([t for s, _ in samples for t in s], dtype=torch.int32)
    mask = torch.tensor([m for _, ms in samples for m in ms], dtype=torch.uint8)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(s) for s, _ in samples]).cumsum(0)
    save_file({"tokens": tokens, "loss_mask": mask, "offsets": offsets}, str(path))


def make_samples(n: int, vocab: int, seed: int, eos: int = 2) -> List[Tuple[List[int], List[int]]]:
    """Prompt: a few random tokens; response: the prompt's first token repeated, then a fixed phrase, then EOS."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        p_len = int(torch.randint(2, 12, (1,), generator=g))
        prompt = torch.randint(10, vocab, (p_len,), generator=g).tolist()
        response = [prompt[0]] * 3 + [5, 6, 7, 8] + [eos]
        samples.append((prompt + response, [0] * p_len + [1] * len(response)))
    return samples


def make_data_dir(folder: Path, vocab: int, n_train: int = 64, n_val: int = 16, prompt_style: str = "alpaca") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_split(folder / "train.safetensors", make_samples(n_train, vocab, seed=1))
    write_split(folder / "val.safetensors", make_samples(n_val, vocab, seed=2))
    (folder / "meta.json").write_text(json.dumps({"prompt_style": prompt_style, "max_seq_length": 32,
                                                  "n_train": n_train, "n_val": n_val}))
    from prompts import save_style

    save_style(folder, prompt_style)
    return folder
