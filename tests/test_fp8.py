"""FP8 base matmuls (fast/fp8.py, fast.speed_up(model, fp8=...), finetune/lora.py --fp8): the 4-bit decode equals
bitsandbytes' dequantization rounded to float8, the fused LoRA layer computes exactly the FP8-rounded math in forward
and backward, and a model's loss and gradients stay near the bf16 fast path's. On a CPU torch._scaled_mm computes the same math as on the GPU
(tests/gpu/check_fused.py compares the GPU's kernels)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fast
from fast import fp8
from lora import LoRAConfig, LoRALinear, inject_lora
from model import GPT, Config

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized(out_features, in_features, mode, bias=False, seed=0):
    pytest.importorskip("bitsandbytes")
    from quantize import quantized_layer, quantized_weight

    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    base = quantized_layer(dense, mode, torch.bfloat16)
    base.weight = quantized_weight(base, dense.weight.detach().to(torch.bfloat16), "cpu")
    if bias:
        base.bias = nn.Parameter(dense.bias.detach().to(torch.bfloat16), requires_grad=False)
    return base


def dequantized_fp32(base):
    """bitsandbytes' own dequantization of a 4-bit weight, in fp32 (no bf16 rounding in between)."""
    import bitsandbytes.functional as BF

    state = copy.copy(base.weight.quant_state)
    state.dtype = torch.float32
    return BF.dequantize_4bit(base.weight.data, state)


def e4m3(t, scale):
    """t rounded through float8 e4m3 at `scale`, back in fp32."""
    return (t.float() / scale).to(fp8.E4M3).float() * scale


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4"])
@pytest.mark.parametrize("transpose", [False, True])
def test_decode_equals_bitsandbytes_dequantization_rounded_to_fp8(mode, transpose):
    base = quantized(80, 192, mode)
    reference = dequantized_fp32(base)
    w8, scale = fp8.weight_fp8(base, transpose)
    assert w8.dtype == fp8.E4M3 and w8.is_contiguous() and scale.numel() == 1
    assert torch.equal(scale, reference.abs().amax() / fp8.E4M3_MAX)  # the largest weight maps to e4m3's largest value
    expected = (reference / scale).to(fp8.E4M3)
    assert torch.equal(w8.float(), (expected.t() if transpose else expected).float())  # (fp4 has a -0 code: as floats)


def test_cast_rows_scales_each_row_by_its_own_maximum():
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    x[1] *= 1000  # one loud token must not flush the others to zero
    x[3] = 0  # an all-zero row stays zero (no 0/0)
    x8, scale = fp8.cast_rows(x)
    assert scale.shape == (5, 1)
    back = x8.float() * scale
    assert torch.equal(back[3], torch.zeros(32))
    for row in (0, 1, 2, 4):
        assert back[row].abs().max() == x[row].float().abs().max()  # each row's maximum is exact (maps to 448)
        assert ((back[row] - x[row].float()).abs() <= x[row].float().abs() / 16 + 1e-30).all()  # 3 mantissa bits


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", None])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fp8_mode", ["all", "grad"])
def test_fp8_lora_layer_computes_the_fp8_rounded_math(mode, bias, fp8_mode):
    """Forward, input gradient and adapter gradients of the fused layer in FP8 against the same math written out with
    explicit e4m3 rounding in fp32 (weights per tensor, activations and output gradients per row). With "grad" only
    the input gradient is rounded; the forward pass is the bf16 path's."""
    base = quantized(96, 64, mode, bias) if mode else nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    base.requires_grad_(False)
    torch.manual_seed(1)
    layer = LoRALinear(base, r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B, std=0.3)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.linspace(-1, 1, 96)
    fast.speed_up(layer, fp8=fp8_mode)
    assert layer.fp8_mode == fp8_mode
    y = layer(x)
    (y.float() * weights).sum().backward()

    W = dequantized_fp32(base) if mode else base.weight.float()
    w_scale = W.abs().amax() / fp8.E4M3_MAX
    x2 = x.detach().reshape(-1, 64).float()
    x_scale = x2.abs().amax(1, keepdim=True) / fp8.E4M3_MAX
    A, B = layer.lora_A.detach().to(torch.bfloat16).float(), layer.lora_B.detach().to(torch.bfloat16).float()
    y_exact = x2 @ W.t() + layer.scaling * (x2 @ A.t()) @ B.t() + (base.bias.float() if bias else 0)
    y_ref = e4m3(x2, x_scale) @ e4m3(W, w_scale).t() + layer.scaling * (x2 @ A.t()) @ B.t()
    if bias:
        y_ref += base.bias.float()
    y = y.detach().reshape(-1, 96).float()
    torch.testing.assert_close(y, y_ref if fp8_mode == "all" else y_exact, rtol=2e-2, atol=2e-2)
    # and the forward pass really is (or is not) FP8: nearer the e4m3 math than the unrounded math, or the reverse
    near, far = (y_ref, y_exact) if fp8_mode == "all" else (y_exact, y_ref)
    assert (y - near).norm() < (y - far).norm() / 3

    dy = weights.to(torch.bfloat16).float().expand(10, 96)
    dy_scale = dy.abs().amax(1, keepdim=True) / fp8.E4M3_MAX
    dx_ref = e4m3(dy, dy_scale) @ e4m3(W, w_scale) + layer.scaling * (dy @ B) @ A
    dx = x.grad.reshape(-1, 64).float()
    torch.testing.assert_close(dx, dx_ref, rtol=2e-2, atol=2e-2)
    dx_exact = dy @ W + layer.scaling * (dy @ B) @ A
    assert (dx - dx_ref).norm() < (dx - dx_exact).norm() / 3  # the input gradient is FP8 in both modes
    dA_ref = layer.scaling * (dy @ B).t() @ x2  # the adapters' own matmuls stay bf16
    torch.testing.assert_close(layer.lora_A.grad, dA_ref, rtol=2e-2, atol=2e-2)


def test_odd_shapes_keep_bf16():
    layer = fast.speed_up(LoRALinear(nn.Linear(24, 40), r=2, alpha=2.0), fp8="all")
    assert layer.fp8_matmuls == "all" and layer.fp8_mode is None and "multiple of 16" in fp8.supported(layer.base)


@pytest.mark.parametrize("fp8_mode", ["all", "grad"])
def test_fp8_model_loss_and_grads_near_bf16_path(fp8_mode):
    """A tiny NF4 GQA model with LoRA on every linear: FP8 base matmuls move the loss by well under 1% (not at all
    with "grad") and the LoRA gradients by a few percent (e4m3 rounding), not more."""
    pytest.importorskip("bitsandbytes")
    from quantize import empty_quantized_model, quantize_model

    config = Config(name="tiny-fp8", block_size=64, vocab_size=96, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
                    intermediate_size=128)
    torch.manual_seed(0)
    dense = GPT(config).to(torch.bfloat16)
    model = empty_quantized_model(config, "bnb.nf4-dq", torch.bfloat16)
    quantize_model(model, dense.state_dict().items(), "bnb.nf4-dq", "cpu", torch.bfloat16)
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    idx = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))

    def run(mode):
        fast.speed_up(model, fp8=mode)  # again for each mode: new settings for the same model
        model.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        return loss.item(), [p.grad.float().clone() for p in model.parameters() if p.requires_grad]

    (loss_bf16, g_bf16), (loss_fp8, g_fp8) = run(None), run(fp8_mode)
    if fp8_mode == "grad":
        assert loss_fp8 == loss_bf16 and any(not torch.equal(a, b) for a, b in zip(g_fp8, g_bf16))
    else:
        assert loss_fp8 != loss_bf16 and abs(loss_fp8 - loss_bf16) / loss_bf16 < 5e-3
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(g_fp8, g_bf16)]
    assert max(errs) < 0.15 and sum(errs) / len(errs) < 0.06, errs


def test_triton_kernels_match_the_plain_math():
    """The GPU's Triton decode and per-row cast, run by Triton's CPU interpreter (in a fresh process: the interpreter
    must be on before triton is imported), against the plain PyTorch versions."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", "import test_fp8; test_fp8.check_triton_kernels()"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def check_triton_kernels():
    """Same layout (transposed or not), same scales, same float8 values. The interpreter's float8 conversion drops
    the carry when rounding crosses a power of two (126.6 -> 64 instead of 128); the GPU's conversion instruction
    does not (tests/gpu/check_fused.py compares there), so such values may be half the reference; and it rounds
    exact ties away from zero where the GPU rounds them to even (bf16 inputs make ties common)."""
    decode, cast = fp8.triton_kernels()

    def same(got, expected, exact=None):
        got, expected = got.float(), expected.float()
        ok = (got == expected) | (2 * got == expected)
        if exact is not None:
            ok |= (got - exact).abs() == (expected - exact).abs()
        return got.shape == expected.shape and bool(ok.all()) and (got == expected).float().mean() > 0.9

    base = quantized(80, 192, "bnb.nf4-dq")
    state = base.weight.quant_state
    absmax = fp8.nested_absmax(state.absmax, state.state2.code, state.state2.absmax, state.offset,
                               state.state2.blocksize)
    for transpose in (False, True):
        w8, scale = decode(base.weight, absmax, state.code, (80, 192), transpose)
        expected, expected_scale = fp8.decode_4bit(base.weight, absmax, state.code, (80, 192), transpose)
        assert torch.equal(scale, expected_scale) and same(w8, expected), transpose
    x = torch.randn(37, 200, dtype=torch.bfloat16)
    x[3], x[5] = 0, x[5] * 1000
    x8, scales = cast(x)
    expected, expected_scales = fp8.cast_rows(x)
    assert torch.equal(scales, expected_scales) and same(x8, expected, x.float() / expected_scales)


def test_self_check_finds_a_wrong_kernel_and_gpu_kernels_keeps_the_plain_one(monkeypatch, capsys):
    """gpu_kernels only takes a Triton kernel that agrees with its PyTorch version on this device: a decode that gets
    every other value wrong (as a bad bitcast did on an H100) is refused with a warning, a cast that agrees is
    taken. The plain kernels, and so every other model's, stay as they were."""
    def bad_decode(packed, absmax, code, shape, transpose):
        w8, scale = fp8.decode_4bit(packed, absmax, code, shape, transpose)
        w = w8.float()
        w.view(-1)[1::2] *= -1
        return w.to(fp8.E4M3), scale

    assert fp8.self_check(fp8.decode_4bit, fp8.cast_rows, device="cpu") == {}
    wrong = fp8.self_check(bad_decode, fp8.cast_rows, device="cpu")
    assert list(wrong) == ["decode_4bit"] and 0.4 < wrong["decode_4bit"] < 0.6
    def good_cast(x):
        return fp8.cast_rows(x)

    real_check = fp8.self_check
    monkeypatch.setattr(fp8, "triton_kernels", lambda: (bad_decode, good_cast))
    monkeypatch.setattr(fp8, "self_check", lambda decode, cast: real_check(decode, cast, device="cpu"))
    kernels = fp8.gpu_kernels()
    assert kernels.decode_4bit is fp8.decode_4bit and kernels.cast_rows is good_cast
    assert kernels.cast_weight is not fp8.cast_weight  # compiled
    assert "Triton decode_4bit agrees with its PyTorch version on only" in capsys.readouterr().err
    assert fp8.PLAIN == fp8.Kernels() and fp8.PLAIN.cast_rows is fp8.cast_rows
