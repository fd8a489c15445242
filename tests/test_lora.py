"""LoRA layers, adapters, merging, and the bitsandbytes base weights (on CPU: bitsandbytes >= 0.45 has 4-bit CPU ops)."""

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cli import InputError
from lora import (LoRAConfig, LoRALinear, inject_lora, load_adapter, lora_modules, lora_state_dict, merge_lora,
                  parse_targets, save_adapter, strip_lora, unmerge_lora)
from model import GPT, Config

ROOT = Path(__file__).resolve().parent.parent
GQA = dict(name="tiny-gqa", block_size=64, vocab_size=97, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
           intermediate_size=48)


pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(name: str, folder: str = "scripts"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize_lora(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def test_parse_targets():
    assert parse_targets("all") == ("q", "k", "v", "o", "gate", "up", "down")
    assert parse_targets("v, q,head") == ("q", "v", "head")
    assert parse_targets(["mlp", "q"]) == ("q", "gate", "up", "down")
    with pytest.raises(ValueError, match="unknown LoRA target 'query'"):
        parse_targets("query")


def test_gradients_reach_only_lora():
    torch.manual_seed(0)
    model = GPT(Config(**GQA))
    inject_lora(model, LoRAConfig(r=4, targets="all,head", dropout=0.1))
    randomize_lora(model)
    model.train()
    model(torch.randint(0, 97, (2, 9))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert len(lora_state_dict(model)) == 2 * (2 * 5 + 1)  # per block: qkv (one module for q, k, v), proj, fc_1, fc_2, mlp.proj


@pytest.mark.parametrize("subset", [s for n in (1, 2, 3) for s in itertools.combinations("qkv", n)])
def test_qkv_subset_matches_unfused_reference(subset):
    """LoRA on a subset of q/k/v of the fused projection == separate q/k/v linears with their own LoRA (GQA)."""
    torch.manual_seed(0)
    config = Config(**GQA)
    fused = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=True)
    from lora import qkv_parts

    lora = LoRALinear(fused, r=3, alpha=6, parts=qkv_parts(config, subset))
    nn.init.normal_(lora.lora_B)
    q_rows, kv_rows = config.n_head * config.head_size, config.n_query_groups * config.head_size
    sizes = {"q": q_rows, "k": kv_rows, "v": kv_rows}
    x = torch.randn(2, 5, config.n_embd)

    # Reference: three independent linears with peft-style adapters on the chosen ones.
    start, outs, row, part = 0, [], 0, 0
    for name in "qkv":
        w, b = fused.weight[start:start + sizes[name]], fused.bias[start:start + sizes[name]]
        y = x @ w.T + b
        if name in subset:
            A = lora.lora_A[part * 3:(part + 1) * 3]
            B = lora.lora_B[row:row + sizes[name]]
            y = y + (x @ A.T @ B.T) * 2.0
            row, part = row + sizes[name], part + 1
        else:
            assert torch.equal(lora(x)[..., start:start + sizes[name]], y)  # untouched rows are exactly the base
        outs.append(y)
        start += sizes[name]
    torch.testing.assert_close(lora(x), torch.cat(outs, -1), rtol=1e-5, atol=1e-5)
    # and the merged weight puts the delta on the same rows
    expected = lora(x)
    lora.merge()
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", ["all", "qv,head", "mlp", "k,o"])
def test_merge_equals_lora_and_unmerge_restores(targets):
    torch.manual_seed(0)
    config = Config(**GQA, tie_embeddings=True)
    model = GPT(config).eval()
    x = torch.randint(0, 97, (2, 11))
    base_logits = model(x)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
    model.eval()
    assert torch.equal(model(x), base_logits)  # B = 0 at init: LoRA starts at the base model
    randomize_lora(model)
    lora_logits = model(x)
    assert not torch.allclose(lora_logits, base_logits)
    wte_before = model.wte.weight.clone()
    merge_lora(model)
    torch.testing.assert_close(model(x), lora_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.wte.weight, wte_before)  # a merged LoRA head never leaks into tied embeddings
    unmerge_lora(model)
    torch.testing.assert_close(model(x), lora_logits, rtol=1e-4, atol=1e-4)  # unmerged: adapter applied on the fly
    for m in lora_modules(model).values():
        m.lora_B.data.zero_()
    torch.testing.assert_close(model(x), base_logits, rtol=1e-4, atol=1e-4)


def test_strip_lora_gives_plain_model_with_base_names(tmp_path):
    torch.manual_seed(0)
    model = GPT(Config(**GQA)).eval()
    names = set(model.state_dict())
    inject_lora(model, LoRAConfig(r=2, targets="all,head"))
    randomize_lora(model)
    x = torch.randint(0, 97, (1, 7))
    expected = model(x)
    strip_lora(model)
    assert set(model.state_dict()) == names
    assert not lora_modules(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_adapter_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = GPT(Config(**GQA)).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=16, dropout=0.0, targets="q,v,down"))
    randomize_lora(model)
    x = torch.randint(0, 97, (1, 7))
    expected = model(x)
    save_adapter(model, tmp_path / "adapter.safetensors", extra={"step": 3})
    assert not (tmp_path / "adapter.safetensors.tmp").exists()

    fresh = GPT(Config(**GQA)).eval()  # the same base weights, taken from the LoRA model's base linears
    base_state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(base_state)
    settings = load_adapter(fresh, tmp_path / "adapter.safetensors")  # no flags: the file says r, alpha, targets
    assert settings["lora"]["targets"] == ["q", "v", "down"] and settings["step"] == 3
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected)

    other = GPT(Config(**{**GQA, "n_embd": 64}))
    with pytest.raises(ValueError, match="adapter was trained on 'tiny-gqa', which has another shape"):
        load_adapter(other, tmp_path / "adapter.safetensors")
    with pytest.raises(InputError, match="adapter not found"):
        load_adapter(other, tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# bitsandbytes base weights on CPU

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), prompt_style="alpaca", tie_embeddings=True)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4"])
def test_quantized_load_matches_dequantized_reference(tiny_ckpt, mode):
    from quantize import dequantize_weight, roundtrip
    from utils import load_model

    qmodel = load_model(tiny_ckpt, device="cpu", dtype=torch.bfloat16, quantize=mode)
    assert isinstance(qmodel.blocks[0].attn.qkv, bnb.nn.Linear4bit)
    for name, p in qmodel.named_parameters():  # no silent fp32 copies of norms, embeddings or head
        assert p.dtype in (torch.bfloat16, torch.uint8), (name, p.dtype)
    assert qmodel.lm_head.weight is qmodel.wte.weight
    ref = load_model(tiny_ckpt, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = ref.get_submodule(name).weight
                ref.get_submodule(name).weight.copy_(dequantize_weight(m))
                torch.testing.assert_close(roundtrip(w, mode), ref.get_submodule(name).weight)
    x = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(qmodel(x).float(), ref(x).float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4"])
def test_4bit_training_loss_is_the_same_after_an_eval_forward(monkeypatch, mode):
    """bitsandbytes 0.50 repacks a 4-bit weight in place for its CPU inference kernel at the first eval-mode forward
    without grad, on CPUs with AVX512-BF16 (claimed here for every CPU): training after a validation must not see it."""
    from finetune.lora import training_loss
    from quantize import empty_quantized_model, quantize_model

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(0)
    config = Config(**{**GQA, "n_embd": 64, "intermediate_size": 128})  # whole 64-weight blocks: the repacking runs
    weights = [(name, p.detach()) for name, p in GPT(config).named_parameters()]
    model = quantize_model(empty_quantized_model(config, mode, torch.float32), weights, mode, "cpu", torch.float32)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    randomize_lora(model)
    tokens = torch.randint(0, 97, (2, 17))
    batch = {"idx": tokens[:, :-1], "targets": tokens[:, 1:]}
    model.train()
    before, _ = training_loss(model, batch)
    model.eval()
    with torch.no_grad():
        model(tokens)
    model.train()
    after, _ = training_loss(model, batch)
    assert torch.equal(before, after), (before, after)


def test_qlora_trains_and_merges_to_bf16_checkpoint(tiny_ckpt, tmp_path):
    """NF4 base + LoRA: only LoRA gets gradients; scripts/merge_lora.py writes a bf16 checkpoint whose logits equal
    the LoRA model's."""
    from utils import load_model

    model = load_model(tiny_ckpt, device="cpu", dtype=torch.bfloat16, quantize="bnb.nf4-dq")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all,head"))
    model.train()
    x = torch.randint(0, 300, (2, 9))
    model(x).float().logsumexp(-1).mean().backward()
    assert all(("lora_" in n) == (p.grad is not None) for n, p in model.named_parameters())
    randomize_lora(model, std=0.1)
    model.eval()
    lora_logits = model(x).float()
    save_adapter(model, tmp_path / "adapter.safetensors", extra={"quantize": "bnb.nf4-dq", "checkpoint_dir": str(tiny_ckpt)})

    out = tmp_path / "merged"
    load_script("merge_lora").main(adapter=tmp_path / "adapter.safetensors", out_dir=out)  # no LoRA flags repeated
    for f in ("model_config.json", "oneday/weights.safetensors", "tokenizer.json", "prompt_style.json"):
        assert (out / f).is_file(), f
    merged_config = json.loads((out / "model_config.json").read_text())
    assert merged_config["tie_embeddings"] is False  # the LoRA head got its own weight
    merged = load_model(out, device="cpu", dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(out / "oneday/weights.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # The same merge in memory (dequantize, add B A in fp32, round to bf16) gives the same weights bit for bit ...
    merge_lora(model)
    merged_state = merged.state_dict()
    for name, m in lora_modules(model).items():
        assert torch.equal(merged_state[f"{name}.weight"], m.base.weight), name
    torch.testing.assert_close(merged(x).float(), model(x).float(), rtol=0, atol=0)
    # ... and the merged logits are the LoRA logits up to bf16 rounding (these peaked random nets amplify it) ...
    scale = lora_logits.abs().max()
    assert (merged(x).float() - lora_logits).abs().max() < 0.1 * scale
    assert (merged(x).float() - lora_logits).abs().mean() < 0.01 * scale
    # ... which in fp32 is all there is: merging onto the dequantized NF4 weights is exact.
    model32 = load_model(tiny_ckpt, device="cpu", dtype=torch.float32, quantize="bnb.nf4-dq")
    inject_lora(model32, LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all,head"))
    randomize_lora(model32, std=0.1)
    model32.eval()
    expected = model32(x)
    merge_lora(model32)
    torch.testing.assert_close(model32(x), expected, rtol=1e-4, atol=1e-4)


def test_benchmark_builds_a_random_qlora_model_without_a_checkpoint():
    """benchmarks/benchmark_finetune.py's model (GPU there) builds and trains one step on CPU here."""
    bench = load_script("benchmark_finetune", "benchmarks")
    from finetune.lora import training_loss

    config = Config(**GQA)
    model = bench.build(config, "bnb.nf4", LoRAConfig(r=4), "cpu", torch.bfloat16)
    assert isinstance(model.blocks[1].mlp.fc_2.base, bnb.nn.Linear4bit)
    bench.set_checkpointing(model, "p1")  # the first block only
    assert "forward" in model.blocks[0].__dict__ and "forward" not in model.blocks[1].__dict__
    with pytest.raises(ValueError, match="pN"):
        bench.set_checkpointing(model, "yes")
    bench.set_checkpointing(model, "1")
    assert all("forward" in b.__dict__ for b in model.blocks)
    tokens = torch.randint(0, 97, (2, 17))
    loss, n = training_loss(model, {"idx": tokens[:, :-1], "targets": tokens[:, 1:]})
    (loss / n).backward()
    assert n == 32 and abs(loss.item() / n - torch.log(torch.tensor(97.0)).item()) < 0.5  # random model: ~log(vocab)
    bench.set_checkpointing(model, "0")
    assert "forward" not in model.blocks[0].__dict__


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o", "up", "down")])
def test_frozen_adapter_gives_the_same_bits_without_converting_at_every_call(targets):
    """The server freezes adapters kept over a 4-bit base (lora.freeze_lora): A and the placed B are kept in the
    activations' dtype, so a call multiplies them as they are. Its output equals the unfrozen layer's bit for bit, and
    its traced call converts and places nothing, where the unfrozen one converts the fp32 parameters every time."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lora import freeze_lora

    torch.manual_seed(0)
    model = GPT(Config(**GQA)).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    assert all(m.lora_A.dtype == torch.float32 for m in lora_modules(model).values())  # as the server loads them
    layers = lora_modules(model)
    xs = {name: torch.randn(3, 5, m.in_features).bfloat16() for name, m in layers.items()}

    def converts(layer, x) -> int:
        graph = make_fx(layer)(x).graph
        return sum(n.op == "call_function" and n.target.__name__.split(".")[0] in ("_to_copy", "zeros", "new_zeros")
                   for n in graph.nodes)

    before = {name: m(xs[name]) for name, m in layers.items()}
    assert all(converts(m, xs[name]) >= 2 for name, m in layers.items())
    freeze_lora(model, torch.bfloat16)
    for name, m in layers.items():
        assert torch.equal(m(xs[name]), before[name]), name
        assert converts(m, xs[name]) == 0, name
    with torch.no_grad():
        ids = torch.randint(0, GQA["vocab_size"], (2, 7))
        assert model(ids).dtype == torch.bfloat16
