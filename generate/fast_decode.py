"""The serving engine's fast decode step: static shapes per bucket, compiled blocks and one CUDA graph per bucket.

The engine's plain step (`Engine._decode_step` through `SlotCache`) is the reference; this layer computes the same
thing (tests/test_fast_decode.py compares them on the CPU) in a form a GPU runs at its memory bandwidth. Decoding one
token per row reads every weight once per step; in eager PyTorch the ~1,500 small kernels a 32-layer step launches
cost more than the reads. gpt-fast's recipe removes that:
- Buckets. The engine's slots 0..n-1 decode as B >= n rows (B in 1, 2, 4, ..., max slots). Rows past n are free slots
  fed token 0 at position 0: they write only their own unused cache row, their outputs are dropped, and the next
  request admitted to such a slot overwrites that position at prefill.
- Keys. Each row attends over the first L positions of its slot's cache, L the longest live row rounded up to a
  multiple of `key_block`, not over the whole cache: at 30 rows and a 2,048-token context the whole cache of
  Mistral-7B is about 8 GB, most of the 14.5 GB of weights again, read every step for positions nobody has reached.
  Rounding up keeps the number of shapes (and graphs) small for a few percent more reads.
- Compile. Each block runs through one `torch.compile`d call (regional compilation: the layers share one compiled
  graph, so compiling costs about one block's time), the cache write included (see DecodeView), with attention for
  one query per row (`decode_attention`).
- Graphs. On CUDA each (B, L) bucket's whole step (embedding, blocks, head, log-softmax, argmax, top-k) is captured as
  a CUDA graph the first time it is needed and replayed afterwards: one launch per token instead of one per kernel.
- Pipelining. A step is launched, not waited for: `launch` returns at once with the step's device outputs and a
  host copy of its small score table on the way. For greedy rows the next step's tokens are this step's argmax, which
  is already on the device, so the engine launches step t+1 (`launch(..., after=step t)`) before it reads step t's
  table and does its host work (stops, bookkeeping); the GPU never waits for the host during steady decoding.
Sampling, stops and bookkeeping stay in the engine; a step hands back the logits and log-probabilities for sampled rows
and, in one device-to-host copy, every row's greedy token, its log-probability and the top-k alternatives.
"""

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from cli import one_line
from model import GPT, causal_mask, rope

log = logging.getLogger("server")


def buckets(limit: int) -> List[int]:
    """Row counts that get their own shapes: powers of two below `limit`, then `limit`."""
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b *= 2
    return sizes + [limit]


def bucket_of(n: int, sizes: List[int]) -> int:
    return next(b for b in sizes if b >= n)


class DecodeView(nn.Module):
    """One layer's cache as a bucket of B rows and L keys sees it: writes each row's new key and value into the engine's
    SlotCache (the same tensors the prefill filled), then hands attention its first B slots and first L positions.

    The write runs inside the compiled block, into the whole cache tensors: torch.compile turns an in-place write into
    a graph input back into an in-place store (fused with the step's other small kernels), where a write into a
    strided view of the cache would be copied out and back whole. L travels as the length of `keys` (the positions the
    bucket reads) rather than as an int, so that one compiled graph serves every key length after the first.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n_keys: int) -> None:
        super().__init__()
        # (slots, n_kv, positions, head_size), the same in every bucket: buffers, which torch.compile keeps static
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        # A plain attribute, so that its length can be symbolic: torch.compile specialises it in a graph's first
        # compile and makes it symbolic when a second length comes (automatic dynamic shapes).
        self.keys = torch.arange(n_keys, device=k.device)

    @property
    def size(self) -> int:
        return self.keys.size(0)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B, L = k.size(0), self.keys.size(0)
        rows, pos = torch.arange(B, device=k.device), input_pos[:, 0]
        self.k[rows, :, pos] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, pos] = v[:, :, 0].to(self.v.dtype)
        return self.k[:B, :, :L], self.v[:B, :, :L]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`CausalSelfAttention.attend` for the step's one query per row: q (B, n_head, 1, hs) over k, v (B, n_kv, L, hs)
    with mask (B, 1, 1, L) -> (B, n_head, 1, hs).

    Two batched matrix products and a softmax instead of SDPA: SDPA's kernels tile long query blocks, and a step has a
    handful of queries per key/value head, so they leave most of the GPU idle, more so the longer the context
    (benchmarks/profile_decode.py times both). As in those kernels, scores are accumulated and kept in fp32 and the
    probabilities meet V in the model's dtype."""
    B, n_head, _, hs = q.shape
    n_kv, L = k.size(1), k.size(2)
    group = n_head // n_kv  # the query heads that share a key/value head are one group's rows
    q, k = q.reshape(B * n_kv, group, hs), k.reshape(B * n_kv, L, hs).transpose(1, 2)
    if q.dtype == torch.float32:
        scores = torch.bmm(q, k)
    elif q.is_cuda:
        scores = torch.bmm(q, k, out_dtype=torch.float32)
    else:  # no fp32-output bmm on the CPU
        scores = torch.bmm(q.float(), k.float())
    scores = (scores.view(B, n_kv, group, L) * hs**-0.5).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B * n_kv, group, L)
    return torch.bmm(probs, v.reshape(B * n_kv, L, hs)).view(B, n_head, 1, hs)


ONE_ROW_COMPILE = {"coordinate_descent_tuning": True}  # inductor settings of the one-row graph (see _compiled_block)


def _call_block(block: nn.Module, x, cos, sin, mask, input_pos):
    return block(x, cos, sin, mask, input_pos)


def _call_block_one_row(block: nn.Module, x, cos, sin, mask, input_pos):
    """The same call under other compile settings (see FastDecoder._compiled_block). A function of its own because
    torch.compile keeps compiled code per code object: one function under two settings would share one cache."""
    return block(x, cos, sin, mask, input_pos)


def fused_4bit_layers(model: GPT, device: torch.device) -> list:
    """generate/nf4_matmul.py's stand-ins for the model's NF4 layers, where Triton runs and the kernel agrees with
    bitsandbytes on this device (nf4_matmul.self_check); otherwise none, with a warning saying why where the kernel
    should have run."""
    from generate import nf4_matmul

    layers = nf4_matmul.fused_layers(model)
    if not layers:
        return []
    if not nf4_matmul.available(device):  # expected on a CPU; on a GPU, Triton is missing
        (log.warning if device.type == "cuda" else log.info)(
            f"--fused_4bit: Triton does not run on {device.type} here; the 4-bit products stay bitsandbytes'")
        return []
    try:
        why = nf4_matmul.self_check([(layer, fused) for _, _, layer, fused in layers], model.wte.weight.dtype)
    except Exception as e:  # a kernel that does not compile or launch here: bitsandbytes keeps the products
        why = f"the kernel failed: {one_line(e)}"
    if why is not None:
        log.warning(f"--fused_4bit: {why}; the 4-bit products stay bitsandbytes'")
        return []
    return layers


@dataclass
class StepOutput:
    """A launched step. The device tensors are the bucket's (a CUDA graph's outputs): valid until that bucket runs
    again, so only a step that is read before the next launch may use `logits`/`logprobs` (sampled rows do)."""

    logits: torch.Tensor  # (bucket rows, vocab) fp32: what sampled rows draw from
    logprobs: torch.Tensor  # (bucket rows, vocab) fp32 log-softmax of the logits
    greedy: torch.Tensor  # (bucket rows,) on the device: each row's argmax, what a following step is fed
    table: torch.Tensor  # (rows, 2 + 2k) fp32 on the host: [argmax, its logprob, value 1, id 1, ...]; see `wait`
    ready: Optional[torch.cuda.Event] = None

    def wait(self) -> torch.Tensor:
        """The score table, once its copy to the host has landed (the only wait for the GPU in a step)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.table


def table_score(row: List[float], k: int) -> Tuple[float, Dict[int, float]]:
    """(logprob of the argmax, {top-k id: logprob} best first) from one row of a step's score table."""
    return row[1], {int(i): v for v, i in zip(row[2: 2 + 2 * k: 2], row[3: 3 + 2 * k: 2])}


class FastDecoder:
    def __init__(self, model: GPT, caches: List[nn.Module], max_keys: int, top_k: int = 20, key_block: int = 256,
                 compile: bool = False, cuda_graphs: bool = False, fused_4bit: bool = False) -> None:
        """model: in eval mode; caches: the engine's SlotCache per layer (k, v of (slots, n_kv, positions, head)).
        max_keys: the most positions a sequence reaches (below the caches' length, see Engine._install_caches).
        top_k: alternatives computed per row and step (requests asking for more take the engine's plain scoring).
        key_block: key positions are read in multiples of this. compile: torch.compile the blocks.
        cuda_graphs: capture each bucket's step as a CUDA graph (CUDA only). fused_4bit: NF4 base layers multiply
        through generate/nf4_matmul.py's kernel in the step (checked against bitsandbytes first, fused_4bit_layers)."""
        self.model, self.config = model, model.config
        self.caches = caches
        self.n_slots, self.max_keys = caches[0].k.size(0), max_keys
        self.row_buckets = buckets(self.n_slots)
        self.key_block = key_block
        self.top_k = min(top_k, self.config.vocab_size)
        self.device = caches[0].k.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.compile = compile
        self._block = self._compiled_block() if compile else _call_block
        # decode_attention's fp32 scores from bf16 operands on CUDA need torch.bmm's out_dtype (torch 2.8+); without
        # it the step keeps the model's own attention (SDPA).
        has_out_dtype = hasattr(torch.ops.aten.bmm, "dtype")
        self.attention = decode_attention if self.device.type != "cuda" or has_out_dtype else None
        self.fused = fused_4bit_layers(model, self.device) if fused_4bit else []
        # Inputs live at fixed addresses (graphs read them from there): per slot, its last token and its position.
        self.tokens = torch.zeros(self.n_slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(self.n_slots, dtype=torch.long, device=self.device)
        self._views: Dict[int, List[DecodeView]] = {}  # per key length
        self._graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    @property
    def mode(self) -> str:
        return "+".join(["static"] + ["compiled"] * self.compile + ["cuda_graphs"] * self.cuda_graphs)

    def key_bucket(self, n_keys: int) -> int:
        return min(-(-n_keys // self.key_block) * self.key_block, self.max_keys)

    def launch(self, positions: List[int], k: int = 1, tokens: Optional[List[int]] = None,
               after: Optional[StepOutput] = None) -> StepOutput:
        """One new token for rows 0..n-1 (the engine's slots; free ones pass position 0): writes each row's key and
        value at its position and computes every row's next-token distribution, without waiting for the device.
        The rows' tokens come from the host (`tokens`) or are the argmax of the step `after`, read on the device."""
        n = len(positions)
        B, L = shape = bucket_of(n, self.row_buckets), self.key_bucket(max(positions) + 1)
        pad = [0] * (B - n)
        self.positions[:B].copy_(self._to_device(positions + pad), non_blocking=True)
        if tokens is not None:
            self.tokens[:B].copy_(self._to_device(tokens + pad), non_blocking=True)
        else:
            # Queued behind step `after` and ahead of this replay, which overwrites `after.greedy` when the bucket is
            # the same. Padding rows get that step's argmax instead of 0: they write only their own free cache row.
            self.tokens[:B].copy_(after.greedy[:B])
        logits, logprobs, greedy, packed = self._run(shape)
        columns = packed[:n, : 2 + 2 * k]
        if self.device.type != "cuda":
            return StepOutput(logits, logprobs, greedy, columns)
        # Pinned, so the copy runs behind the step without blocking the host; the caching host allocator keeps the
        # buffer until the copy is done.
        table = torch.empty(columns.shape, dtype=columns.dtype, pin_memory=True)
        table.copy_(columns, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return StepOutput(logits, logprobs, greedy, table, ready)

    def _to_device(self, values: List[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        return host.pin_memory() if self.device.type == "cuda" else host

    def warm_up(self, max_rows: Optional[int] = None, max_keys: Optional[int] = None) -> int:
        """Compiles and captures every bucket up to `max_rows` rows and `max_keys` keys ahead of traffic (the
        engine calls it before it starts: it writes position 0 of every slot). Returns the number of buckets."""
        max_rows, max_keys = min(max_rows or self.n_slots, self.n_slots), min(max_keys or self.max_keys, self.max_keys)
        rows = [b for b in self.row_buckets if b < max_rows] + [bucket_of(max_rows, self.row_buckets)]
        lengths = {self.key_bucket(n) for n in range(1, max_keys + 1, self.key_block)} | {self.key_bucket(max_keys)}
        self.tokens.zero_()
        self.positions.zero_()
        for shape in [(b, n) for b in rows for n in sorted(lengths)]:
            self._run(shape)
        return len(rows) * len(lengths)

    # ---- running a bucket ----------------------------------------------------------------------------------------

    def _run(self, shape: Tuple[int, int]) -> tuple:
        try:
            return self._replay(shape) if self.cuda_graphs else self._forward(*shape)
        except Exception as e:
            if not (self.fused or self.compile or self.cuda_graphs):
                raise
            # Keep serving with one layer less: first without the 4-bit kernel, then without torch.compile, then
            # without graphs (the same math each time).
            dropped = "the 4-bit kernel" if self.fused else "torch.compile" if self.compile else "CUDA graphs"
            log.warning(f"decode: {type(e).__name__} in bucket {shape} ({str(e).splitlines()[0] if str(e) else ''}); "
                        f"decoding without {dropped} from now on")
            if self.fused:
                self.fused = []
            elif self.compile:
                self.compile, self._block = False, _call_block
            else:
                self.cuda_graphs = False
            if self.device.type == "cuda":
                torch.cuda.set_stream(torch.cuda.default_stream(self.device))  # a failed capture can leave its stream
            self._graphs.clear()
            return self._run(shape)

    def _replay(self, shape: Tuple[int, int]) -> tuple:
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(shape)
        graph, outputs = self._graphs[shape]
        graph.replay()
        return outputs

    def _capture(self, shape: Tuple[int, int]) -> tuple:
        t0 = time.perf_counter()
        # Warm-up runs (compilation, autotuning, cuBLAS workspaces) happen outside the capture, on a side stream as
        # capture requires. They write the same keys and values the captured step will: the inputs are this step's.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(*shape)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self._forward(*shape)
        log.debug(f"decode: captured bucket {shape} in {time.perf_counter() - t0:.2f}s")
        return graph, outputs

    def _forward(self, B: int, L: int) -> tuple:
        """The step for a bucket of B rows and L keys: GPT.hidden_states with a per-row mask and DecodeViews as the
        caches (the same math as the engine's plain step), then the head and the scores the engine needs."""
        model, config = self.model, self.config
        idx, pos = self.tokens[:B, None], self.positions[:B, None]
        mask = causal_mask(pos[:, 0], L, config.sliding_window)[0, 0, :, None, None]  # (B, 1, 1, L): per row
        cos, sin = rope(pos, config.rope_n_elem, config.rope_base)
        x = model.wte(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        saved = [(block.attn.kv_cache, block.attn.__dict__.get("attend")) for block in model.blocks]
        try:
            for parent, name, _, fused in self.fused:
                setattr(parent, name, fused)
            for block, view in zip(model.blocks, self._bucket_views(L)):
                block.attn.kv_cache = view
                if self.attention is not None:
                    block.attn.attend = self.attention
                x = self._block(block, x, cos, sin, mask, pos)
        finally:
            for parent, name, layer, _ in self.fused:
                setattr(parent, name, layer)
            for block, (cache, attend) in zip(model.blocks, saved):  # also the blocks a failed step did not reach
                block.attn.kv_cache = cache
                block.attn.__dict__.pop("attend", None)  # back to the class's method
                if attend is not None:
                    block.attn.attend = attend
        logits = model.lm_head(model.ln_f(x))[:, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logits.argmax(dim=-1)
        top = logprobs.topk(self.top_k, dim=-1)
        # One (B, 2 + 2k) fp32 table, [greedy id, its logprob, value 1, id 1, value 2, id 2, ...], so that the host
        # fetches only the columns a step's requests ask for. Ids are exact in fp32 (vocabularies are below 2**24).
        packed = torch.cat([greedy[:, None].float(), logprobs.gather(-1, greedy[:, None]),
                            torch.stack([top.values, top.indices.float()], dim=-1).flatten(1)], dim=1)
        return logits, logprobs, greedy, packed

    def _bucket_views(self, L: int) -> List[DecodeView]:
        if L not in self._views:
            self._views[L] = [DecodeView(c.k, c.v, L) for c in self.caches]
        return self._views[L]

    def _compiled_block(self):
        import torch._dynamo

        # Every model, bucket class (one row, several rows) and block kind served in a process adds entries to the
        # same code objects' caches; past the default limit torch would silently run them uncompiled.
        for name, at_least in (("recompile_limit", 64), ("accumulated_recompile_limit", 1024)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), at_least))
        # dynamic: one graph serves every row count > 1 and every key length (after one graph for the first length).
        rows = torch.compile(_call_block, dynamic=True)
        # One row's matrix products are matrix-vector products. Inductor writes those as its own reductions, fused with
        # the norms and activations around them and faster than cuBLAS's kernels, only when it tunes its kernels
        # (coordinate descent); with more rows, tuned or not, cuBLAS's are the faster (benchmarks/profile_decode.py).
        one_row = torch.compile(_call_block_one_row, dynamic=True, options=dict(ONE_ROW_COMPILE))

        def call_block(block, x, *args):
            return (one_row if x.size(0) == 1 else rows)(block, x, *args)

        return call_block
