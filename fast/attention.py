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

import functools
import sys
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from cli import one_line

# Smaller tiles for GPUs with about 100 KB of shared memory per block (RTX 4090/3090, A10, L40): the default tiles of
# FlexAttention's backward kernel at head size 128 need more and fail to compile there (pytorch/pytorch#133254)
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
               "num_stages": 1}


def document_block_mask(segments: torch.Tensor, window: Optional[int] = None) -> BlockMask:
    """model.document_mask(segments, window) as a BlockMask: segments (B, T) numbers the documents of each row, -1 on
    padding (data.collate), which is a document of its own."""
    B, T = segments.shape
    window = window if window is not None and window < T else None  # a window as long as the row masks nothing

    def document_mask_mod(b, h, q, kv):
        allowed = (segments[b, q] == segments[b, kv]) & (q >= kv)
        return allowed & (q - kv < window) if window is not None else allowed

    return create_block_mask(document_mask_mod, B, None, T, T, device=segments.device)


def _flex_for_check(*args, **kwargs):
    return flex_attention(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def checked_tiles(n_head: int, n_kv: int, head_size: int, window: Optional[int]) -> Optional[dict]:
    """The kernel options with which compiled FlexAttention runs on this GPU at the model's head shapes and agrees
    with SDPA over the dense document mask, forward and backward: {} (the default tiles) or SMALL_TILES; None with a
    warning when neither does, and packed rows then take the dense mask (slower, the same result)."""
    from model import document_mask

    gen = torch.Generator("cuda").manual_seed(0)
    T = 512
    q, k, v = (torch.randn(1, h, T, head_size, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (n_head, n_kv, n_kv))
    segments = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([300, 150, 62], device="cuda"))
    segments = segments[None]
    dy = torch.randn(1, n_head, T, head_size, device="cuda", dtype=torch.bfloat16, generator=gen)

    def outputs(fn):
        q.grad = k.grad = v.grad = None
        y = fn()
        y.backward(dy)
        return [t.detach().float() for t in (y, q.grad, k.grad, v.grad)]

    dense = document_mask(segments, window)
    reference = outputs(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                                 enable_gqa=n_kv != n_head))
    block_mask = document_block_mask(segments, window)
    # The check compiles a function of its own: dynamo keeps compiled code and shape history per function, and
    # flex_attention itself, once called at these shapes, would be recompiled for dynamic shapes at the training
    # shapes, a slower kernel
    check = torch.compile(_flex_for_check, dynamic=False)
    failure = ""
    for options in ({}, SMALL_TILES):
        try:
            got = outputs(lambda: check(q, k, v, block_mask=block_mask, enable_gqa=n_kv != n_head,
                                        kernel_options=options or None))
        except Exception as e:  # out of shared memory on this GPU, an older Triton
            failure = one_line(e)
            continue
        error = max(float((a - b).norm() / b.norm()) for a, b in zip(got, reference))
        if error < 2e-2:
            return options
        failure = f"differs from SDPA by {error:.1%}"
    print(f"Warning: compiled FlexAttention did not pass its check on this GPU ({failure}); packed rows take the "
          "dense document mask (slower, the same result)", file=sys.stderr)
    return None
