"""The serving engine: one thread that owns the model and batches every request it is given.

Two kinds of work, interleaved so that neither starves the other:
- Scoring requests (max_new_tokens 0 or 1: multiple-choice answers, echoed prompts) run as one forward pass per batch,
  without a KV cache. Requests in a batch that share a long token prefix (HELM's few-shot prompts of one subject) have
  the prefix computed once and its keys/values broadcast to the rest ("shared-prefix prefill").
- Generation requests get a slot of a per-slot KV cache (continuous batching): they are prefilled when they arrive and
  join the running decode batch at the next step; a finished request frees its slot at once.
Each engine loop runs: admit waiting generations into free slots, one scoring batch, one decode step. While
generations decode, a scoring batch holds at most `interleave_tokens` tokens, so neither kind starves the other.

The decode step below (`_decode_step` through SlotCache) is the plain reference. On a GPU the engine runs the same
step through generate/fast_decode.py (static shapes per bucket of rows and keys, compiled blocks, one CUDA graph per
bucket); `decode` picks the path and tests/test_fast_decode.py checks that the two agree. While every decoding request
is greedy, the fast path keeps one step in flight: it launches step t+1 from step t's argmax on the device before it
does step t's host work (see `_fast_decode_step`).

Numbers: a token's logprob is log_softmax(logits.float())[token] at the position before it, the same as a direct
forward pass. An echoed prompt's first token has nothing before it (unless the tokenizer adds BOS, which is then the
context and is not echoed): it gets logprob 0.0 and top_logprob {its text: 0.0}, contributing nothing to the sum.
"""

import concurrent.futures
import json
import logging
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple, get_args

import torch
import torch.nn as nn

from cli import InputError
from generate.base import GREEDY_TEMPERATURE, sample, sampling_probs, seeded_generator
from generate.fast_decode import FastDecoder, StepOutput, table_score
from model import GPT, causal_mask
from tokenizer import Tokenizer

TokenScore = Tuple[float, Dict[int, float]]  # (logprob of the token, {alternative id: logprob} best first)
# How generation steps run: eager (the plain reference), static (fast_decode's buckets, no compile or graphs), graphs
# (+ a CUDA graph per bucket), compiled (+ torch.compile'd blocks; graphs too on CUDA). auto: compiled on CUDA, else
# eager.
Decode = Literal["auto", "eager", "static", "graphs", "compiled"]
log = logging.getLogger("server")


@dataclass
class Request:
    prompt_ids: List[int]  # already templated, BOS added and truncated to fit (see Engine.prepare_prompt)
    max_new_tokens: int = 50
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0
    seed: Optional[int] = None
    echo: bool = False  # return the prompt's own tokens with their logprobs
    echo_from: int = 0  # prompt tokens before this index (BOS) are context only, never echoed
    top_logprobs: int = 1  # alternatives per token in top_logprob (at least 1)
    stop: Sequence[str] = ()
    stop_at_blank_line: bool = False
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, repr=False)
    submitted: float = field(default_factory=time.perf_counter, repr=False)


@dataclass
class Result:
    prompt_ids: List[int]  # the echoed prompt tokens (empty without echo)
    prompt_scores: List[TokenScore]
    prompt_texts: List[str]
    new_ids: List[int]
    new_scores: List[TokenScore]
    new_texts: List[str]  # text of each kept new token in context; the last one is cut where a stop string starts
    finish_reason: str  # "length", "eos" or "stop"
    queued_s: float = 0.0


class _Slot:
    """A generation request in the decode batch."""

    def __init__(self, request: Request, generator: Optional[torch.Generator]) -> None:
        self.request = request
        self.generator = generator
        self.pos = len(request.prompt_ids)  # where the next token goes in the slot's cache
        self.new_ids: List[int] = []
        self._scores: List[TokenScore] = []
        # Fast steps' scores stay rows of their step's table until the request ends: HELM asks every generated
        # token's logprob, and a dict per row and step is host work the GPU would wait for.
        self._unread: List[Tuple[torch.Tensor, int]] = []
        self.prompt_scores: List[TokenScore] = []
        self.finish_reason: Optional[str] = None
        stops = [s for s in request.stop if s] + ["\n\n"] * request.stop_at_blank_line
        # Tokens decoded to look for a stop string that the newest token may have completed (see Engine._stopped_text).
        self.stop_window = max((len(s.encode()) for s in stops), default=0) + 8 if stops else 0

    def add_score(self, score) -> None:
        """A TokenScore, or (table, row) of a fast step's score table."""
        if isinstance(score[0], torch.Tensor):
            self._unread.append(score)
        else:
            self.new_scores.append(score)

    @property
    def new_scores(self) -> List[TokenScore]:
        if self._unread:
            k = self.request.top_logprobs
            rows = torch.stack([table[row, : 2 + 2 * k] for table, row in self._unread]).tolist()
            self._scores.extend(table_score(row, k) for row in rows)
            self._unread.clear()
        return self._scores


class SlotCache(nn.Module):
    """Keys/values of up to `n_slots` independent sequences, each at its own positions (continuous batching).

    Installed in place of the model's KVCache (model.py calls `kv_cache(input_pos, k, v)` and reads `.size`):
    - prefill mode (`rows` set): fresh sequences for those slots, input_pos = 0..T-1; returns the new k/v as they are.
    - decode mode: input_pos (B, 1) per row; writes each row's key at its own position and returns the first `n_keys`.
    """

    def __init__(self, n_slots, n_kv, max_seq_length, head_size, device, dtype) -> None:
        super().__init__()
        shape = (n_slots, n_kv, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.rows: Optional[torch.Tensor] = None
        self.n_keys = max_seq_length

    @property
    def size(self) -> int:
        return self.n_keys

    def forward(self, input_pos, k, v):
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if self.rows is not None:
            T = k.size(2)
            self.k[self.rows, :, :T] = k
            self.v[self.rows, :, :T] = v
            return k, v
        B, n_kv, _, hs = k.shape
        index = input_pos.reshape(B, 1, 1, 1).expand(B, n_kv, 1, hs)
        self.k[:B].scatter_(2, index, k)
        self.v[:B].scatter_(2, index, v)
        return self.k[:B, :, : self.n_keys], self.v[:B, :, : self.n_keys]


class PrefixCache(nn.Module):
    """Shared-prefix scoring: the first call stores a 1-row prefix; later calls put it in front of every row."""

    def __init__(self) -> None:
        super().__init__()
        self.k = self.v = None
        self.n_keys = 0

    @property
    def size(self) -> int:
        return self.n_keys

    def forward(self, input_pos, k, v):
        if self.k is None:
            self.k, self.v = k, v
            return k, v
        B = k.size(0)
        return (torch.cat([self.k.expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.v.expand(B, -1, -1, -1), v], dim=2))


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_seq_length: Optional[int] = None,
                 max_batch_size: int = 32, max_batch_tokens: int = 16384, min_shared_prefix: int = 32,
                 dola_layers: Optional[Sequence[int]] = None, decode: Decode = "auto", interleave_tokens: int = 2048,
                 key_block: int = 256, fused_4bit: bool = True) -> None:
        """model: in eval mode on its device. max_seq_length: prompt + new tokens (default: the model's context).
        max_batch_size: decode slots and rows per scoring batch. max_batch_tokens: padded tokens per forward pass.
        min_shared_prefix: scoring rows sharing at least this many leading tokens compute them once.
        dola_layers: early layers to contrast with the final one when choosing tokens (DoLa); None = off.
        decode: how generation steps run (see Decode). interleave_tokens: the most tokens a scoring batch holds while
        generations decode. key_block: the fast decode step reads keys in multiples of this many positions.
        fused_4bit: the fast decode step multiplies NF4 base layers by several rows through generate/nf4_matmul.py's
        kernel, where Triton runs and the kernel passes its start-up check (one 16-bit row too, on the CUDA cores)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_seq_length = min(max_seq_length or self.config.block_size, self.config.block_size)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max(max_batch_tokens, self.max_seq_length)
        self.min_shared_prefix = min_shared_prefix
        self.dola_layers = sorted(set(dola_layers)) if dola_layers else []
        for layer in self.dola_layers:
            if not 0 <= layer < self.config.n_layer:
                raise ValueError(f"dola_layers: layer {layer} does not exist; the model has layers 0..{self.config.n_layer - 1}")
        self.device = model.wte.weight.device
        if decode not in get_args(Decode):
            raise ValueError(f"decode={decode!r}: choose one of {', '.join(get_args(Decode))}")
        if decode == "auto":
            decode = "compiled" if self.device.type == "cuda" else "eager"
        if self.dola_layers and decode != "eager":
            # DoLa reads early layers' states through forward hooks, each token: a captured or compiled step would
            # not call them. DoLa requests are rare (TruthfulQA) and short.
            log.info(json.dumps({"event": "decode", "mode": "eager", "why": "DoLa needs the plain step's hooks"}))
            decode = "eager"
        self.decode = decode
        self.interleave_tokens = interleave_tokens
        self.key_block = key_block
        self.fused_4bit = fused_4bit
        self._fast: Optional[FastDecoder] = None
        self._captured: Dict[int, torch.Tensor] = {}
        for layer in self.dola_layers:
            model.blocks[layer].register_forward_hook(self._capture_hook(layer))
        self._lock = threading.Condition()
        self._scoring: deque = deque()
        self._waiting: deque = deque()
        self._slots: List[Optional[_Slot]] = [None] * max_batch_size
        self._caches: Optional[List[SlotCache]] = None
        self._inflight: Optional[Tuple[StepOutput, List[Optional[_Slot]]]] = None  # a launched fast step, unread
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self.stats = {"scoring_batches": 0, "decode_steps": 0, "pipelined_steps": 0, "prefills": 0, "requests": 0}

    # ---- public ------------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, request: Request) -> concurrent.futures.Future:
        if not request.prompt_ids:
            raise ValueError("prompt is empty after tokenization")
        if len(request.prompt_ids) + request.max_new_tokens > self.max_seq_length:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the context of {self.max_seq_length} tokens")
        request.submitted = time.perf_counter()
        with self._lock:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            (self._scoring if request.max_new_tokens <= 1 else self._waiting).append(request)
            self.stats["requests"] += 1
            self._lock.notify()
        return request.future

    def warm_up(self, max_keys: Optional[int] = None) -> None:
        """Compiles and captures the fast decode step for every bucket (up to `max_keys` positions; default the
        context) before traffic arrives; otherwise each is done the first time a step needs it. Call it before
        start(): it writes position 0 of every slot."""
        if self._thread is not None:
            raise RuntimeError("Engine.warm_up() runs before start()")
        if self.decode in ("eager", "static"):
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._install_caches()
            n = self._fast.warm_up(max_keys=max_keys)
        log.info(json.dumps({"event": "decode_warmup", "mode": self.decode_mode, "buckets": n,
                             "seconds": round(time.perf_counter() - t0, 2)}))

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def decode_mode(self) -> str:
        """The path generation steps take now (a fast mode that failed to compile or capture says what it fell to)."""
        if self.decode == "eager":
            return "eager"
        if self._fast is None:
            return self.decode
        return self._fast.mode

    def pending(self) -> int:
        with self._lock:
            return len(self._scoring) + len(self._waiting) + sum(s is not None for s in self._slots)

    def prepare_prompt(self, text: str, max_new_tokens: int) -> Tuple[List[int], int, int]:
        """Token ids for a prompt (BOS added when the tokenizer wants it), left-truncated so that prompt + new tokens
        fit the context. Returns (ids, index of the first prompt token after BOS, number of tokens cut off)."""
        ids = self.tokenizer.encode(text, bos=False).tolist()
        bos = [self.tokenizer.bos_id] if self.tokenizer.use_bos and self.tokenizer.bos_id is not None else []
        if bos and ids and ids[0] == bos[0]:
            bos = []  # the text starts with BOS already (a chat template wrote it)
        room = self.max_seq_length - max_new_tokens - len(bos)
        cut = max(0, len(ids) - room)
        return bos + ids[cut:], len(bos), cut

    # ---- the loop ------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopped or self._scoring or self._waiting or self._active()):
                    self._lock.wait()
                if self._stopped:
                    break
                admit = self._take_waiting()
                scoring = self._take_scoring(decoding=bool(admit or self._active()))
            try:
                with torch.inference_mode():
                    if admit or scoring:
                        self._drain()  # prefill and scoring run between steps, never beside one in flight
                    if admit:
                        self._admit(admit)
                    if scoring:
                        self._score(scoring)
                    if self._active():
                        self._decode_step()
            except Exception as e:  # a failed batch fails its requests, never the engine
                for r in admit + scoring + [s.request for s in self._active()]:
                    if not r.future.done():
                        r.future.set_exception(e)
                self._slots = [None] * self.max_batch_size
                self._inflight = None
        for r in list(self._scoring) + list(self._waiting) + [s.request for s in self._active()]:
            if not r.future.done():
                r.future.set_exception(RuntimeError("engine stopped"))

    def _active(self) -> List[_Slot]:
        return [s for s in self._slots if s is not None]

    def _take_waiting(self) -> List[Request]:
        free = sum(s is None for s in self._slots)
        taken, tokens = [], 0
        while self._waiting and len(taken) < free:
            n = len(self._waiting[0].prompt_ids)
            if taken and tokens + n > self.max_batch_tokens:
                break
            taken.append(self._waiting.popleft())
            tokens += n
        return taken

    def _take_scoring(self, decoding: bool = False) -> List[Request]:
        """Oldest first, up to max_batch_size rows and max_batch_tokens tokens of compute (interleave_tokens while
        generations decode: each of their steps waits for the scoring batch before it). Tokens a request shares
        with the batch's first one count once (shared-prefix prefill), so HELM's few-shot prompts batch widely."""
        limit = min(self.max_batch_tokens, self.interleave_tokens) if decoding else self.max_batch_tokens
        taken, shared, longest_tail = [], 0, 0
        while self._scoring and len(taken) < self.max_batch_size:
            ids = self._scoring[0].prompt_ids
            new_shared = min(shared, common_prefix(taken[0].prompt_ids, ids)) if taken else len(ids) - 1
            if new_shared < self.min_shared_prefix:
                new_shared = 0
            tail = max(longest_tail + shared - new_shared, len(ids) - new_shared)
            if taken and new_shared + tail * (len(taken) + 1) > limit:
                break
            taken.append(self._scoring.popleft())
            shared, longest_tail = new_shared, tail
        return taken

    # ---- scoring -------------------------------------------------------------------------------------------------

    def _score(self, requests: List[Request]) -> None:
        self.stats["scoring_batches"] += 1
        for prefix_len, group in group_by_prefix([r.prompt_ids for r in requests], self.min_shared_prefix):
            rows = [requests[i] for i in group]
            hidden = self._hidden_with_prefix([r.prompt_ids for r in rows], prefix_len)
            for r, h in zip(rows, hidden):
                self._finish_scoring(r, h)

    def _hidden_with_prefix(self, seqs: List[List[int]], prefix_len: int) -> List[Tuple[torch.Tensor, Dict]]:
        """Final hidden states (T_i, C) of each sequence (and the DoLa layers' at the last position)."""
        suffixes = [s[prefix_len:] for s in seqs]
        longest = max(len(s) for s in suffixes)
        idx = torch.zeros(len(seqs), longest, dtype=torch.long, device=self.device)
        for i, s in enumerate(suffixes):
            idx[i, : len(s)] = torch.tensor(s, device=self.device)
        # Right padding: with causal attention a padded tail never changes the positions before it.
        if prefix_len == 0:
            hidden = self.model.hidden_states(idx)
            prefix_hidden = None
        else:
            saved = [b.attn.kv_cache for b in self.model.blocks]
            caches = [PrefixCache() for _ in self.model.blocks]
            for b, c in zip(self.model.blocks, caches):
                b.attn.kv_cache = c
                c.n_keys = prefix_len
            try:
                prefix = torch.tensor(seqs[0][:prefix_len], device=self.device)[None]
                prefix_hidden = self.model.hidden_states(prefix, input_pos=torch.arange(prefix_len, device=self.device))[0]
                for c in caches:
                    c.n_keys = prefix_len + longest
                hidden = self.model.hidden_states(idx, input_pos=torch.arange(prefix_len, prefix_len + longest, device=self.device))
            finally:
                for b, c in zip(self.model.blocks, saved):
                    b.attn.kv_cache = c
        out = []
        for i, s in enumerate(suffixes):
            h = hidden[i, : len(s)]
            if prefix_hidden is not None:
                h = torch.cat([prefix_hidden, h])
            early = {layer: x[i, len(s) - 1] for layer, x in self._captured.items()}
            out.append((h, early))
        self._captured.clear()
        return out

    def _finish_scoring(self, r: Request, hidden_and_early) -> None:
        hidden, early = hidden_and_early
        prompt_scores, new_ids, new_scores = [], [], []
        if r.echo:
            prompt_scores = self._prompt_scores(r, hidden)
        finish = "length"
        if r.max_new_tokens == 1:
            logits = self.model.lm_head(hidden[-1:])
            early_logits = {k: self.model.lm_head(self.model.ln_f(v[None])) for k, v in early.items()}
            token = self._choose(logits, early_logits, [r], [self._generator(r)])[0]
            if token == self.tokenizer.eos_id:
                finish = "eos"
            else:
                new_ids = [token]
                new_scores = score_tokens(logits, [token], r.top_logprobs)
        self._resolve(r, prompt_scores, new_ids, new_scores, finish)

    def _prompt_scores(self, r: Request, hidden: torch.Tensor) -> List[TokenScore]:
        """Scores of prompt tokens echo_from.. from the hidden state at the position before each (fp32 log-softmax)."""
        ids = r.prompt_ids
        scores = []
        start = r.echo_from
        if start == 0:  # nothing to condition the very first token on
            scores.append((0.0, {ids[0]: 0.0}))
            start = 1
        chunk = 512  # bounds the (positions, vocab) fp32 logits held at once
        for a in range(start, len(ids), chunk):
            b = min(a + chunk, len(ids))
            logits = self.model.lm_head(hidden[a - 1: b - 1])
            scores.extend(score_tokens(logits, ids[a:b], r.top_logprobs))
        return scores

    # ---- generation ----------------------------------------------------------------------------------------------

    def _install_caches(self) -> None:
        if self._caches is None:
            c = self.config
            dtype = self.model.wte.weight.dtype
            if not dtype.is_floating_point or dtype.itemsize < 2:
                dtype = torch.bfloat16
            # One position more than a sequence can reach: every view the fast step takes of it then has the same
            # stride pattern, so torch.compile keeps one graph for all key lengths, the longest included.
            self._caches = [SlotCache(self.max_batch_size, c.n_query_groups, self.max_seq_length + 1, c.head_size,
                                      self.device, dtype) for _ in range(c.n_layer)]
            if self.decode != "eager":
                self._fast = FastDecoder(self.model, self._caches, self.max_seq_length, key_block=self.key_block,
                                         compile=self.decode == "compiled",
                                         cuda_graphs=self.decode in ("graphs", "compiled"),
                                         fused_4bit=self.fused_4bit)
        for block, cache in zip(self.model.blocks, self._caches):
            block.attn.kv_cache = cache

    def _admit(self, requests: List[Request]) -> None:
        """Prefill new generation requests into free slots (one padded forward pass for all of them)."""
        self.stats["prefills"] += 1
        self._install_caches()
        free = [i for i, s in enumerate(self._slots) if s is None]
        rows = free[: len(requests)]
        longest = max(len(r.prompt_ids) for r in requests)
        idx = torch.zeros(len(requests), longest, dtype=torch.long, device=self.device)
        for i, r in enumerate(requests):
            idx[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids, device=self.device)
        for c in self._caches:
            c.rows, c.n_keys = torch.tensor(rows, device=self.device), longest
        try:
            hidden = self.model.hidden_states(idx, input_pos=torch.arange(longest, device=self.device))
        finally:
            for c in self._caches:
                c.rows = None
        slots = []
        for i, (row, r) in enumerate(zip(rows, requests)):
            slot = _Slot(r, self._generator(r))
            n = len(r.prompt_ids)
            if r.echo:
                slot.prompt_scores = self._prompt_scores(r, hidden[i, :n])
            self._slots[row] = slot
            slots.append((slot, hidden[i, n - 1]))
        early = {layer: torch.stack([x[i, len(r.prompt_ids) - 1] for i, r in enumerate(requests)])
                 for layer, x in self._captured.items()}
        self._captured.clear()
        logits = self.model.lm_head(torch.stack([h for _, h in slots]))
        self._take_tokens([s for s, _ in slots], logits, early)

    def _rows(self) -> List[Optional[_Slot]]:
        """The slots a decode step runs: up to the last one in use (free ones among them are padding)."""
        return self._slots[: max(i for i, s in enumerate(self._slots) if s is not None) + 1]

    def _decode_step(self) -> None:
        if self._fast is not None:
            return self._fast_decode_step(self._rows())
        self.stats["decode_steps"] += 1
        # One host-to-device copy each (not one tiny write per row): this runs once per generated token.
        rows = self._rows()
        idx = torch.tensor([[s.new_ids[-1] if s else 0] for s in rows], device=self.device)
        positions = [s.pos if s else 0 for s in rows]
        pos = torch.tensor(positions, device=self.device)[:, None]
        n_keys = max(positions) + 1
        for c in self._caches:
            c.n_keys = n_keys
        # (B, 1, 1, n_keys), each row over its own positions; a free slot (pos 0) sees its key 0 only, never an
        # empty row
        mask = causal_mask(pos[:, 0], n_keys, self.config.sliding_window)[0, 0, :, None, None]
        logits = self.model(idx, input_pos=pos, pos_ids=pos, mask=mask)[:, -1]
        early = {layer: x[:, -1] for layer, x in self._captured.items()}
        self._captured.clear()
        live = [i for i, s in enumerate(rows) if s is not None]
        for i in live:
            rows[i].pos += 1
        index = torch.tensor(live, device=self.device)
        self._take_tokens([rows[i] for i in live], logits[index], {k: v[index] for k, v in early.items()})

    def _fast_decode_step(self, rows: List[Optional[_Slot]]) -> None:
        """The same step through fast_decode: greedy rows take the argmax and scores it computed on the device;
        sampled rows draw from its logits with their own generators, exactly as _choose does.

        Pipelined while every row is greedy: step t+1's tokens are step t's argmax, already on the device, so step
        t+1 is launched before step t is read and its host work (stop strings, bookkeeping, finished requests) runs
        while the GPU computes. A request that step t finishes has its row in step t+1 too: that output is dropped
        (its slot is no longer the one in the step), and its key/value write lands in a freed slot at a position a
        later request writes (prefill or its own step) before it ever attends to it."""
        step = self._inflight or self._launch(rows)
        self._inflight = None
        if self._pipelined(self._active()):
            self._inflight = self._launch(self._rows(), after=step[0])
        self._read(*step)
        if self._inflight and not any(s is not None and self._slots[i] is s for i, s in enumerate(self._inflight[1])):
            self._inflight = None  # every request in it has finished

    def _pipelined(self, slots: List[_Slot]) -> bool:
        return all(s.request.temperature <= GREEDY_TEMPERATURE and s.request.top_logprobs <= self._fast.top_k
                   for s in slots)

    def _launch(self, rows: List[Optional[_Slot]], after: Optional[StepOutput] = None):
        live = [s for s in rows if s is not None]
        k = min(max(s.request.top_logprobs for s in live), self._fast.top_k)
        tokens = None if after is not None else [s.new_ids[-1] if s else 0 for s in rows]
        out = self._fast.launch([s.pos if s else 0 for s in rows], k, tokens=tokens, after=after)
        self.stats["pipelined_steps"] += after is not None
        for s in live:
            s.pos += 1
        return out, list(rows)

    def _drain(self) -> None:
        """Reads the step in flight, launching none after it."""
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
            self._read(*step)

    def _read(self, out: StepOutput, rows: List[Optional[_Slot]]) -> None:
        # Rows whose request finished since the launch (the pipelined extra step) are dropped here.
        live = [i for i, s in enumerate(rows) if s is not None and self._slots[i] is s]
        if not live:
            return
        self.stats["decode_steps"] += 1
        table = out.wait()
        slots = [rows[i] for i in live]
        if max(s.request.top_logprobs for s in slots) > self._fast.top_k:  # more alternatives than the step has
            return self._take_tokens(slots, out.logits[live], {})
        greedy = table[:, 0].tolist()
        tokens = {i: int(greedy[i]) for i, s in zip(live, slots) if s.request.temperature <= GREEDY_TEMPERATURE}
        scores = {i: (table, i) for i in tokens}
        sampled = [(i, s) for i, s in zip(live, slots) if i not in tokens]
        if sampled:
            for i, token, logprob in self._draw(out, sampled):
                tokens[i], scores[i] = token, (logprob, table_score(table[i].tolist(), self._fast.top_k)[1])
        self._record(slots, [tokens[i] for i in live], [scores[i] for i in live])

    def _draw(self, out, sampled: List[Tuple[int, _Slot]]) -> List[Tuple[int, int, float]]:
        """(row, token, its logprob) for the sampled rows of a fast step. Rows with the same settings share one
        computation of the distribution and draw with their own generators: each gets the token `sample` would give
        it alone, for a few kernels per step instead of a few per row (summarisation sends 30 requests at
        temperature 0.3), and one wait for the GPU for them all."""
        groups: Dict[tuple, list] = {}
        for i, s in sampled:
            groups.setdefault((s.request.temperature, s.request.top_k or None, s.request.top_p), []).append((i, s))
        order, draws = [], []
        for (temperature, top_k, top_p), members in groups.items():
            index = [i for i, _ in members]
            probs = sampling_probs(out.logits[index], temperature, top_k, top_p)
            draws += [torch.multinomial(probs[j: j + 1], 1, generator=s.generator)[0]
                      for j, (_, s) in enumerate(members)]
            order += index
        drawn = torch.cat(draws)
        tokens, logprobs = torch.stack([drawn.to(out.logprobs.dtype), out.logprobs[order, drawn]]).tolist()
        return [(i, int(t), lp) for i, t, lp in zip(order, tokens, logprobs)]

    def _take_tokens(self, slots: List[_Slot], logits: torch.Tensor, early: Dict[int, torch.Tensor]) -> None:
        """Choose each slot's next token from its logits (B, vocab), record it, and retire finished slots."""
        early_logits = {k: self.model.lm_head(self.model.ln_f(v)) for k, v in early.items()}
        tokens = self._choose(logits, early_logits, [s.request for s in slots], [s.generator for s in slots])
        # One log-softmax/top-k and one device-to-host copy for the whole batch, not one per row.
        scores = score_tokens(logits, tokens, max(s.request.top_logprobs for s in slots))
        self._record(slots, tokens, scores)

    def _record(self, slots: List[_Slot], tokens: List[int], scores: list) -> None:
        """scores: per slot a TokenScore, or (table, row) of a fast step (see _Slot.add_score)."""
        for s, token, score in zip(slots, tokens, scores):
            r = s.request
            if token == self.tokenizer.eos_id:
                s.finish_reason = "eos"
            else:
                s.new_ids.append(token)
                s.add_score(score if isinstance(score[0], torch.Tensor)
                            else (score[0], dict(list(score[1].items())[: r.top_logprobs])))
                if len(s.new_ids) >= r.max_new_tokens:
                    s.finish_reason = "length"
                elif s.stop_window and self._stopped_text(s):
                    s.finish_reason = "stop"
            if s.finish_reason is not None:
                self._slots[self._slots.index(s)] = None
                self._resolve(r, s.prompt_scores, s.new_ids, s.new_scores, s.finish_reason)

    def _stopped_text(self, s: _Slot) -> bool:
        """Whether the text so far holds a stop string (or the blank line), as find_stop on the whole decoded text
        says. Only the last tokens are decoded each step: a stop the newest token completes lies within them. The
        whole text is decoded only when they show one, to confirm it: a window's edge (a stripped leading space, a
        character cut in half) can show what the text does not hold. Missing one (a token of no text at all in the
        window) would only decode further: the result is cut at the first stop of the whole text regardless."""
        r = s.request
        tail = self.tokenizer.decode(s.new_ids[-s.stop_window:])
        if not (any(x and x in tail for x in r.stop) or (r.stop_at_blank_line and "\n\n" in tail)):
            return False
        return find_stop(self.tokenizer.decode(s.new_ids), r.stop, r.stop_at_blank_line) is not None

    # ---- shared --------------------------------------------------------------------------------------------------

    def _generator(self, r: Request) -> Optional[torch.Generator]:
        if r.temperature <= GREEDY_TEMPERATURE:
            return None
        return seeded_generator(self.device, r.seed if r.seed is not None else random.randrange(2**63))

    def _choose(self, logits: torch.Tensor, early_logits: Dict[int, torch.Tensor], requests: List[Request],
                generators: List[Optional[torch.Generator]]) -> List[int]:
        """Next token per row: greedy rows in one argmax, sampled rows each with their own generator and settings."""
        scores = dola_scores(logits, early_logits) if early_logits else logits.float()
        greedy = scores.argmax(dim=-1).tolist()
        out = []
        for i, (r, g) in enumerate(zip(requests, generators)):
            if r.temperature <= GREEDY_TEMPERATURE:
                out.append(greedy[i])
            else:
                out.append(int(sample(scores[i: i + 1], r.temperature, r.top_k or None, r.top_p, g)[0]))
        return out

    def _capture_hook(self, layer: int):
        def hook(module, inputs, output):
            self._captured[layer] = output
        return hook

    def _resolve(self, r: Request, prompt_scores, new_ids, new_scores, finish: str) -> None:
        try:
            result = self._result(r, prompt_scores, new_ids, new_scores, finish)
        except Exception as e:
            r.future.set_exception(e)
            return
        r.future.set_result(result)

    def _result(self, r: Request, prompt_scores, new_ids, new_scores, finish: str) -> Result:
        """Per-token texts in context, and the stop strings cut out of the text and the tokens."""
        context = r.prompt_ids[: r.echo_from] if r.echo else r.prompt_ids
        shown = r.prompt_ids[r.echo_from:] if r.echo else []
        texts = self.tokenizer.token_texts(context + shown + new_ids)[len(context):] if (shown or new_ids) else []
        prompt_texts, new_texts = texts[: len(shown)], texts[len(shown):]
        cut = find_stop("".join(new_texts), r.stop, r.stop_at_blank_line)
        if cut is not None:
            finish = "stop"
            kept, start = 0, 0
            while kept < len(new_texts) and start + len(new_texts[kept]) <= cut:
                start += len(new_texts[kept])
                kept += 1
            if kept < len(new_texts) and start < cut:  # the stop string starts inside this token: keep its head
                new_texts = new_texts[:kept] + [new_texts[kept][: cut - start]]
                kept += 1
            else:
                new_texts = new_texts[:kept]
            new_ids, new_scores = new_ids[:kept], new_scores[:kept]
        return Result(shown, prompt_scores, prompt_texts, new_ids, new_scores, new_texts, finish,
                      queued_s=time.perf_counter() - r.submitted)


# ---- pure helpers (tested directly) -------------------------------------------------------------------------------


def score_tokens(logits: torch.Tensor, tokens: List[int], k: int) -> List[TokenScore]:
    """logits (N, vocab) at the positions before `tokens` (N) -> [(logprob, {top-k id: logprob})], fp32 log-softmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    top = logprobs.topk(max(1, k), dim=-1)
    top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [(c, dict(zip(ids, vals))) for c, ids, vals in zip(chosen, top_ids, top_values)]


def find_stop(text: str, stops: Sequence[str], blank_line: bool = False) -> Optional[int]:
    """Index where the text must be cut: the earliest stop string, or (blank_line) the first blank line that follows
    some non-blank text — a completion that opens with newlines is not cut to nothing."""
    cuts = [text.find(s) for s in stops if s and s in text]
    if blank_line:
        first = len(text) - len(text.lstrip())
        at = text.find("\n\n", first)
        if first < len(text) and at >= 0:
            cuts.append(at)
    return min(cuts) if cuts else None


def group_by_prefix(seqs: List[List[int]], min_prefix: int) -> List[Tuple[int, List[int]]]:
    """Groups of sequence indices sharing at least `min_prefix` leading tokens, with the shared length (kept below
    every member's length so each row has a token of its own). Sequences sharing nothing form groups with 0."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    groups, current, shared = [], [], 0
    for i in order:
        if current:
            n = common_prefix(seqs[current[0]], seqs[i])
            if min(n, shared) >= min_prefix:
                current.append(i)
                shared = min(n, shared)
                continue
            groups.append((current, shared))
        current, shared = [i], len(seqs[i])
    if current:
        groups.append((current, shared))
    out, singles = [], []
    for members, shared in groups:
        shared = min(shared, min(len(seqs[i]) for i in members) - 1)
        if len(members) > 1 and shared >= min_prefix:
            out.append((shared, members))
        else:
            singles.extend(members)
    if singles:
        out.append((0, sorted(singles)))
    return out


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def dola_scores(final_logits: torch.Tensor, early_logits: Dict[int, torch.Tensor], alpha: float = 0.1) -> torch.Tensor:
    """DoLa (Chuang et al., 2023): per row, contrast the final layer with the early layer whose next-token distribution
    differs most from it (Jensen-Shannon divergence), over the tokens the final layer finds plausible
    (p >= alpha * max p); everything else gets -inf. Returns scores (B, vocab) to argmax or sample from."""
    final = torch.log_softmax(final_logits.float(), dim=-1)
    layers = sorted(early_logits)
    early = torch.stack([torch.log_softmax(early_logits[k].float(), dim=-1) for k in layers])  # (L, B, V)
    m = 0.5 * (final.exp()[None] + early.exp())
    log_m = m.clamp_min(1e-30).log()
    jsd = 0.5 * ((final.exp()[None] * (final[None] - log_m)).sum(-1) + (early.exp() * (early - log_m)).sum(-1))  # (L, B)
    premature = early.gather(0, jsd.argmax(0)[None, :, None].expand(1, *final.shape))[0]
    plausible = final >= final.max(dim=-1, keepdim=True).values + math.log(alpha)
    return (final - premature).masked_fill(~plausible, float("-inf"))


def parse_dola_layers(spec: Optional[str], n_layer: int) -> Optional[List[int]]:
    """DoLa's candidate early layers: "low" (even layers of the first half, as the paper's 'lower bucket'), "high"
    (even layers of the second half) or a comma list of layer indices; None/"" turns DoLa off."""
    if not spec:
        return None
    if spec in ("low", "high"):
        half = n_layer // 2
        layers = range(0, half, 2) if spec == "low" else range(half, n_layer - 1, 2)
        return list(layers) or [0]
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        layers = None
    if layers is None or not all(0 <= layer < n_layer for layer in layers):
        raise InputError(f"--dola_layers {spec!r}: use low, high or comma-separated layers of 0..{n_layer - 1}, "
                         "like 0,2,4")
    return layers
