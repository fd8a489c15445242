"""Packed rows' attention through FlexAttention: model.document_mask as a BlockMask.

A packed row holds several documents, and a token attends only to earlier tokens of its own document. Written out
as a dense (B, 1, T, T) mask, that sends SDPA to its masked kernel: slower than causal flash attention, and each layer
keeps the mask, tiled over the query heads and turned into a bias, for its backward pass. A BlockMask says the same
per 128 x 128 tile: which tiles hold no allowed pair (skipped, so attention costs what the documents' own triangles
cost, less than a causal row), which are allowed throughout (no mask computed), and for the rest the rule itself
(document_mask_mod), which the compiled kernel evaluates in registers. It is made once per micro-batch and shared by
all layers (fast.packed_mask).

Why FlexAttention and not variable-length flash attention (torch.nn.attention.varlen): for a fixed (B, T) the
BlockMask has fixed shapes, so a CUDA graph (fast/memory.py) captures its making and replays it with each
micro-batch's segment ids, where varlen's document offsets change length with the number of documents and its
maximum length is a Python number; FlexAttention takes q, k and v in SDPA's (B, heads, T, hs) layout with GQA and
the sliding window in the same call, where varlen wants the tokens of all rows in one (tokens, heads, hs) tensor and,
in torch versions before its enable_gqa flag, K/V repeated for every query head.
`benchmarks/benchmark_finetune.py --attention true` times the two, and SDPA's causal and masked kernels, side by side.
"""

from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def document_block_mask(segments: torch.Tensor, window: Optional[int] = None) -> BlockMask:
    """model.document_mask(segments, window) as a BlockMask: segments (B, T) numbers the documents of each row, -1 on
    padding (data.collate), which is a document of its own."""
    B, T = segments.shape
    window = window if window is not None and window < T else None  # a window as long as the row masks nothing

    def document_mask_mod(b, h, q, kv):
        allowed = (segments[b, q] == segments[b, kv]) & (q >= kv)
        return allowed & (q - kv < window) if window is not None else allowed

    return create_block_mask(document_mask_mod, B, None, T, T, device=segments.device)

