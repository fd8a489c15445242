"""generate/base.py: the sampling rules and batched KV-cache decoding, against direct computation."""

import pytest
import torch

from generate.base import cut_at_stop, generate, sample, sampling_probs, seeded_generator
from model import GPT, Config

pytestmark = pytest.mark.usefixtures("one_thread")


def draws(logits, n=400, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return {int(sample(logits, generator=generator, **kwargs)) for _ in range(n)}


def test_sampling_rules():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    assert int(sample(logits, temperature=1e-7)) == 1  # HELM's "greedy" temperature
    assert draws(logits, temperature=1.0) == {0, 1, 2, 3}
    assert draws(logits, temperature=1.0, top_k=2) == {1, 2}
    assert draws(logits, temperature=1.0, top_p=0.7) == {1, 2}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert draws(logits, temperature=1.0, top_p=0.5) == {1}  # the first token alone reaches 0.5
    assert draws(logits, temperature=1.0, top_p=0.01) == {1}
    # Temperature sharpens: at 0.25 the most likely token dominates far more than its probability of 0.5.
    generator = torch.Generator().manual_seed(0)
    picks = [int(sample(logits, temperature=0.25, generator=generator)) for _ in range(400)]
    assert picks.count(1) / 400 > 0.8


def test_sampling_probs_row_by_row():
    """The engine's fast step computes the distribution once for all rows of the same settings and draws each row
    with its own generator: every row must get exactly what `sample` gives it alone."""
    logits = torch.randn(5, 300)
    together = sampling_probs(logits, 0.7, top_k=40, top_p=0.9)
    for i in range(5):
        assert torch.equal(together[i: i + 1], sampling_probs(logits[i: i + 1], 0.7, top_k=40, top_p=0.9))
        g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        drawn = torch.multinomial(together[i: i + 1], 1, generator=g1)[0]
        assert torch.equal(drawn, sample(logits[i: i + 1], 0.7, 40, 0.9, g2))
    assert (together > 0).sum(-1).max() <= 40 and torch.allclose(together.sum(-1), torch.ones(5))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Config(name="tiny", block_size=64, vocab_size=50, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                    intermediate_size=48, sliding_window=6)
    return GPT(config).eval()


def full_recompute_greedy(model, prompt, n):
    x = prompt.clone()
    for _ in range(n):
        x = torch.cat([x, model(x[None])[0, -1].argmax()[None]])
    return x[len(prompt):].tolist()


def test_batched_prompts_of_different_lengths_match_full_recomputation(model):
    prompts = [torch.randint(0, 50, (n,)) for n in (3, 11, 5)]
    together = generate(model, prompts, 12)  # past the sliding window of 6, with left padding
    assert together == [full_recompute_greedy(model, p, 12) for p in prompts]


def test_eos_and_stop_callback_end_a_row(model):
    prompt = torch.randint(0, 50, (4,))
    reference = full_recompute_greedy(model, prompt, 8)
    eos = reference[3]
    first_eos = reference.index(eos)
    assert generate(model, [prompt], 8, eos_id=eos) == [reference[:first_eos]]  # EOS ends it and is not returned
    assert generate(model, [prompt], 8, stop=lambda tokens: len(tokens) == 2) == [reference[:2]]
    assert generate(model, [prompt], 0) == [[]]


def test_seeded_sampling_is_reproducible(model):
    prompt = [torch.randint(0, 50, (4,))]
    a = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_context_overflow_is_a_clear_error(model):
    from cli import InputError

    with pytest.raises(InputError, match=r"exceeds the model's context of 64 tokens"):
        generate(model, [torch.zeros(60, dtype=torch.long)], 10)


def test_any_integer_seeds_a_generator():
    """torch.manual_seed takes [-2**63, 2**64); the command line and the server's JSON take any integer."""
    for seed in (5, 2**64 + 5, 2**70 + 5, -(2**70) + 5):
        assert seeded_generator("cpu", seed).initial_seed() == 5
    assert seeded_generator("cpu", -1).initial_seed() == 2**64 - 1


def test_cut_at_stop():
    assert cut_at_stop("4\n\nQuestion: next", ["\n\n", "###"]) == "4"
    assert cut_at_stop("no stop here", ["\n\n"]) == "no stop here"
    assert cut_at_stop("a###b\n\nc", ["\n\n", "###"]) == "a"  # the earliest stop wins
