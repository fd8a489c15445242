"""The prepared-data folder: written by prepare_data/, read by finetune/lora.py. Its format lives here and only here.

    data/mix/train.safetensors  tokens int32 (N,), loss_mask uint8 (N,), offsets int64 (n + 1,): sample i is
    data/mix/val.safetensors    tokens[offsets[i]:offsets[i + 1]]; loss_mask 1 marks a target token
    data/mix/meta.json          tokenizer fingerprint, max_seq_length, prompt style, counts (written last)

And the trainer's side of it: splits -> shifted examples -> packed rows or length-bucketed batches -> tensors.
"""

from __future__ import annotations

import bisect
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cli import InputError

if TYPE_CHECKING:  # the readers need torch; prepare_data/, which only writes, does not import it
    import torch

IGNORE = -100  # the target of a position that is not trained on (prompt, padding): cross-entropy's ignore_index
FIX = "prepare the data again with prepare_data/ (see README)"


def read_json(path: Path, fix: str = "fix the file", want_object: bool = False):
    """The JSON document in `path` (gzip-compressed if it ends in .gz); a missing, unreadable or malformed file is one
    line naming it and `fix`."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: not found; {fix}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip file ({e}); decompress it or download it again") from None
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror}); {fix}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark (Excel) is not data
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: line {line} (byte {e.start}) is not UTF-8 text; re-save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {fix}") from None
    if want_object and not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object {{...}}, found {type(data).__name__}; {fix}")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Writing (prepare_data/)


def save_split(path: Path, tokens: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    """One split file from per-sample token ids and loss masks (1 = a target token)."""
    from safetensors.numpy import save_file

    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    save_file({"tokens": np.concatenate(tokens).astype(np.int32) if len(tokens) else np.zeros(0, np.int32),
               "loss_mask": np.concatenate(masks).astype(np.uint8) if len(masks) else np.zeros(0, np.uint8),
               "offsets": offsets}, str(path))


def save_meta(folder: Path, meta: dict) -> None:
    """meta.json; prepare_data moves it into the data folder last, so a folder without it is unfinished."""
    (Path(folder) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Reading (finetune/lora.py)


@dataclass
class Split:
    tokens: torch.Tensor  # int64 (N,)
    loss_mask: torch.Tensor  # uint8 (N,)
    offsets: torch.Tensor  # int64 (n + 1,)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def sample(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[s:e], self.loss_mask[s:e]


def load_split(path: Path) -> Split:
    """Reads and checks one split file; every problem is one line naming the file and what to do."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; {FIX}")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); {FIX}") from None
    missing = [k for k in ("tokens", "loss_mask", "offsets") if k not in d]
    if missing:
        raise InputError(f"{path}: missing tensor(s) {missing}; expected tokens, loss_mask, offsets; {FIX}")
    tokens, mask, offsets = d["tokens"], d["loss_mask"], d["offsets"]
    if tokens.dim() != 1 or mask.shape != tokens.shape:
        raise InputError(f"{path}: tokens {tuple(tokens.shape)} and loss_mask {tuple(mask.shape)} must be 1-D of one "
                         f"length; {FIX}")
    if (offsets.dim() != 1 or not offsets.numel() or offsets.is_floating_point() or offsets[0] != 0
            or offsets[-1] != tokens.numel()):
        raise InputError(f"{path}: offsets must be integers running from 0 to len(tokens)={tokens.numel()}; {FIX}")
    if bool((offsets[1:] - offsets[:-1] < 2).any()):
        row = int((offsets[1:] - offsets[:-1] < 2).nonzero()[0])
        raise InputError(f"{path}: sample {row} has fewer than 2 tokens (or offsets decrease); {FIX}")
    if tokens.is_floating_point() or (tokens.numel() and int(tokens.min()) < 0):
        raise InputError(f"{path}: tokens must be non-negative integer ids; {FIX}")
    return Split(tokens.long(), mask.to(torch.uint8), offsets.long())


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():  # prepare_data moves it in last: without it the folder holds no finished preparation
        raise InputError(f"{path}: not found, so {data_dir} is not a finished prepared dataset; {FIX}")
    meta = read_json(path, "prepare the data again", want_object=True)
    value = meta.get("max_seq_length")
    if value is not None and not (type(value) is int and value > 0):
        raise InputError(f"{path}: max_seq_length {value!r} is not a positive whole number; prepare the data again "
                         "or pass --train.max_seq_length")
    return meta


def check_tokenizer(data_dir: Path, meta: dict, checkpoint_dir: Path, config, *splits: Split) -> None:
    """Token ids from another tokenizer train silently on nonsense: compare the tokenizer that prepared the data
    (its fingerprint in meta.json) with the checkpoint's, and for any data check that every id fits the vocabulary."""
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is not None:
        from tokenizer import Tokenizer

        ours = Tokenizer(checkpoint_dir).fingerprint()
        if recorded != ours:
            raise InputError(f"{data_dir}/meta.json: the data was tokenized by {meta.get('tokenizer_dir', '?')}'s "
                             f"tokenizer (fingerprint {recorded}), not {checkpoint_dir}'s ({ours}); prepare the data "
                             f"again with --checkpoint_dir {checkpoint_dir}")
    for name, split in zip(("train", "val"), splits):
        if split.tokens.numel() and int(split.tokens.max()) >= config.vocab_size:
            raise InputError(f"{data_dir}/{name}.safetensors: token id {int(split.tokens.max())} is outside the "
                             f"vocabulary of {config.name} ({config.vocab_size}); prepare the data with this model's "
                             "tokenizer")


@dataclass
class Examples:
    """Samples shifted for next-token prediction: inputs tokens[s:s+L], targets tokens[s+1:s+L+1]."""
    split: Split
    starts: torch.Tensor
    lengths: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.starts)


def make_examples(split: Split, max_seq_length: int, limit: Optional[int] = None) -> Examples:
    import torch
    starts = split.offsets[:-1]
    lengths = (split.lengths() - 1).clamp(max=max_seq_length)
    # Drop samples whose kept part has no target token: they would only cost compute.
    csum = torch.cat([torch.zeros(1, dtype=torch.long), split.loss_mask.long().cumsum(0)])
    has_target = csum[starts + lengths + 1] - csum[starts + 1] > 0
    starts, lengths = starts[has_target], lengths[has_target]
    if limit is not None:
        starts, lengths = starts[:limit], lengths[:limit]
    return Examples(split, starts, lengths)


def pack(lengths: List[int], capacity: int) -> List[List[int]]:
    """Best-fit decreasing: sample ids grouped into rows of at most `capacity` tokens (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # sorted (free tokens, row id)
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def epoch_batches(examples: Examples, rows: Optional[List[List[int]]], micro_batch_size: int, seed: int,
                  epoch: int) -> List[List[List[int]]]:
    """The micro-batches of one epoch, a pure function of (seed, epoch) so --resume can find its place again.
    Each micro-batch is a list of rows; a row is a list of sample ids (one id when not packing)."""
    import torch
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if rows is not None:
        order = torch.randperm(len(rows), generator=g).tolist()
        shuffled = [rows[i] for i in order]
        return [shuffled[i:i + micro_batch_size] for i in range(0, len(shuffled), micro_batch_size)]
    # Length buckets: sort shuffled chunks by length so a micro-batch pads little, then shuffle the micro-batches.
    order = torch.randperm(examples.n, generator=g).tolist()
    chunk = micro_batch_size * 64
    lengths = examples.lengths.tolist()
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i])
        batches += [[[i] for i in part[j:j + micro_batch_size]] for j in range(0, len(part), micro_batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def collate(examples: Examples, batch: List[List[int]], packed: bool, device, fixed_length: Optional[int] = None,
            fixed_rows: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-padded (B, T) inputs and targets (IGNORE on prompt and padding); for packed rows also segment ids.
    fixed_length / fixed_rows pad every batch to that T / B (rows of padding only: no target) and always include
    the segment ids: the CUDA graph's fixed shapes."""
    import torch
    split = examples.split
    rows_idx, rows_tgt, rows_seg = [], [], []
    for row in batch:
        idx, tgt, seg = [], [], []
        for n, i in enumerate(row):
            s, L = int(examples.starts[i]), int(examples.lengths[i])
            idx.append(split.tokens[s:s + L])
            t = split.tokens[s + 1:s + L + 1].clone()
            t[split.loss_mask[s + 1:s + L + 1] == 0] = IGNORE
            tgt.append(t)
            seg.append(torch.full((L,), n, dtype=torch.long))
        rows_idx.append(torch.cat(idx))
        rows_tgt.append(torch.cat(tgt))
        rows_seg.append(torch.cat(seg))
    T = fixed_length or max(len(r) for r in rows_idx)
    B = max(len(rows_idx), fixed_rows or 0)
    idx = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)  # padding: a segment of its own, attends only to itself
    n_tokens = 0
    for b in range(len(rows_idx)):
        L = len(rows_idx[b])
        idx[b, :L], targets[b, :L], segments[b, :L] = rows_idx[b], rows_tgt[b], rows_seg[b]
        n_tokens += L
    out = {"idx": idx.to(device), "targets": targets.to(device), "n_tokens": torch.tensor(n_tokens)}
    if packed and (fixed_length or any(len(row) > 1 for row in batch)):
        out["segments"] = segments.to(device)
    return out
