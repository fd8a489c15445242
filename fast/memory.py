"""Memory for speed: what lets a bigger micro-batch (or a bigger model) fit on one GPU, and the CUDA graph that
replays a micro-step without launch overhead. The trainer switches each on with a --speed.* flag.

- chunked_cross_entropy: the loss without ever holding a (tokens, vocab) fp32 logits tensor.
- enable_activation_checkpointing: blocks recompute their activations in the backward pass; with offload, their
  inputs wait in pinned host memory (HostCopy) instead of on the GPU.
- GraphedMicroStep: one micro-batch's forward and backward captured as a CUDA graph and replayed.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import IGNORE


def chunked_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 64 * 2**20,
                          select_targets: bool = True) -> Tuple[torch.Tensor, Optional[int]]:
    """Summed cross-entropy of head(hidden) against targets (B, T) without ever holding all fp32 logits.

    Only positions with a target go through the head (all positions with select_targets=False: fixed shapes for a
    CUDA graph, and None for the count); they go in chunks whose fp32 logits take about `chunk_bytes`, each
    recomputed in the backward pass instead of kept: the head is one matmul of the many in a model, its logits are
    the largest activation of all."""
    if select_targets:
        keep = targets != IGNORE
        h, t = hidden[keep], targets[keep]
        n = t.numel()
        if n == 0:
            return hidden.sum() * 0.0, 0
    else:
        h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        n = None
    rows = t.numel()
    random_head = not isinstance(getattr(head, "dropout", None), (torch.nn.Identity, type(None)))
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    size = max(128, chunk_bytes // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, rows, size):
        if torch.is_grad_enabled():  # a LoRA head with dropout must see the same mask when recomputed
            total = total + checkpoint(_ce_sum, head, h[i:i + size], t[i:i + size], use_reentrant=False,
                                       preserve_rng_state=random_head)
        else:
            total = total + _ce_sum(head, h[i:i + size], t[i:i + size])
    return total, n


def _ce_sum(head, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def enable_activation_checkpointing(model, n_blocks: Optional[int] = None, preserve_rng_state: bool = True,
                                    offload: bool = False) -> None:
    """Each block's activations (of the first n_blocks; default all) are recomputed in the backward pass
    (non-reentrant checkpointing); parameter names and the module tree stay as they are, so checkpoints and adapters
    do not notice. preserve_rng_state is needed only when something random runs inside a block (LoRA dropout).
    offload: the blocks' inputs, (B, T, n_embd) each and all that checkpointing keeps on the GPU, wait in pinned
    host memory instead (see HostCopy)."""
    blocks = list(model.blocks)[:n_blocks]
    copies = [HostCopy() for _ in blocks] if offload else [None] * len(blocks)
    for i, (block, copy) in enumerate(zip(blocks, copies)):
        plain = block.forward
        if copy is not None:
            copy.previous = copies[i - 1] if i else None

        def forward(x, *args, _plain=plain, _block=block, _copy=copy, **kwargs):
            if not (torch.is_grad_enabled() and _block.training):
                return _plain(x, *args, **kwargs)
            if _copy is None:
                return checkpoint(_plain, x, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                                  **kwargs)
            # x itself is not handed to checkpoint, which would keep it: the copy gives it back
            parked = _copy.park(x)
            return checkpoint(_call_with_input, _plain, _copy, parked, *args, use_reentrant=False,
                              preserve_rng_state=preserve_rng_state, **kwargs)

        block.forward = forward


def _call_with_input(forward, copy: "HostCopy", parked: int, *args, **kwargs):
    return forward(copy.take(parked), *args, **kwargs)


class HostCopy:
    """A checkpointed block's input, parked in pinned host memory from the forward pass to the block's recompute in
    the backward pass (as Unsloth's offloaded checkpointing): on a side stream, so the copies overlap the blocks'
    compute (a block's input is small next to the work the block does on it).

    park(x) starts the copy to the host; the GPU x is let go when the next block parks its own input (after waiting
    for this copy). take() gives x back: the first time (the forward pass) the GPU tensor itself; later (the
    recompute) a copy back from the host, started early: fetching block i's input prefetches block i-1's. The host
    buffer is allocated once and reused, at a fixed address, so CUDA graphs can replay the copies. On the CPU (tests)
    the "host copy" is a plain clone, which exercises the same bookkeeping. One input per block: a second forward
    pass before the first one's backward would overwrite it, so take() refuses a recompute of an older pass."""

    _stream = None

    def __init__(self) -> None:
        self.previous: Optional["HostCopy"] = None
        self.host = self.gpu = self.prefetched = None
        self.copied = self.ready = None
        self.first_take = False
        self.requires_grad = False
        self.parked = 0  # counts park() calls: which forward pass the kept input belongs to

    @classmethod
    def side_stream(cls):
        if cls._stream is None:
            cls._stream = torch.cuda.Stream()
        return cls._stream

    def park(self, x: torch.Tensor) -> int:
        if self.previous is not None:
            self.previous.let_go()
        self.gpu, self.first_take, self.requires_grad = x, True, x.requires_grad
        self.prefetched = self.ready = None  # left over from a backward pass that stopped half way
        self.parked += 1
        if not x.is_cuda:
            self.host = x.detach().clone()
            return self.parked
        if self.host is None or self.host.shape != x.shape or self.host.dtype != x.dtype:
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream = self.side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.host.copy_(x.detach(), non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        return self.parked

    def let_go(self) -> None:
        if self.gpu is not None and self.copied is not None:
            torch.cuda.current_stream().wait_event(self.copied)  # x's memory is reused only after the copy read it
        self.gpu = None

    def take(self, parked: int) -> torch.Tensor:
        if parked != self.parked:
            raise RuntimeError("offloaded checkpointing keeps one input per block: a second forward pass ran before "
                               "the first one's backward; run each backward before the next forward, or turn "
                               "--speed.offload_checkpoints off")
        if self.first_take:  # the forward pass
            self.first_take = False
            return self.gpu
        if self.gpu is not None:  # the last parked block's recompute: its input never left the GPU
            if self.copied is not None:
                torch.cuda.current_stream().wait_event(self.copied)  # joins the side stream (CUDA graph capture)
            x, self.gpu = self.gpu, None
        elif self.prefetched is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            x, self.prefetched = self.prefetched, None
        elif self.host.is_pinned():
            x = self.host.to(torch.cuda.current_device(), non_blocking=True)
        else:
            x = self.host.clone()
        if self.previous is not None and self.host.is_pinned():
            self.previous.prefetch()
        return x.detach().requires_grad_(self.requires_grad)

    def prefetch(self) -> None:
        self.let_go()
        if self.prefetched is not None:
            return
        current = torch.cuda.current_stream()
        self.prefetched = torch.empty(self.host.shape, dtype=self.host.dtype, device=current.device)
        stream = self.side_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self.prefetched.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)


class GraphedMicroStep:
    """Forward and backward of one micro-batch, captured once as a CUDA graph and replayed for every later one.

    At small micro-batches eager PyTorch spends longer launching a QLoRA step's thousands of small kernels than the
    GPU spends running them; a replay launches them all at once. Shapes must be fixed (packed rows padded to
    max_seq_length, see data.collate). Building it zeroes the parameters' gradients (its warm-up runs real backward
    passes). Each replay ADDS the gradients of the summed token loss to every parameter's .grad, a fixed buffer:
    scale them, step, and zero them in place (zero_grad(set_to_none=False)), never replace them.

    loss_fn(model, batch, select_targets=False) -> (summed loss, _): finetune/lora.py's training_loss.
    """

    def __init__(self, model, params: List[torch.Tensor], batch: Dict[str, torch.Tensor], loss_fn: Callable,
                 warmup: int = 2) -> None:
        self.params = params
        self.static = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_cuda}
        for p in params:  # fixed buffers: backward() adds into them in place, so replays accumulate
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, cuBLAS workspaces) off the capture
            for _ in range(warmup):
                loss, _ = loss_fn(model, self.static, select_targets=False)
                loss.backward()
        torch.cuda.current_stream().wait_stream(side)
        torch._foreach_zero_([p.grad for p in params])  # the warm-up's gradients do not count
        del loss
        torch.cuda.empty_cache()  # the warm-up's cached blocks would otherwise sit beside the graph's own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, _ = loss_fn(model, self.static, select_targets=False)
            # backward() adds each gradient into its .grad in place as soon as it is ready, and frees it;
            # autograd.grad would hold all of them until the end
            self.loss.backward()

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        for k, v in self.static.items():
            v.copy_(batch[k], non_blocking=True)
        self.graph.replay()
        return self.loss
