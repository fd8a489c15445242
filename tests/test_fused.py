"""The fast path (fast.speed_up) gives the plain path's loss and gradients: the fused LoRA matmuls (plain and 4-bit
bases, q/k/v parts, bias), the fused gated MLP and its Triton kernels, the compiled RMSNorm/RoPE/SwiGLU, checkpointing
of the first N blocks, and the fixed-shape loss that CUDA graphs replay (finetune/lora.py --cuda_graph; the graph
itself is checked on the GPU by tests/gpu/check_fused.py). Each comparison is one model sped up against the untouched
plain model (or module) with the same weights. And the fast layer's contract: the same state_dict keys, no import
cycles, a plain model without a fast module, and a fast and a plain model in one process that do not affect each
other."""

import ast
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fast
import model as model_module
from data import IGNORE, collate, load_split, make_examples, pack
from fast import fused as fast_fused
from fast.fused import FusedLoRALinear, LoRAMatmul
from fast.memory import chunked_cross_entropy, enable_activation_checkpointing
from finetune import lora as ft
from lora import (LoRAConfig, LoRALinear, inject_lora, load_adapter, lora_state_dict, qkv_parts,
                  save_adapter)
from model import GPT, Config
from tiny_data import make_samples, write_split

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(name="tiny", block_size=64, vocab_size=61, n_layer=3, n_head=4, n_query_groups=2, n_embd=32,
              intermediate_size=48)


def lora_layer(base, parts=None, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(base, r=4, alpha=8.0, parts=parts)
    nn.init.normal_(layer.lora_B, std=0.3)  # B = 0 at init would hide every mistake in B's gradient
    return layer


def grads_of(layer, x):
    """Output and gradients of `layer` (plain or sped up) for x."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), (x.grad if x.requires_grad else None), layer.lora_A.grad, layer.lora_B.grad


def fast_and_plain(layer, **settings):
    """(the layer sped up, an untouched plain copy with the same weights)."""
    plain = copy.deepcopy(layer)
    return fast.speed_up(layer, **settings), plain


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v"), ("k",)])
def test_lora_matmul_matches_generic_path(bias, targets):
    config = Config(**CONFIG)
    base = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=bias)
    layer, plain = fast_and_plain(lora_layer(base.requires_grad_(False), qkv_parts(config, targets)))
    assert isinstance(layer, FusedLoRALinear) and type(plain) is LoRALinear
    x = torch.randn(2, 7, config.n_embd, requires_grad=True)
    fused, reference = grads_of(layer, x), grads_of(plain, x)
    for a, b, name in zip(fused, reference, ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    assert fused[3].dtype == torch.float32 and fused[2].dtype == torch.float32  # master weights' grads stay fp32


def test_lora_matmul_without_input_grad_skips_dx(monkeypatch):
    layer, plain = fast_and_plain(lora_layer(nn.Linear(16, 24, bias=False).requires_grad_(False)))
    x = torch.randn(3, 16)  # like the first block's input: no gradient wanted
    calls = []
    original = fast_fused.base_weight
    monkeypatch.setattr(fast_fused, "base_weight", lambda *a: calls.append(1) or original(*a))
    fused = grads_of(layer, x)
    assert len(calls) == 1  # forward only: the backward's base matmul (and 4-bit dequantization) is skipped
    reference = grads_of(plain, x)
    assert fused[1] is None
    for a, b in zip(fused[2:], reference[2:]):
        torch.testing.assert_close(a, b)


def test_lora_matmul_on_4bit_base_matches_bitsandbytes_path():
    bnb = pytest.importorskip("bitsandbytes")
    from quantize import quantized_layer, quantized_weight

    torch.manual_seed(0)
    dense = nn.Linear(64, 96, bias=False)
    base = quantized_layer(dense, "bnb.nf4", torch.float32)
    base.weight = quantized_weight(base, dense.weight.detach(), "cpu")
    assert isinstance(base, bnb.nn.Linear4bit)
    layer, plain = fast_and_plain(lora_layer(base))
    x = torch.randn(2, 5, 64, requires_grad=True)
    fused, reference = grads_of(layer, x), grads_of(plain, x)  # plain = bitsandbytes' own 4-bit matmul
    for a, b, name in zip(fused, reference, ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


def test_swiglu_backward_matches_autograd():
    torch.manual_seed(0)
    g, u, d = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    model_module.swiglu(g, u).backward(d)
    dg, du = fast_fused.swiglu_backward(g.detach(), u.detach(), d)
    torch.testing.assert_close(dg, g.grad)
    torch.testing.assert_close(du, u.grad)


@pytest.mark.parametrize("quantized", [False, True])
def test_swiglu_down_projection_matches_generic_path(quantized):
    """The down projection that recomputes swiglu(gate, up) instead of saving it: same output and gradients."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    base = dense.requires_grad_(False)
    if quantized:
        pytest.importorskip("bitsandbytes")
        from quantize import quantized_layer, quantized_weight

        base = quantized_layer(dense, "bnb.nf4", torch.float32)
        base.weight = quantized_weight(base, dense.weight.detach(), "cpu")
    layer, plain = fast_and_plain(lora_layer(base))
    g0, u0 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    results = []
    for m in (layer, plain):
        m.zero_grad(set_to_none=True)
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        y = m.swiglu_forward(g, u) if m is layer else m(model_module.swiglu(g, u))
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((y.detach(), g.grad, u.grad, m.lora_A.grad, m.lora_B.grad))
    for a, b, name in zip(*results, ("y", "d gate", "d up", "dA", "dB")):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


def gated_mlp(quantized=False, bias=False, dtype=torch.float32):
    """(model.MLP with LoRA on gate, up and down, each with its own rank and alpha (a mixed-up scaling shows), the
    RMSNorm before it), plain."""
    c = Config(**{**CONFIG, "bias": bias})
    torch.manual_seed(0)
    mlp = model_module.MLP(c).to(dtype)
    for name, r, alpha in (("fc_1", 4, 8.0), ("fc_2", 6, 3.0), ("proj", 3, 5.0)):
        base = getattr(mlp, name).requires_grad_(False)
        if quantized:
            pytest.importorskip("bitsandbytes")
            from quantize import quantized_layer, quantized_weight

            dense = base
            base = quantized_layer(dense, "bnb.nf4", dtype)
            base.weight = quantized_weight(base, dense.weight.detach(), "cpu")
            base.bias = dense.bias
        layer = LoRALinear(base, r=r, alpha=alpha)
        nn.init.normal_(layer.lora_B, std=0.3)
        setattr(mlp, name, layer)
    return mlp, model_module.RMSNorm(c.n_embd, eps=1e-5).to(dtype)


def fast_mlp(mlp, norm, **settings):
    """A sped-up copy of the MLP and its norm (the originals stay plain)."""
    mlp, norm = copy.deepcopy(mlp), copy.deepcopy(norm)
    return fast.speed_up(mlp, **settings), fast.speed_up(norm, **settings)


def run_mlp(mlp, norm, x0):
    """(output, input gradient, the six adapter gradients) and whether lora_gated_mlp ran."""
    calls, original = [], fast_fused.SwiGLULoRADown.apply
    fast_fused.SwiGLULoRADown.apply = lambda *args: calls.append(1) or original(*args)
    try:
        mlp.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = mlp(norm(x))
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    finally:
        fast_fused.SwiGLULoRADown.apply = original
    layers = (mlp.fc_1, mlp.fc_2, mlp.proj)
    return (y.detach(), x.grad, *(p.grad for m in layers for p in (m.lora_A, m.lora_B))), bool(calls)


GRAD_NAMES = ("y", "dx", "gate dA", "gate dB", "up dA", "up dB", "down dA", "down dB")


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_matches_generic_path(quantized, recompute, bias):
    """lora_gated_mlp (gate, up, SwiGLU and down with the adapters added inside the SwiGLU kernels) against the plain
    MLP: same output and gradients for the input and all six adapter matrices, with the MLP's input an RMSNorm
    output (recomputed from the norm's input unless recompute=False)."""
    mlp, norm = gated_mlp(quantized, bias)
    x0 = torch.randn(2, 7, mlp.fc_1.in_features)
    fused, took = run_mlp(*fast_mlp(mlp, norm, recompute_inputs=recompute), x0)
    plain, took_plain = run_mlp(mlp, norm, x0)
    assert took and not took_plain
    for a, b, name in zip(fused, plain, GRAD_NAMES):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fp8_mode", ["grad", "all"])
def test_gated_mlp_in_fp8_matches_the_unfused_mlp(fp8_mode):
    """With FP8 base matmuls (emulated on the CPU) lora_gated_mlp gives what the three separate fused LoRA matmuls
    give, within bf16 rounding: the same FP8 matmuls, the adapters added in another place."""
    mlp, norm = gated_mlp(dtype=torch.bfloat16)
    x0 = torch.randn(2, 7, mlp.fc_1.in_features, dtype=torch.bfloat16)
    fused, took = run_mlp(*fast_mlp(mlp, norm, fp8=fp8_mode), x0)
    unfused, took_unfused = run_mlp(*fast_mlp(mlp, norm, fp8=fp8_mode, fused_mlp=False), x0)
    assert took and not took_unfused
    for a, b, name in zip(fused, unfused, GRAD_NAMES):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, (name, err)


def test_gated_mlp_is_refused_where_it_does_not_apply():
    mlp, norm = fast_mlp(*gated_mlp())
    x0 = torch.randn(2, 7, mlp.fc_1.in_features)
    assert run_mlp(mlp, norm, x0)[1]
    mlp.fc_2.dropout = nn.Dropout(0.1)  # dropout takes the generic path
    assert not run_mlp(mlp, norm, x0)[1]
    mlp.fc_2.dropout = nn.Identity()
    mlp.fc_1.merge()
    assert not run_mlp(mlp, norm, x0)[1]
    mlp.fc_1.unmerge()
    calls, original = [], fast_fused.SwiGLULoRADown.apply
    fast_fused.SwiGLULoRADown.apply = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad():  # inference keeps the base layers' own kernels
            mlp(norm(x0))
        c = Config(**CONFIG)
        model = GPT(c)
        inject_lora(model, LoRAConfig(r=4, targets=("down",)))  # no adapters on gate and up
        fast.speed_up(model)(torch.randint(0, c.vocab_size, (1, 8))).sum().backward()
    finally:
        fast_fused.SwiGLULoRADown.apply = original
    assert calls == [] and model.blocks[0].mlp.proj.lora_A.grad is not None


def test_swiglu_lora_triton_kernels_match_the_plain_math():
    """fast/kernels.py's Triton SwiGLU kernels, run by Triton's CPU interpreter (a fresh process: the interpreter must
    be on before triton is imported), against the plain PyTorch versions."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", "import test_fused; test_fused.check_swiglu_lora_kernels()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def check_swiglu_lora_kernels():
    """Partial tiles in both directions, a rank (12) that the kernels pad to 16, a down-projection rank of its own;
    with and without the SwiGLU product written over d. In fp16: Triton 3.5's interpreter rounds to bf16 by
    truncation (the GPU rounds to nearest; tests/gpu/check_fused.py compares bf16 there). Each value within two
    fp16 steps (the plain forward rounds silu(gate) before multiplying, the kernel does not); the gradients, computed
    in fp32 by both, nearly all equal."""
    forward, backward = fast_fused.triton_kernels()
    gen = torch.Generator().manual_seed(0)
    M, N, r, r2 = 70, 200, 12, 8

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(torch.float16)

    g, u, d, h_g, h_u, dh = rand(M, N), rand(M, N), rand(M, N), rand(M, r), rand(M, r), rand(M, r2)
    B_g, B_u, A = rand(N, r, std=0.3), rand(N, r, std=0.3), rand(r2, N, std=0.3)
    args = (g, u, h_g, B_g, 0.5, h_u, B_u, 2.0)

    def close(got, want, name, equal=0.0):
        got, want = got.float(), want.float()
        steps = want.abs().clamp_min(1e-2) / 512
        assert got.shape == want.shape and bool(((got - want).abs() <= steps).all()), name
        assert (got == want).float().mean() >= equal, name

    close(forward(*args), fast_fused.swiglu_lora(*args), "forward")
    expected = fast_fused.swiglu_lora_backward(*args, d, dh, A, True)
    d_over = d.clone()
    got = backward(*args, d_over, dh, A, True)
    assert got[2].data_ptr() == d_over.data_ptr()  # the product went over d: no extra (M, N) tensor
    for a, b, name in zip(got, expected, ("d gate", "d up", "act")):
        close(a, b, name, equal=0.99 if name != "act" else 0.0)
    d_kept = d.clone()
    got = backward(*args, d_kept, dh, A, False)
    assert got[2] is None and torch.equal(d_kept, d)
    close(got[0], expected[0], "d gate without act", equal=0.99)
    with pytest.raises(ValueError, match="scalings other than 0"):  # what kernels_take refuses, the kernels refuse
        forward(g, u, h_g, B_g, 0.0, h_u, B_u, 2.0)


def test_self_check_finds_a_wrong_swiglu_kernel_and_the_plain_one_is_kept(monkeypatch, capsys):
    """A forward kernel that drops the up projection's adapter is refused with a warning, and so are kernels that
    fail to run; kernels that agree are taken."""
    def bad_forward(g, u, h_g, B_g, s_g, h_u, B_u, s_u):
        return fast_fused.swiglu_lora(g, u, h_g, B_g, s_g, h_u, B_u, 0.0)

    def good_forward(*args):
        return fast_fused.swiglu_lora(*args)

    plain = (fast_fused.swiglu_lora, fast_fused.swiglu_lora_backward)
    assert fast_fused.self_check(*plain, device="cpu") == 0
    assert fast_fused.self_check(bad_forward, plain[1], device="cpu") > 0.1
    real_check = fast_fused.self_check
    monkeypatch.setattr(fast_fused, "self_check", lambda f, b, rank: real_check(f, b, device="cpu", rank=rank))
    monkeypatch.setattr(fast_fused, "triton_kernels", lambda: (bad_forward, plain[1]))
    kernels = fast_fused.choose_kernels(True, on_gpu=True, rank=16)  # as on a GPU
    assert not kernels.triton_mlp and kernels.swiglu_lora.func is fast_fused.swiglu_lora
    assert "Triton SwiGLU kernels differ from the PyTorch versions" in capsys.readouterr().err
    monkeypatch.setattr(fast_fused, "triton_kernels", lambda: 1 / 0)  # e.g. no Triton for this GPU
    assert fast_fused.checked_triton_kernels(rank=16) is None
    assert "did not run on this GPU (ZeroDivisionError" in capsys.readouterr().err
    monkeypatch.setattr(fast_fused, "triton_kernels", lambda: (good_forward, plain[1]))
    kernels = fast_fused.choose_kernels(True, on_gpu=True, rank=16)
    assert kernels.triton_mlp and kernels.swiglu_lora is good_forward and not capsys.readouterr().err


def test_fused_path_is_taken_only_when_it_applies():
    calls = []
    original = LoRAMatmul.apply

    def spy(*args):
        calls.append(1)
        return original(*args)

    layer, plain = fast_and_plain(lora_layer(nn.Linear(8, 8)))
    LoRAMatmul.apply = spy
    try:
        plain(torch.randn(2, 8))
        assert calls == []  # a layer that was never sped up is the plain reference
        layer(torch.randn(2, 8))
        assert len(calls) == 1
        with torch.no_grad():  # inference keeps the base layer's own kernel (bnb's 4-bit matrix-vector product)
            layer(torch.randn(2, 8))
        layer.dropout = nn.Dropout(0.1)
        layer(torch.randn(2, 8))
        assert len(calls) == 1
    finally:
        LoRAMatmul.apply = original


@pytest.fixture(scope="module")
def backend():
    """inductor (what the GPU runs, C++ on CPU) where this machine can build it; else aot_eager, which still traces
    the same forward/backward graphs, so the test runs everywhere instead of being skipped."""
    try:
        torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.ones(3))
        return "inductor"
    except Exception as e:  # no C++ compiler or Python headers
        print(f"inductor unavailable here ({type(e).__name__}); comparing through aot_eager")
        return "aot_eager"


def fast_model(net, backend=None, **settings):
    """fast.speed_up(net, **settings) with the compiled kernels through `backend` (None: the plain kernels). speed_up
    itself compiles with inductor; another backend goes through the same conversion with kernels compiled by it."""
    if backend in (None, "inductor"):
        return fast.speed_up(net, kernels=backend is not None, **settings)
    kernels = fast_fused.choose_kernels(True, on_gpu=False, backend=backend)
    return fast_fused.convert(net, kernels, settings.get("fp8"), settings.get("recompute_inputs", True),
                             settings.get("fused_mlp", True))


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = GPT(Config(**CONFIG))
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model.to(dtype).train() if dtype != torch.float32 else model.train()


def loss_and_grads(model, batch, select_targets=True):
    for p in model.parameters():
        p.grad = None
    loss, _ = ft.training_loss(model, batch, select_targets=select_targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def packed_batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused") / "s.safetensors"
    write_split(path, make_samples(16, CONFIG["vocab_size"], seed=3))
    ex = make_examples(load_split(path), max_seq_length=64)
    rows = pack(ex.lengths.tolist(), 48)
    return ex, rows


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], msg=lambda m: f"{name}: {m}", **tol)


def test_compiled_elementwise_same_loss_and_grads(packed_batch, backend):
    ex, rows = packed_batch
    batch = collate(ex, rows[:2], packed=True, device="cpu")
    plain = loss_and_grads(tiny_model(), batch)
    eager = fast_model(tiny_model())
    assert eager.blocks[0].norm_1.kernels.rms_norm is model_module.rms_norm
    fast_eager = loss_and_grads(eager, batch)
    compiled = fast_model(tiny_model(), backend)
    assert compiled.blocks[0].norm_1.kernels.rms_norm is not model_module.rms_norm
    fused = loss_and_grads(compiled, batch)
    assert_same(plain, fast_eager, rtol=1e-4, atol=5e-5)  # fp32, summed in another order
    assert_same(fast_eager, fused, rtol=1e-4, atol=5e-5)


def test_checkpointing_first_blocks_same_loss_and_grads(packed_batch):
    ex, rows = packed_batch
    batch = collate(ex, rows[:2], packed=True, device="cpu")
    reference = loss_and_grads(tiny_model(), batch)
    model = tiny_model()
    enable_activation_checkpointing(model, 2, preserve_rng_state=False)
    assert [("forward" in b.__dict__) for b in model.blocks] == [True, True, False]
    assert_same(reference, loss_and_grads(model, batch))


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_keeps_block_inputs_only_when_not_offloaded(packed_batch, offload):
    """Plain checkpointing keeps every block's input on the device; offloaded, each is let go once the next block has
    parked its own (the last one stays: its recompute comes first), and the recompute gets it back from the copy,
    with the same loss and gradients."""
    import weakref

    ex, rows = packed_batch
    batch = collate(ex, rows[:2], packed=True, device="cpu")
    reference = loss_and_grads(tiny_model(), batch)
    model = tiny_model()
    enable_activation_checkpointing(model, preserve_rng_state=False, offload=offload)
    inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    for p in model.parameters():
        p.grad = None
    loss, _ = ft.training_loss(model, batch)
    alive = [ref() is not None for ref in inputs]
    assert alive == ([False, False, True] if offload else [True, True, True])
    loss.backward()
    assert_same(reference, (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))


def test_offloaded_checkpointing_refuses_a_second_forward_before_the_backward(packed_batch):
    """One parked input per block: the second pass overwrites the first's, so the first's backward must fail loudly
    instead of recomputing from the wrong input."""
    ex, rows = packed_batch
    model = tiny_model()
    enable_activation_checkpointing(model, preserve_rng_state=False, offload=True)
    first, _ = ft.training_loss(model, collate(ex, rows[:2], packed=True, device="cpu"))
    ft.training_loss(model, collate(ex, rows[2:4], packed=True, device="cpu"))
    with pytest.raises(RuntimeError, match="a second forward pass ran before the first one's backward"):
        first.backward()


def test_norm_output_changed_in_place_is_kept_not_recomputed():
    """LoRAMatmul recomputes an RMSNorm's output from the norm's input only while both are as the norm left them;
    after an in-place change of either it keeps what it was given, so gradients stay right."""
    torch.manual_seed(0)
    norm = model_module.RMSNorm(16, eps=1e-5).requires_grad_(False)  # frozen, as in LoRA: its backward keeps nothing
    fast.speed_up(norm)
    layer, plain = fast_and_plain(lora_layer(nn.Linear(16, 24, bias=False).requires_grad_(False)))
    x = torch.randn(3, 16)
    grads = []
    for change in (None, "output", "input"):
        layer.zero_grad(set_to_none=True)
        source = x.clone()
        y = norm(source)
        if change == "output":
            y.mul_(2)
        elif change == "input":
            with torch.no_grad():
                source.add_(1)  # after the norm ran: a recompute from it now would give another y
        (layer(y).float() * torch.linspace(-1, 1, 24)).sum().backward()  # y itself, tag and all
        fused = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
        _, _, dA, dB = grads_of(plain, y)  # the plain layer on a plain copy of y
        torch.testing.assert_close(fused[0], dA, msg=lambda m: f"{change}: {m}")
        torch.testing.assert_close(fused[1], dB, msg=lambda m: f"{change}: {m}")
        grads.append(fused[0])
    assert not torch.equal(grads[0], grads[1])  # the in-place change mattered, and was followed


def test_fixed_shape_batch_and_loss_equal_the_selected_ones(packed_batch):
    ex, rows = packed_batch
    plain = collate(ex, rows[:2], packed=True, device="cpu")
    fixed = collate(ex, rows[:2], packed=True, device="cpu", fixed_length=64, fixed_rows=3)  # a short last batch
    assert fixed["idx"].shape == (3, 64) and "segments" in fixed and plain["idx"].shape[1] < 64
    assert (fixed["targets"][2] == IGNORE).all() and fixed["n_tokens"] == plain["n_tokens"]
    model = tiny_model()
    loss, n = ft.training_loss(model, plain)
    loss_fixed, n_fixed = ft.training_loss(model, fixed, select_targets=False)
    assert n_fixed is None and n == int((fixed["targets"] != IGNORE).sum())
    torch.testing.assert_close(loss, loss_fixed)
    assert_same(loss_and_grads(model, plain), loss_and_grads(model, fixed, select_targets=False))


def test_fused_paths_in_bf16_stay_within_bf16_tolerance(packed_batch, backend):
    """The whole fast path at once, in bf16 as on the GPU, against the plain fp32 model."""
    ex, rows = packed_batch
    batch = collate(ex, rows[:2], packed=True, device="cpu", fixed_length=64)
    reference = loss_and_grads(tiny_model(), batch)  # the plain model in fp32
    model = tiny_model(dtype=torch.bfloat16)
    for layer in model.modules():  # LoRA master weights stay fp32, as in training
        if isinstance(layer, LoRALinear):
            layer.float().base.to(torch.bfloat16)
    fast_model(model, backend)
    enable_activation_checkpointing(model, 1, preserve_rng_state=False)  # after speed_up: it wraps the fast forward
    fused = loss_and_grads(model, batch, select_targets=False)
    torch.testing.assert_close(fused[0], reference[0], rtol=2e-2, atol=0)
    for name, g in reference[1].items():
        err = (fused[1][name].float() - g).norm() / g.norm()
        assert err < 0.05, f"{name}: relative gradient error {err:.3f}"


def test_chunked_loss_recomputes_a_random_lora_head_with_the_same_dropout_mask():
    """The loss chunks are checkpointed; a LoRA head with dropout must draw the same mask again when recomputed."""
    torch.manual_seed(0)
    head = lora_layer(nn.Linear(16, 40, bias=False).requires_grad_(False))
    head.dropout = nn.Dropout(0.5)
    hidden, targets = torch.randn(2, 9, 16), torch.randint(0, 40, (2, 9))
    grads = []
    for chunked in (True, False):
        head.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        if chunked:
            loss, _ = chunked_cross_entropy(head, hidden, targets, chunk_bytes=1)  # several chunks
        else:
            loss = torch.nn.functional.cross_entropy(head(hidden.reshape(-1, 16)).float(), targets.reshape(-1),
                                                     reduction="sum")
        loss.backward()
        grads.append((loss.detach(), head.lora_A.grad.clone(), head.lora_B.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def saved_bytes_per_token_and_block(model, idx) -> float:
    """What autograd keeps for the backward pass of the blocks: distinct storages of activations, (batch, ...) or
    (tokens, ...) tensors as big as v or bigger; LoRA's x A^T (no wider than a lora_A has rows), its A, B copies and
    small statistics are left out."""
    c = model.config
    floor = idx.numel() * c.n_query_groups * c.head_size * 2  # the smallest activation kept: v, in bf16
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    lora_width = max(p.shape[0] for name, p in model.named_parameters() if name.endswith("lora_A"))
    kept, alive = {}, []

    def pack(t):
        s = t.untyped_storage()
        wide = t.dim() >= 3 or (t.dim() == 2 and t.shape[-1] > lora_width)
        if wide and s.data_ptr() not in params and s.nbytes() >= floor:
            kept[s.data_ptr()] = s.nbytes()
            alive.append(t)  # so that no later tensor reuses its address and goes uncounted
        return t

    x = model.wte(idx).detach()
    cos, sin = (t.to(x.dtype) for t in model_module.rope(torch.arange(idx.size(1)), c.rope_n_elem, c.rope_base))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for block in model.blocks:
            x = block(x, cos, sin, None, None)
    return sum(kept.values()) / idx.numel() / c.n_layer


def test_fused_block_keeps_only_what_its_backward_needs(backend):
    """Per token and block the fast path keeps the block input and the attention residual (the norms' inputs), q, k
    and v after RoPE, the attention output and the MLP's gate and up: no norm output (LoRAMatmul recomputes it) and
    no q|k|v projection output (v is copied out of it). The plain path keeps more; a change that brings a kept copy
    back fails here before it costs gigabytes on the GPU."""
    c = Config(**CONFIG)
    model = tiny_model(dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    idx = torch.randint(0, c.vocab_size, (2, 24))
    plain = saved_bytes_per_token_and_block(model, idx)
    fused = saved_bytes_per_token_and_block(fast_model(model, backend), idx)
    kv = c.n_query_groups * c.head_size
    assert fused == 2 * (4 * c.n_embd + 2 * kv + 2 * c.intermediate_size)
    assert plain > fused + 2 * (2 * c.n_embd)


def test_keeping_inputs_gives_the_same_grads_and_keeps_the_norm_outputs_and_swiglu_product(packed_batch, backend):
    """speed_up(recompute_inputs=False) (finetune/lora.py --recompute_inputs false) keeps both norm outputs and the
    SwiGLU product instead of recomputing them in the backward pass: the same loss and gradients, and exactly those
    three tensors more per token and block."""
    c = Config(**CONFIG)
    ex, rows = packed_batch
    batch = collate(ex, rows[:2], packed=True, device="cpu")
    model = tiny_model(dtype=torch.bfloat16)  # bf16, as trained: a recomputed norm must round like the kept one
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    idx = torch.randint(0, c.vocab_size, (2, 24))
    fast_model(model, backend)
    recomputed, lean = loss_and_grads(model, batch), saved_bytes_per_token_and_block(model, idx)
    fast_model(model, backend, recompute_inputs=False)  # speed_up again: new settings for the same model
    assert not model.blocks[0].attn.qkv.recompute
    kept, keeping = loss_and_grads(model, batch), saved_bytes_per_token_and_block(model, idx)
    assert_same(recomputed, kept, rtol=0, atol=0)
    # In the first block, whose input needs no gradient, the kept norm_1 output replaces the block input rather than
    # adding to it: nothing else there keeps that input.
    expected = lean + 2 * (2 * c.n_embd + c.intermediate_size) - 2 * c.n_embd / c.n_layer
    assert keeping == pytest.approx(expected)


def test_compiled_norms_round_like_eager_so_a_recomputed_norm_equals_the_forward(backend):
    """FastBlock fuses the residual add into norm_2 (add_forward); LoRAMatmul's backward recomputes the norm from
    the stored sum with the plain rms_norm kernel. Compiled, both must round where eager does, or the recomputed input
    differs from the forward's (what an H100 showed before they did). The forward runs as in training (inputs that
    need gradients, so the compiled training graph); the recompute without gradients, as in the backward pass."""
    if backend != "inductor":
        pytest.skip("no inductor here: the other backends run the plain functions, which round like eager anyway")
    torch.manual_seed(0)
    norm = model_module.RMSNorm(256, 1e-5).to(torch.bfloat16)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    x, h = torch.randn(2, 32, 256, dtype=torch.bfloat16), torch.randn(2, 32, 256, dtype=torch.bfloat16)
    eager_sum, eager_y = fast_fused.add_rms_norm(x, h, norm.weight, norm.eps)
    patch = {"emulate_precision_casts_on_saved_tensors": False}  # torch >= 2.13 only: behave like older inductors
    patch = {k: v for k, v in patch.items() if hasattr(torch._inductor.config, k)}
    fast_model(norm, backend)
    with torch._inductor.config.patch(patch):
        s, y = norm.add_forward(x.requires_grad_(), h.requires_grad_())
        with torch.no_grad():
            recomputed = norm.forward(s.detach())
    assert torch.equal(s.detach(), eager_sum)
    assert torch.equal(y.detach(), eager_y)
    assert torch.equal(recomputed, y.detach())


class _OneProcess:
    """What validate_and_log asks of Fabric, for one CPU process."""
    device, global_rank, world_size = torch.device("cpu"), 0, 1

    def all_reduce(self, t, reduce_op):
        return t

    def print(self, *args, **kwargs):
        pass

    def log_dict(self, *args, **kwargs):
        pass

    def barrier(self):
        pass


def test_validation_runs_the_compiled_kernels_eagerly(packed_batch):
    """Validation batches vary in length; if they went through the compiled norm/RoPE/SwiGLU, those would recompile
    for dynamic shapes before the first training step compiles. validate_and_log must compile nothing."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    ex, _ = packed_batch
    assert len(set(ex.lengths.tolist())) > 1
    model = fast_model(tiny_model(), "aot_eager")
    a = SimpleNamespace(out_dir="unused", train=SimpleNamespace(micro_batch_size=2), eval=SimpleNamespace(sample_tokens=0))
    state = {"step": 0, "history": {"val": []}, "best_val": float("inf")}
    torch._dynamo.reset()
    counters.clear()
    ft.validate_and_log(_OneProcess(), model, model, ex, a, state, None)
    compiled_in_validation = counters["stats"]["unique_graphs"]
    ft.training_loss(model, collate(ex, [[0]], packed=True, device="cpu"))[0].backward()
    assert state["history"]["val"] and math.isfinite(state["history"]["val"][0][1])
    assert compiled_in_validation == 0
    assert counters["stats"]["unique_graphs"] > 0  # the training step does compile: the counter can see it


# ---------------------------------------------------------------------------------------------------------------------
# The fast layer's contract

FAST_CLASSES = tuple(fast_fused.FAST_CLASS.values())


def test_speed_up_keeps_parameters_state_dict_keys_and_adapters(tmp_path):
    """Only classes change: the same parameter objects under the same names, and an adapter saved from a fast model
    loads into a plain one (and back) with the same outputs."""
    model = tiny_model()
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    fast.speed_up(model, fp8="grad", recompute_inputs=False, fused_mlp=False)
    assert list(model.state_dict()) == keys
    assert {n: p for n, p in model.named_parameters()} == params  # the very same tensors
    assert any(isinstance(m, FAST_CLASSES) for m in model.modules())
    save_adapter(model, tmp_path / "adapter.safetensors")
    plain = GPT(Config(**CONFIG))
    plain.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    load_adapter(plain, tmp_path / "adapter.safetensors")
    assert lora_state_dict(plain).keys() == lora_state_dict(model).keys()
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(idx), model.eval()(idx))
    fresh = fast.speed_up(GPT(Config(**CONFIG)))
    fresh.load_state_dict(plain.state_dict(), strict=False)
    load_adapter(fresh, tmp_path / "adapter.safetensors")  # into a fast model: injected plain, then loaded
    assert set(fresh.state_dict()) == set(model.state_dict())


def test_a_model_that_never_calls_speed_up_has_no_fast_module():
    model = tiny_model()
    other = fast.speed_up(tiny_model(), kernels=True)  # another model in the same process
    assert not any(isinstance(m, FAST_CLASSES) for m in model.modules())
    assert all(type(m) in (model_module.Block, model_module.RMSNorm, LoRALinear) for m in model.modules()
               if isinstance(m, (model_module.Block, model_module.RMSNorm, LoRALinear)))
    assert all(isinstance(m, FAST_CLASSES) for m in other.modules()
               if isinstance(m, (model_module.Block, model_module.RMSNorm, LoRALinear)))
    for cls in (LoRALinear, model_module.MLP, model_module.RMSNorm, model_module.Block):  # nothing class-wide
        assert not {"fused_matmul", "fp8_matmul", "fused_mlp", "recompute_inputs", "kernels"} & set(vars(cls))


def test_a_fast_and_a_plain_model_in_one_process_do_not_affect_each_other(packed_batch, monkeypatch):
    """One model in FP8 with kept inputs and compiled kernels, one plain: the plain one's loss and gradients are
    bit for bit what they were before the other existed and ran, and it never enters a fused function; the fast one
    keeps its own settings. (Class-wide switches could not do this.)"""
    ex, rows = packed_batch
    batch = collate(ex, rows[:2], packed=True, device="cpu")
    plain = tiny_model(dtype=torch.bfloat16)
    before = loss_and_grads(plain, batch)
    twin = tiny_model(dtype=torch.bfloat16)
    quick = fast.speed_up(tiny_model(dtype=torch.bfloat16), fp8="all", recompute_inputs=False, kernels=True)
    calls = []
    for name in ("LoRAMatmul", "LoRAGateUp", "SwiGLULoRADown", "SwiGLULoRAMatmul"):
        function = getattr(fast_fused, name)
        monkeypatch.setattr(function, "apply", lambda *a, _f=function.apply: calls.append(1) or _f(*a))
    fp8_calls = []
    monkeypatch.setattr(fast_fused.fp8, "linear", lambda *a, _f=fast_fused.fp8.linear: fp8_calls.append(1) or _f(*a))
    quick_result = loss_and_grads(quick, batch)
    assert calls and fp8_calls
    calls.clear(), fp8_calls.clear()
    after = loss_and_grads(plain, batch)
    assert calls == [] and fp8_calls == []
    assert_same(before, after, rtol=0, atol=0)
    assert not torch.equal(quick_result[0], before[0])  # FP8 forward matmuls moved the fast model's loss
    layer = quick.blocks[0].attn.qkv
    assert (layer.fp8_mode, layer.recompute) == ("all", False)
    assert_same(loss_and_grads(twin, batch), before, rtol=0, atol=0)  # a model built after the fast one: plain too


def project_imports():
    """{module: the project modules it imports, anywhere in the file (also inside functions)} for the project's own
    code (not tests/): `from fast import fused` imports fast.fused."""
    folders = [ROOT, *(ROOT / d for d in ("fast", "finetune", "generate", "scripts", "benchmarks", "prepare_data"))]
    files = {}
    for folder in folders:
        for path in folder.glob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                               for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycles():
    graph = project_imports()
    assert {"fast", "fast.fused", "fast.fp8", "fast.kernels", "lora", "model", "quantize", "utils"} <= set(graph)
    assert "lora" not in graph["fast.kernels"] and "fast.fused" not in graph["fast.kernels"]
    assert not {"fast.fp8", "fast.kernels", "fast.fused"} & (graph["lora"] | graph["model"])  # the plain core
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                walk(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
