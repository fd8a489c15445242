"""generate/fast_decode.py against the engine's plain decode step and a direct forward pass: the same tokens and
log-probabilities alone or batched, bucket padding that never leaks, slots reused, scoring interleaved with decoding,
4-bit bases with and without an adapter, and torch.compile."""

import random

import pytest
import torch

from generate.engine import Engine, Request
from generate.fast_decode import bucket_of, buckets
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
    options = dict(max_seq_length=96, max_batch_size=4, key_block=8, **kwargs)
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


def assert_same(results, reference, abs=1e-5):
    for a, b in zip(results, reference):
        assert a.new_ids == b.new_ids and a.finish_reason == b.finish_reason
        assert [s for s, _ in a.new_scores] == pytest.approx([s for s, _ in b.new_scores], abs=abs)
        assert [list(top) for _, top in a.new_scores] == [list(top) for _, top in b.new_scores]  # same alternatives
        for (_, top_a), (_, top_b) in zip(a.new_scores, b.new_scores):
            assert list(top_a.values()) == pytest.approx(list(top_b.values()), abs=abs)


def test_buckets():
    assert buckets(32) == [1, 2, 4, 8, 16, 32] and buckets(30) == [1, 2, 4, 8, 16, 30] and buckets(1) == [1]
    assert [bucket_of(n, buckets(30)) for n in (1, 3, 16, 17, 30)] == [1, 4, 16, 30, 30]


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


@pytest.mark.parametrize("adapter", [False, True])
def test_4bit_base_with_and_without_adapter(checkpoint, adapter):
    """bitsandbytes' NF4 layers (on the CPU here) and LoRA kept unmerged over them, through the fast step."""
    pytest.importorskip("bitsandbytes")

    def model():
        m = load_model(checkpoint, quantize="bnb.nf4")
        if adapter:
            from lora import LoRAConfig, inject_lora, lora_modules

            torch.manual_seed(0)
            inject_lora(m, LoRAConfig(r=4, alpha=8, targets=("q", "v", "o", "down")))
            with torch.no_grad():
                for layer in lora_modules(m).values():
                    layer.lora_B.normal_(0, 0.5)
        return m.eval()

    specs = requests(6, seed=4)
    alone = run(make_engine(checkpoint, "eager", model=model()), specs, together=False)
    assert_same(run(make_engine(checkpoint, "static", model=model()), specs, together=True), alone, abs=1e-4)


def test_compiled_decode_equals_plain(checkpoint):
    """torch.compile'd blocks (Inductor's C++ backend here): one compiled graph for one row, one for several."""
    specs = requests(5, seed=5)
    engine = make_engine(checkpoint, "compiled")
    together = run(engine, specs, together=True)
    assert engine.decode_mode == "static+compiled"  # still compiled: nothing fell back
    assert_same(together, run(make_engine(checkpoint, "eager"), specs, together=False), abs=1e-4)
