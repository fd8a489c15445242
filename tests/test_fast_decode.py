"""generate/fast_decode.py against the engine's plain decode step and a direct forward pass: the same tokens and
log-probabilities alone or batched, bucket padding that never leaks, slots reused, scoring interleaved with decoding,
4-bit bases with and without an adapter, and torch.compile."""

import functools
import random

import pytest
import torch

from generate.engine import Engine, Request
from generate import fast_decode
from generate.fast_decode import bucket_of, buckets, decode_attention
from model import CausalSelfAttention, causal_mask
from tests.tiny_checkpoint import make_tiny_checkpoint
from tokenizer import Tokenizer
from utils import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# A sliding window shorter than the generations, so the fast step's window mask is exercised too.
WINDOW = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), sliding_window=WINDOW)


def make_engine(checkpoint, decode, model=None, **kwargs):
    model = model if model is not None else load_model(checkpoint)
    # key_block 8: several key-length buckets within these short sequences
    options = {"max_seq_length": 96, "max_batch_size": 4, "key_block": 8, **kwargs}
    return Engine(model.eval(), Tokenizer(checkpoint), decode=decode, **options)


def requests(n=12, seed=0):
    """Greedy rows asking for 1-3 alternatives, of different prompt and output lengths, and seeded sampled rows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 30))]
        if i % 4 == 3:
            out.append(dict(prompt_ids=prompt, max_new_tokens=rng.randrange(2, 25), temperature=0.9, top_p=0.9,
                            seed=i, top_logprobs=2))
        else:
            out.append(dict(prompt_ids=prompt, max_new_tokens=rng.randrange(2, 40), temperature=0.0,
                            top_logprobs=1 + i % 3))
    return out


def run(engine, specs, together):
    engine.start()
    try:
        if together:
            futures = [engine.submit(Request(**s)) for s in specs]
            return [f.result() for f in futures]
        return [engine.submit(Request(**s)).result() for s in specs]
    finally:
        engine.stop()


# fp32 rounding: the fast step's attention (decode_attention's matrix products) sums in another order than SDPA's
def assert_same(results, reference, abs=3e-5):
    for a, b in zip(results, reference):
        assert a.new_ids == b.new_ids and a.finish_reason == b.finish_reason
        assert [s for s, _ in a.new_scores] == pytest.approx([s for s, _ in b.new_scores], abs=abs)
        assert [list(top) for _, top in a.new_scores] == [list(top) for _, top in b.new_scores]  # same alternatives
        for (_, top_a), (_, top_b) in zip(a.new_scores, b.new_scores):
            assert list(top_a.values()) == pytest.approx(list(top_b.values()), abs=abs)


def test_buckets():
    assert buckets(32) == [1, 2, 4, 8, 16, 32] and buckets(30) == [1, 2, 4, 8, 16, 30] and buckets(1) == [1]
    assert [bucket_of(n, buckets(30)) for n in (1, 3, 16, 17, 30)] == [1, 4, 16, 30, 30]


@pytest.mark.parametrize("n_kv", [1, 2, 8])
def test_decode_attention_equals_the_models_attention(n_kv):
    """One query per row over each row's own number of keys (a per-row causal mask, with a sliding window), grouped
    query heads, keys and values sliced from a larger cache: the fast step's attention equals model.attend (SDPA),
    in fp32 and, from bf16 inputs, within bf16's rounding."""
    torch.manual_seed(n_kv)
    B, n_head, L, hs = 5, 8, 24, 16
    # keys and values as the step sees them: the first B slots and L positions of a larger cache
    cache_k, cache_v = torch.randn(B + 2, n_kv, L + 9, hs), torch.randn(B + 2, n_kv, L + 9, hs)
    q, k, v = torch.randn(B, n_head, 1, hs), cache_k[:B, :, :L], cache_v[:B, :, :L]
    pos = torch.tensor([0, 3, 10, 23, 17])
    mask = causal_mask(pos, L, window=7)[0, 0, :, None, None]
    expected = CausalSelfAttention.attend(None, q, k, v, mask)
    assert torch.allclose(decode_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(decode_attention(q, k, v, causal_mask(pos, L)[0, 0, :, None, None]), expected, atol=1e-3)
    half = [t.bfloat16() for t in (q, k, v)]
    assert torch.allclose(decode_attention(*half, mask).float(), expected, atol=2e-2, rtol=2e-2)


def test_the_step_keeps_the_models_attention_where_decode_attention_cannot_run(checkpoint):
    """FastDecoder.attention None (CUDA with a torch before bmm's out_dtype): every block keeps model.attend, and the
    answers are the plain step's."""
    specs = requests(6, seed=3)
    engine = make_engine(checkpoint, "static")
    with torch.inference_mode():
        engine._install_caches()
    engine._fast.attention = None
    seen = []
    original = CausalSelfAttention.attend
    try:
        CausalSelfAttention.attend = lambda self, q, *args: seen.append(q.size(2)) or original(self, q, *args)
        together = run(engine, specs, together=True)
    finally:
        CausalSelfAttention.attend = original
    assert 1 in seen  # one query per row: the fast step's, through model.attend (prefills have longer prompts)
    assert_same(together, run(make_engine(checkpoint, "eager"), specs, together=False))


def test_batched_fast_answers_equal_plain_single_answers(checkpoint):
    """12 requests on 4 slots: slots are reused as requests finish, leaving holes that decode as padding rows of a
    bucket, while later requests are prefilled into them. Each answer equals the plain step's answer alone (fp32),
    sampled rows included (same seed, same draws)."""
    specs = requests()
    alone = run(make_engine(checkpoint, "eager"), specs, together=False)
    engine = make_engine(checkpoint, "static")
    together = run(engine, specs, together=True)
    assert_same(together, alone)
    assert engine.stats["prefills"] >= 3 and engine.decode_mode == "static"  # slots were reused
    assert_same(run(make_engine(checkpoint, "static"), specs, together=False), alone)


def test_sampled_rows_draw_what_they_draw_alone(checkpoint):
    """Sampled rows of the same settings share one distribution computation in a step; each still draws with its own
    seeded generator exactly the tokens the plain step draws for it alone."""
    specs = [dict(prompt_ids=[5 + i, 17, 42], max_new_tokens=12, temperature=0.7, top_k=50, seed=i, top_logprobs=2)
             for i in range(3)]
    specs += [dict(prompt_ids=[9, 8 + i], max_new_tokens=10, temperature=1.0, top_p=0.8, seed=10 + i) for i in range(2)]
    alone = run(make_engine(checkpoint, "eager"), specs, together=False)
    assert_same(run(make_engine(checkpoint, "static"), specs, together=True), alone)
    assert len({tuple(r.new_ids) for r in alone[:3]}) == 3  # the seeds matter


def test_fast_step_logprobs_equal_a_direct_forward_pass(checkpoint):
    """Drives the engine by hand: three rows of different lengths, the middle one retired so that its slot decodes
    as a padding row, past the sliding window. Every score equals log_softmax of a full forward pass."""
    engine = make_engine(checkpoint, "static")
    model = engine.model
    prompts = [[5, 17, 42, 9], list(range(20, 40)), [7, 8, 9, 10, 11, 12]]
    with torch.inference_mode():
        engine._admit([Request(prompt_ids=p, max_new_tokens=30, temperature=0.0, top_logprobs=3) for p in prompts])
        engine._slots[1] = None
        for _ in range(2 * WINDOW):
            engine._decode_step()
        for slot in (engine._slots[0], engine._slots[2]):
            ids = slot.request.prompt_ids + slot.new_ids
            ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
            n = len(slot.request.prompt_ids)
            for j, (logprob, top) in enumerate(slot.new_scores):
                row = ref[n - 1 + j]
                assert slot.new_ids[j] == int(row.argmax())
                assert logprob == pytest.approx(float(row[slot.new_ids[j]]), abs=1e-5)
                assert list(top) == row.topk(3).indices.tolist()


def test_requests_asking_more_alternatives_than_the_step_computes(checkpoint):
    spec = [dict(prompt_ids=[5, 6, 7], max_new_tokens=5, temperature=0.0, top_logprobs=25)]  # the step computes 20
    result = run(make_engine(checkpoint, "static"), spec, together=False)
    assert_same(result, run(make_engine(checkpoint, "eager"), spec, together=False))
    assert all(len(top) == 25 for _, top in result[0].new_scores)


def test_warm_up_writes_nothing_a_request_sees(checkpoint):
    engine = make_engine(checkpoint, "static")
    with torch.inference_mode():
        engine._install_caches()
        assert engine._fast.warm_up() == len(buckets(4)) * len(range(8, 97, 8))  # row buckets x key buckets
    specs = requests(6, seed=1)
    assert_same(run(engine, specs, together=True), run(make_engine(checkpoint, "eager"), specs, together=False))


def test_scoring_is_interleaved_with_decoding(checkpoint):
    """While generations decode, a scoring batch holds at most interleave_tokens tokens; both kinds complete and
    each answer equals its answer alone."""
    engine = make_engine(checkpoint, "static", interleave_tokens=64)
    scoring = [Request(prompt_ids=list(range(3 + i, 43 + i)), max_new_tokens=1, temperature=0.0) for i in range(6)]
    engine._scoring.extend(scoring)
    assert len(engine._take_scoring(decoding=True)) == 1  # 40 tokens each: a second would pass 64
    assert len(engine._take_scoring(decoding=False)) == 4  # max_batch_size rows at once
    mixed = requests(8, seed=2) + [dict(prompt_ids=list(range(3 + i, 43 + i)), max_new_tokens=1, temperature=0.0,
                                        echo=True, top_logprobs=2) for i in range(8)]
    random.Random(3).shuffle(mixed)
    engine = make_engine(checkpoint, "static", interleave_tokens=64)
    together = run(engine, mixed, together=True)
    assert_same(together, run(make_engine(checkpoint, "eager"), mixed, together=False), abs=1e-4)
    assert engine.stats["scoring_batches"] >= 4  # 8 scoring requests of 40 tokens, at most one per batch while decoding


def test_dola_keeps_the_plain_step(checkpoint):
    assert make_engine(checkpoint, "static", dola_layers=[0]).decode_mode == "eager"


def quantized_model(checkpoint, quantize: str, adapter: bool):
    """The checkpoint over a 4-bit base, with an unmerged LoRA adapter whose B is random (so that it changes outputs),
    frozen as the server freezes it."""
    model = load_model(checkpoint, quantize=quantize)
    if adapter:
        from lora import LoRAConfig, freeze_lora, inject_lora, lora_modules

        torch.manual_seed(0)
        inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "v", "o", "down")))
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_B.normal_(0, 0.5)
        freeze_lora(model, model.wte.weight.dtype)  # as the server keeps an adapter over a 4-bit base
    return model.eval()


@pytest.mark.parametrize("adapter", [False, True])
def test_4bit_base_with_and_without_adapter(checkpoint, adapter):
    """bitsandbytes' NF4 layers (on the CPU here) and LoRA kept unmerged over them, through the fast step."""
    pytest.importorskip("bitsandbytes")
    specs = requests(6, seed=4)
    alone = run(make_engine(checkpoint, "eager", model=quantized_model(checkpoint, "bnb.nf4", adapter)), specs,
                together=False)
    fast = make_engine(checkpoint, "static", model=quantized_model(checkpoint, "bnb.nf4", adapter))
    assert_same(run(fast, specs, together=True), alone, abs=1e-4)


def test_compiled_decode_equals_plain(checkpoint):
    """torch.compile'd blocks (Inductor's C++ backend here): graphs for one row and for several, each serving every key
    length after its first."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    specs = requests(5, seed=5)
    engine = make_engine(checkpoint, "compiled")
    engine.warm_up()  # every bucket: 3 row counts x 12 key lengths
    together = run(engine, specs, together=True)
    assert engine.decode_mode == "static+compiled"  # still compiled: nothing fell back
    # No bucket gets its own graph: per row class one for the first key length, one for every other.
    assert counters["stats"]["unique_graphs"] == 4 and len(engine._fast._views) == 12
    assert_same(together, run(make_engine(checkpoint, "eager"), specs, together=False), abs=1e-4)


def test_a_failing_compiled_step_falls_back_to_the_plain_one(checkpoint, caplog):
    """A step whose compiled call fails midway (here in its second block) runs again without torch.compile, the log
    names the failure, and every block gets its own cache and attention back, also the blocks the failed step never
    reached."""
    specs = requests(5, seed=5)
    engine = make_engine(checkpoint, "compiled")
    with torch.inference_mode():
        engine._install_caches()
    fast, calls = engine._fast, []

    def fails_once(block, *args):
        calls.append(block)
        if len(calls) == 2:
            raise RuntimeError("compilation failed")
        return fast_decode._call_block(block, *args)

    fast._block = fails_once
    own = engine.model.blocks[-1].attn.attend = functools.partial(CausalSelfAttention.attend, None)  # set by a layer
    together = run(engine, specs, together=True)
    assert engine.decode_mode == "static" and len(calls) == 2
    assert "RuntimeError in bucket" in caplog.text and "compilation failed" in caplog.text
    assert_same(together, run(make_engine(checkpoint, "eager"), specs, together=False))
    for block, cache in zip(engine.model.blocks[:-1], engine._caches):
        assert "attend" not in vars(block.attn) and block.attn.kv_cache is cache
    assert vars(engine.model.blocks[-1].attn)["attend"] is own


# ---- pipelining: step t+1 is launched from step t's argmax before step t is read -----------------------------------


def stops_inside(engine_factory, specs):
    """Each spec gets a stop string cut from the middle of its own plain, unstopped output (so it ends that row
    mid-batch, and may span tokens or hold a character of several tokens), or the blank line."""
    plain = run(engine_factory(), specs, together=False)
    out = []
    for i, (spec, result) in enumerate(zip(specs, plain)):
        text = "".join(result.new_texts)
        spec = dict(spec)
        if len(text) > 6:
            at = len(text) // 2 + i % 3
            spec["stop"] = [text[at: at + 2 + i % 3]]
        else:
            spec["stop_at_blank_line"] = True
        out.append(spec)
    return out


def test_pipelined_steps_give_the_plain_answers(checkpoint):
    """Greedy requests only (so steps are pipelined), of different max_new_tokens and with stop strings that end rows
    mid-batch, on 3 slots: requests finish while a step is already launched for them, and new ones are admitted into
    their slots while others decode. Every answer equals the plain step's answer alone."""
    rng = random.Random(6)
    specs = [dict(prompt_ids=[rng.randrange(3, 300) for _ in range(rng.randrange(2, 20))],
                  max_new_tokens=rng.randrange(2, 40), temperature=0.0, top_logprobs=1 + i % 2) for i in range(10)]
    specs = stops_inside(lambda: make_engine(checkpoint, "eager"), specs)
    alone = run(make_engine(checkpoint, "eager"), specs, together=False)
    assert sum(r.finish_reason == "stop" for r in alone) >= 5
    engine = make_engine(checkpoint, "static", max_batch_size=3)
    assert_same(run(engine, specs, together=True), alone)
    for a, b in zip(run(make_engine(checkpoint, "static", max_batch_size=3), specs, together=True), alone):
        assert a.new_texts == b.new_texts
    assert engine.stats["pipelined_steps"] > engine.stats["prefills"]  # most steps ran pipelined
    assert engine.stats["prefills"] >= 3  # requests were admitted while others decoded


def test_the_extra_pipelined_step_leaks_nothing(checkpoint):
    """Request A stops early; its slot has already been fed one more step (a key/value written past A's end, an
    output dropped). B, admitted to that slot with a shorter prompt, gets what it gets alone, and A gets no extra
    token or logprob."""
    a = dict(prompt_ids=list(range(40, 70)), max_new_tokens=30, temperature=0.0)
    a = stops_inside(lambda: make_engine(checkpoint, "eager"), [a])[0]
    b = dict(prompt_ids=[7, 8, 9], max_new_tokens=20, temperature=0.0, top_logprobs=2)
    alone = run(make_engine(checkpoint, "eager"), [a, b], together=False)
    engine = make_engine(checkpoint, "static", max_batch_size=1)
    with torch.inference_mode():
        engine._admit([Request(**a)])
        slot = engine._slots[0]
        while engine._slots[0] is slot:
            engine._decode_step()
        assert engine._inflight is None  # A's extra step was dropped with it
        assert engine.stats["pipelined_steps"] == engine.stats["decode_steps"]  # each read step had a next one
    first = slot.request.future.result()
    assert_same([first], alone[:1]) and first.finish_reason == "stop"
    assert len(slot.new_ids) == len(slot.new_scores) <= a["max_new_tokens"]
    assert_same(run(engine, [b], together=False), alone[1:])


def test_sampled_rows_turn_pipelining_off(checkpoint):
    specs = [dict(prompt_ids=[5, 6, 7], max_new_tokens=12, temperature=0.0),
             dict(prompt_ids=[9, 8], max_new_tokens=12, temperature=0.8, seed=3)]
    engine = make_engine(checkpoint, "static")
    with torch.inference_mode():
        engine._admit([Request(**s) for s in specs])
        for _ in range(5):
            engine._decode_step()
    assert engine.stats["pipelined_steps"] == 0 and engine._inflight is None


@pytest.mark.parametrize("seed", range(3))
def test_stop_check_on_the_last_tokens_equals_the_whole_text(checkpoint, seed):
    """_stopped_text decodes only a window of the last tokens; on random token sequences (multi-byte characters split
    over byte-level tokens included) it first sees a stop at the same token as find_stop on the whole decoded text
    (where the engine ends the request), and never before."""
    from generate.engine import _Slot, find_stop

    engine = make_engine(checkpoint, "eager")
    tok = engine.tokenizer
    rng = random.Random(seed)
    pieces = ["東京", "🙂", "é", "\n\n", " Paris", "7.", "ü"]
    text = "".join(rng.choice(pieces + ["The capital ", "Answer: B", "\n", " "]) for _ in range(60))
    ids = tok.encode(text, bos=False).tolist()
    ids = [t if rng.random() > 0.1 else rng.randrange(tok.vocab_size) for t in ids]  # some broken characters too
    stops = [rng.choice(pieces), "al o"]
    for blank_line in (False, True):
        slot = _Slot(Request(prompt_ids=[1], stop=stops, stop_at_blank_line=blank_line), None)
        assert find_stop(tok.decode(ids), stops, blank_line) is not None
        for start in range(len(ids)):  # each later stop, as the first one of the text that starts after `start`
            slot.new_ids = []
            first = None
            for n in range(start + 1, len(ids) + 1):
                slot.new_ids = ids[start:n]
                if engine._stopped_text(slot):
                    first = n
                    break
            expected = next((n for n in range(start + 1, len(ids) + 1)
                             if find_stop(tok.decode(ids[start:n]), stops, blank_line) is not None), None)
            assert first == expected, (start, tok.decode(ids[start:]))
