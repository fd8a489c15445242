"""Packed rows through FlexAttention (fast.packed_mask, fast/attention.py) compute what the dense document mask of
model.py computes, and what running each document alone computes: the BlockMask stands for model.document_mask tile
by tile, and a sped-up model's loss, hidden states and LoRA gradients over packed rows equal the plain model's, with
GQA, a sliding window shorter than the documents, padding (a row's tail and whole rows, as CUDA graphs pad), a row of
many short documents, and activation checkpointing with and without offloading.

FlexAttention runs here eagerly, the math its compiled GPU kernels are checked against (tests/gpu/check_fused.py
checks those, with the CUDA graph and FP8). Eager FlexAttention computes its backward pass on a CPU too, but refuses
to: the `cpu_backward` fixture lifts that refusal for these tests.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.attention.flex_attention as flex
from torch.nn.attention.flex_attention import BlockMask, create_mask

import fast
from data import IGNORE, collate, load_split, make_examples, pack
from fast import fused
from fast.attention import document_block_mask
from fast.memory import chunked_cross_entropy, enable_activation_checkpointing
from finetune.lora import training_loss
from lora import LoRAConfig, inject_lora
from model import GPT, Config, document_mask, segment_positions
from tiny_data import write_split

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(name="tiny", block_size=64, vocab_size=61, n_layer=2, n_embd=32, intermediate_size=48)
CONFIGS = {
    "gqa": dict(n_head=4, n_query_groups=2),
    "gqa+window": dict(n_head=4, n_query_groups=2, sliding_window=8),  # Mistral-like, shorter than most documents
    "mha+window": dict(n_head=4, n_query_groups=4, sliding_window=5),
}
T = 64  # max_seq_length


@pytest.fixture
def cpu_backward(monkeypatch):
    """FlexAttention refuses requires_grad inputs on a CPU in one check (torch 2.13); past it, its eager path computes
    the backward pass as on a GPU, from the same mask function. A renamed check makes this fail loudly."""
    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Samples of mixed lengths, as an instruction set has: a few long ones (longer than the window), some mid-sized,
    and many of 2-4 tokens, so one packed row holds a dozen documents."""
    g = torch.Generator().manual_seed(5)
    samples = []
    for n in [41, 33, 20, 17, 15, 12, 11, 9] + [int(x) for x in torch.randint(3, 6, (24,), generator=g)]:
        tokens = torch.randint(3, BASE["vocab_size"], (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)
        samples.append((tokens, mask))
    path = tmp_path_factory.mktemp("packing") / "s.safetensors"
    write_split(path, samples)
    ex = make_examples(load_split(path), max_seq_length=T)
    return ex, pack(ex.lengths.tolist(), T)


@pytest.fixture(scope="module")
def batch(examples):
    """Three packed rows padded to T, and a fourth of padding only (data.collate's fixed shapes, as for CUDA graphs);
    one row holds many short documents."""
    ex, rows = examples
    rows = sorted(rows, key=len)
    chosen = [rows[0], rows[len(rows) // 2], rows[-1]]
    assert len(chosen[-1]) >= 8 and sum(int(ex.lengths[i]) for i in chosen[0]) < T  # many documents; a padded tail
    b = collate(ex, chosen, packed=True, device="cpu", fixed_length=T, fixed_rows=4)
    assert (b["segments"][3] == -1).all() and (b["targets"][3] == IGNORE).all()
    return b


def tiny_model(name, seed=0):
    torch.manual_seed(seed)
    net = GPT(Config(**BASE, **CONFIGS[name]))
    inject_lora(net, LoRAConfig(r=4, dropout=0.0))
    for n, p in net.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)  # B = 0 at init would hide every mistake in the adapters' gradients
    return net.train()


def with_flex(net):
    """A sped-up copy of `net` whose packed rows run FlexAttention (eagerly: the CPU has no compiled backward)."""
    net = copy.deepcopy(net)
    return fused.convert(net, dataclasses.replace(fused.PLAIN, flex_attention=flex.flex_attention))


def packed_loss(net, batch):
    """The trainer's loss, every position through the head (select_targets=False, as with CUDA graphs)."""
    return training_loss(net, batch, select_targets=False)[0]


def loss_and_grads(net, batch):
    for p in net.parameters():
        p.grad = None
    loss = packed_loss(net, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], msg=lambda m: f"{name}: {m}", **tol)


def count_flex_calls(monkeypatch, net):
    """Counts the calls of `net`'s FlexAttention kernel."""
    calls = []
    kernels = net.blocks[0].attn.kernels
    kernel = kernels.flex_attention
    spy = dataclasses.replace(kernels, flex_attention=lambda *a, **k: calls.append(1) or kernel(*a, **k))
    for m in net.modules():
        if isinstance(m, fused.FastAttention):
            monkeypatch.setattr(m, "kernels", spy)
    return calls


@pytest.mark.parametrize("window", [None, 8, 200])
def test_block_mask_is_the_document_mask_tile_by_tile(window):
    """Written out, the BlockMask is model.document_mask; at the level of 128 x 128 tiles it lists exactly the tiles
    with an allowed pair (the kernel skips the others) and marks as full exactly those allowed throughout (the kernel
    computes no mask there). Rows of 300 tokens: 3 x 3 tiles, documents across tile edges, padding."""
    g = torch.Generator().manual_seed(0)
    lengths = [[130, 100, 40], [5] * 50 + [20], [256, 30], [300]]
    segments = torch.full((len(lengths), 300), -1)
    for b, row in enumerate(lengths):
        segments[b, :sum(row)] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    segments = segments[torch.randperm(len(lengths), generator=g)]
    dense = document_mask(segments, window)
    bm = document_block_mask(segments, window)
    torch.testing.assert_close(create_mask(bm.mask_mod, 4, 1, 300, 300), dense)
    tiles = torch.nn.functional.pad(dense, (0, 84, 0, 84)).view(4, 1, 3, 128, 3, 128).transpose(3, 4)
    any_allowed, all_allowed = tiles.any(-1).any(-1), tiles.all(-1).all(-1)
    assert torch.equal(bm.to_dense().bool(), any_allowed)
    full = BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=128).to_dense().bool()
    assert torch.equal(full, all_allowed)
    assert not any_allowed.all() and (any_allowed & ~all_allowed).any()  # some tiles skipped, some partial
    assert all_allowed.any() == (window is None)  # and without a window some full (a window cuts every tile here)


def test_packed_mask_is_a_block_mask_only_for_a_model_with_flex_attention():
    net = tiny_model("gqa+window")
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    reference = document_mask(segments, 8)
    assert torch.equal(fast.packed_mask(net, segments), reference)  # the plain model
    sped_up = fast.speed_up(copy.deepcopy(net))  # on a CPU: no FlexAttention kernel, the dense mask
    assert sped_up.blocks[0].attn.kernels.flex_attention is None
    assert torch.equal(fast.packed_mask(sped_up, segments), reference)
    wrapped = nn.Sequential(with_flex(net))  # inside a wrapper, as Fabric's
    mask = fast.packed_mask(wrapped, segments)
    assert isinstance(mask, BlockMask)
    torch.testing.assert_close(create_mask(mask.mask_mod, 1, 1, 8, 8), reference)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_flex_forward_equals_the_dense_reference(name, batch, monkeypatch):
    """Hidden states at every position, padding included, with FlexAttention's own forward (no backward involved)."""
    net = tiny_model(name)
    fast_net = with_flex(net)
    calls = count_flex_calls(monkeypatch, fast_net)
    pos = segment_positions(batch["segments"])
    with torch.no_grad():
        want = net.hidden_states(batch["idx"], pos_ids=pos, mask=document_mask(batch["segments"],
                                                                                 net.config.sliding_window))
        got = fast_net.hidden_states(batch["idx"], pos_ids=pos, mask=fast.packed_mask(fast_net, batch["segments"]))
    assert len(calls) == BASE["n_layer"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if net.config.sliding_window:  # the window matters in this batch
        assert not torch.equal(document_mask(batch["segments"], net.config.sliding_window),
                               document_mask(batch["segments"]))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("checkpointing", [None, "recompute", "offload"])
def test_packed_flex_loss_and_lora_grads_equal_the_dense_reference(name, checkpointing, batch, cpu_backward,
                                                                   monkeypatch):
    net = tiny_model(name)
    reference = loss_and_grads(net, batch)  # the plain model: model.document_mask, SDPA
    fast_net = with_flex(net)
    if checkpointing:  # after speed_up: it wraps the fast blocks' forward
        enable_activation_checkpointing(fast_net, preserve_rng_state=False, offload=checkpointing == "offload")
    calls = count_flex_calls(monkeypatch, fast_net)
    assert_same(loss_and_grads(fast_net, batch), reference, rtol=1e-4, atol=1e-5)
    assert len(calls) == BASE["n_layer"] * (2 if checkpointing else 1)  # checkpointing runs each block twice


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_rows_equal_each_document_run_alone(name, batch, cpu_backward):
    """The plain model on each document by itself (no mask: SDPA's causal path, positions from 0) gives the hidden
    states the packed rows give at that document's positions, and its losses and gradients, summed over the
    documents, are the packed rows' loss and gradients."""
    net = tiny_model(name)
    fast_net = with_flex(net)
    segments = batch["segments"]
    with torch.no_grad():
        packed = fast_net.hidden_states(batch["idx"], pos_ids=segment_positions(segments),
                                        mask=fast.packed_mask(fast_net, segments))
    documents = [(b, segments[b] == s) for b in range(segments.size(0)) for s in segments[b].unique() if s >= 0]
    assert len(documents) >= 12
    for p in net.parameters():
        p.grad = None
    total = 0.0
    for b, where in documents:
        idx, targets = batch["idx"][b, where][None], batch["targets"][b, where][None]
        hidden = net.hidden_states(idx)  # grad on: the plain model's gradients add up over the documents
        torch.testing.assert_close(packed[b, where][None], hidden.detach(), rtol=1e-5, atol=1e-5)
        loss = chunked_cross_entropy(net.lm_head, hidden, targets)[0]
        loss.backward()
        total += loss.item()
    alone = torch.tensor(total), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    assert_same(loss_and_grads(fast_net, batch), alone, rtol=1e-4, atol=1e-5)


def test_benchmark_packs_rows_as_the_trainer_and_counts_their_real_tokens():
    """benchmarks/benchmark_finetune.py --packed: rows of documents in data.collate's format (ids 0, 1, ... in order,
    -1 only on a padded tail, no target there) that fill most of each row; and the documents' offsets its varlen
    comparison uses, against a count by hand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark_finetune.py"
    spec = importlib.util.spec_from_file_location("benchmark_finetune", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batch = bench.packed_rows(2048, 8, 100, seed=1)
    segments, targets = batch["segments"], batch["targets"]
    assert torch.equal(targets == IGNORE, segments < 0) and (batch["idx"] >= 0).all()  # inputs untouched by padding
    for row in segments:
        real = row[row >= 0]
        assert (row[len(real):] == -1).all()  # padding only at the end
        assert real[0] == 0 and ((real.diff() == 0) | (real.diff() == 1)).all()  # documents in order
    assert (segments >= 0).float().mean() > 0.9 and segments.max(1).values.float().mean() > 2
    offsets, longest = bench.document_offsets(segments)
    by_hand = []
    for b, row in enumerate(segments.tolist()):
        by_hand += [b * 2048 + i for i in range(2048) if i == 0 or row[i] != row[i - 1]]
    by_hand.append(8 * 2048)
    assert offsets.tolist() == by_hand and longest == max(b - a for a, b in zip(by_hand, by_hand[1:]))
