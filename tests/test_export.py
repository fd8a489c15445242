"""What leaves the project for other tools: a LoRA adapter exported for peft/vLLM (scripts/export_adapter.py) and a
merged fine-tune exported for transformers (merge_lora.py + convert_lit_checkpoint.py). Tiny random Hugging Face models
of each family are converted beside their download; transformers (+ peft) on that untouched download is the reference,
and must compute our LoRA model's logits."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import convert_hf_checkpoint  # noqa: E402
import convert_lit_checkpoint  # noqa: E402
import export_adapter  # noqa: E402
import merge_lora as merge_script  # noqa: E402
from cli import InputError  # noqa: E402
from lora import LoRAConfig, inject_lora, lora_modules, lora_state_dict, save_adapter  # noqa: E402
from model import GPT, Config  # noqa: E402
from utils import load_model  # noqa: E402

transformers = pytest.importorskip("transformers")
from tests.test_convert import TINY, make_hf  # noqa: E402  (the tiny Hugging Face models of every family)

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is the reference for adapter exports: pip install peft")
pytestmark = pytest.mark.usefixtures("one_thread")
# test_convert's cases: MHA, GQA, GQA with tied embeddings, Mistral (window, head_dim), Qwen2 (q/k/v bias), GPT-NeoX
FAMILIES = ["llama", "tinyllama", "smollm2", "mistral", "qwen2", "gpt_neox"]
# Module names vLLM's Llama/Mistral/Qwen2 accept in an adapter (their linears, q/k/v and gate/up unpacked).
VLLM_LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def ids(n=1):
    return torch.randint(0, TINY["vocab_size"], (n, 24), generator=torch.Generator().manual_seed(0))


def lora_model(case: str, folder: Path, targets: str):
    """Our model converted from a tiny Hugging Face download, with LoRA whose A and B are both random (a trained
    adapter's B is never zero) and scaling alpha / r = 3."""
    make_hf(case, folder)
    convert_hf_checkpoint.setup(folder)
    model = load_model(folder)
    if not model.config.gated_mlp:
        targets = targets.replace("all", "attn,up,down")  # GPT-NeoX's MLP has no gate
    inject_lora(model, LoRAConfig(r=4, alpha=12, targets=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * m.in_features ** -0.5)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model.eval()


def reference(folder: Path):
    """transformers on the download the checkpoint was converted from (the converter leaves it as it was)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


@needs_peft
@pytest.mark.parametrize("targets", ["all,head", "q,v"])  # q,v: the k rows of our fused qkv carry no adapter
@pytest.mark.parametrize("case", FAMILIES)
def test_exported_adapter_in_peft_gives_our_logits(case, targets, tmp_path):
    from peft import PeftModel

    folder = tmp_path / f"tiny-{case}"
    model = lora_model(case, folder, targets)
    (tmp_path / "run").mkdir()
    save_adapter(model, tmp_path / "run" / "adapter.safetensors", extra={"checkpoint_dir": str(folder)})
    out = export_adapter.main(adapter=tmp_path / "run" / "adapter.safetensors", out_dir=tmp_path / "peft")

    base = reference(folder)
    x = ids(2)
    with torch.no_grad():
        ours, without = model(x), base(x).logits
        peft_model = PeftModel.from_pretrained(base, out).eval()
        theirs = peft_model(input_ids=x).logits
    assert (ours - without).abs().max() > 0.5  # the adapter changes the logits far beyond the tolerance
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-4, f"{case} {targets}: max |peft - ours| = {diff}"

    config = json.loads((out / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in names}
    # What vLLM checks (vllm/lora/peft_helper.py, lora_model.py): r, lora_alpha and target_modules given, no bias,
    # no modules_to_save, no DoRA; every tensor base_model.model.<module>.lora_A/lora_B.weight of a target module.
    assert config["r"] == 4 and config["lora_alpha"] == 12 and config["bias"] == "none"
    assert not config["modules_to_save"] and not config["use_dora"] and not config["use_rslora"]
    modules = {n.removeprefix("base_model.model.").rsplit(".", 2)[0] for n in names}
    assert all(n.startswith("base_model.model.") and n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    assert len(names) == 2 * len(modules) and {m.rsplit(".", 1)[-1] for m in modules} == set(config["target_modules"])
    if case != "gpt_neox":  # vLLM has no LoRA for GPT-NeoX; the others get rank r everywhere, nothing in rank_pattern
        assert set(config["target_modules"]) <= VLLM_LLAMA_MODULES and not config["rank_pattern"]
        assert all(min(shape) == 4 for shape in shapes.values())
        expected = {"q_proj", "v_proj"} if targets == "q,v" else VLLM_LLAMA_MODULES
        assert set(config["target_modules"]) == expected


@needs_peft
def test_neox_subset_of_the_fused_projection(tmp_path):
    """GPT-NeoX's query_key_value stays fused: LoRA on k and v only is one adapter of rank 2r with zero q rows, in
    NeoX's per-head row order."""
    from peft import PeftModel

    folder = tmp_path / "tiny-gpt_neox"
    model = lora_model("gpt_neox", folder, "k,v,down")
    save_adapter(model, tmp_path / "adapter.safetensors", extra={"checkpoint_dir": str(folder)})
    out = export_adapter.main(adapter=tmp_path / "adapter.safetensors", out_dir=tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"query_key_value": 8} and config["alpha_pattern"] == {"query_key_value": 24}
    x = ids()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(reference(folder), out).eval()(input_ids=x).logits
        assert (theirs - model(x)).abs().max() <= 1e-4


def test_qkv_split_is_exact():
    """Our fused qkv adapter holds one (A_i, B_i) pair per part (lora.py stacks them; no A is shared), so the exported
    q_proj/k_proj/v_proj adapters are exactly those pairs: their scaled products are our delta's rows bit for bit."""
    torch.manual_seed(0)
    config = Config(name="gqa", block_size=32, vocab_size=64, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                    intermediate_size=48)
    lora = LoRAConfig(r=4, alpha=12, targets="q,k,v")
    model = inject_lora(GPT(config), lora)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    weights, ranks = export_adapter.peft_tensors(config, lora, lora_state_dict(model), "llama")
    assert not ranks and len(weights) == 2 * 3 * config.n_layer
    for i, block in enumerate(model.blocks):
        name = f"base_model.model.model.layers.{i}.self_attn.{{}}_proj.lora_{{}}.weight"
        parts = [weights[name.format(p, "B")] @ weights[name.format(p, "A")] * lora.scaling for p in "qkv"]
        assert torch.equal(torch.cat(parts), block.attn.qkv.delta_weight())


@pytest.mark.parametrize("case", FAMILIES)
def test_merged_fine_tune_exported_loads_in_transformers(case, tmp_path):
    """merge_lora.py then convert_lit_checkpoint.py: transformers loads the export with its Auto class and computes
    our LoRA model's logits (a LoRA head on tied embeddings gets its own lm_head)."""
    folder = tmp_path / f"tiny-{case}"
    model = lora_model(case, folder, "all,head")
    save_adapter(model, tmp_path / "adapter.safetensors", extra={"checkpoint_dir": str(folder)})
    merge_script.main(adapter=tmp_path / "adapter.safetensors", out_dir=tmp_path / "merged", precision="fp32",
                      device="cpu")
    (tmp_path / "merged" / "config.json").unlink(missing_ok=True)  # a merged folder has none: the family is guessed
    convert_lit_checkpoint.setup(tmp_path / "merged", tmp_path / "merged-hf")
    exported = reference(tmp_path / "merged-hf")
    merged = load_model(tmp_path / "merged")
    x = ids(2)
    with torch.no_grad():
        ours, theirs, merged_logits = model(x), exported(x).logits, merged(x)
    diff = (theirs - merged_logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |transformers(export) - ours(merged)| = {diff}"
    # Merged weights (W + scaling B A, rounded once to fp32) differ from the unmerged sum in the last bits only.
    diff = (theirs - ours).abs().max().item()
    assert diff <= 2e-5 * ours.abs().max().item(), f"{case}: max |transformers(export) - ours(LoRA)| = {diff}"


def test_first_generation_qwen_adapter_is_refused(tmp_path):
    folder = tmp_path / "Qwen-tiny"
    model = lora_model("qwen", folder, "q,v")
    save_adapter(model, tmp_path / "adapter.safetensors", extra={"checkpoint_dir": str(folder)})
    with pytest.raises(InputError) as excinfo:
        export_adapter.main(adapter=tmp_path / "adapter.safetensors", out_dir=tmp_path / "peft")
    message = str(excinfo.value)
    assert "\n" not in message and str(folder) in message and "merge_lora.py" in message
    assert not (tmp_path / "peft").exists()
