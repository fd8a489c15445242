"""finetune/lora.py refuses every bad input with one line that names the flag, file or field and says what to do,
before it writes anything; an empty validation split trains without validation."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import cli
from cli import InputError
from finetune import lora as ft
from test_finetune import one_line_error, run
from tiny_checkpoint import make_tiny_checkpoint
from tiny_data import make_data_dir, make_samples, write_split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), prompt_style="alpaca")


@pytest.fixture(scope="module")
def vocab(ckpt):
    return json.loads((ckpt / "model_config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, vocab):
    return make_data_dir(tmp_path_factory.mktemp("data"), vocab)


def refused(ckpt, data, out, **kw) -> str:
    """The one-line message of a run that refuses to start, which must leave out_dir untouched."""
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, **kw)
    assert not out.exists()
    return one_line_error(e)


def cli_error(capsys, *flags) -> str:
    """What `python finetune/lora.py FLAGS` prints for a refused flag: one line, exit status 2."""
    with pytest.raises(SystemExit) as e:
        cli.run(ft.setup, args=list(flags))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("flag, value", [
    ("lora.r", "0"), ("lora.alpha", "-8"), ("lora.dropout", "1"), ("train.learning_rate", "-1e-4"),
    ("train.learning_rate", "0"), ("train.min_lr_ratio", "1.5"), ("train.weight_decay", "-0.1"),
    ("train.warmup_steps", "-1"), ("train.warmup_ratio", "-0.1"), ("train.grad_clip", "0"), ("train.batch_size", "0"),
    ("train.micro_batch_size", "-2"), ("train.epochs", "0"), ("train.max_steps", "0"), ("train.max_seq_length", "0"),
    ("speed.activation_checkpointing", "-2"), ("train.neftune_alpha", "-5"), ("eval.interval", "0"),
    ("eval.samples", "0"), ("eval.sample_tokens", "-1"), ("train.save_interval", "0"), ("train.log_interval", "0"),
    ("seed", "-1"), ("devices", "0"), ("accelerator", "nonsense"), ("lora.targets", "query"),
    ("speed.fp8", "e5m2"), ("train.optimizer", "sgd"),
    ("max_time", "0"), ("max_time", "-00:10:00"), ("max_time", "1:xx"), ("max_time", "nan"),
])
def test_meaningless_flag_values_are_refused_in_one_line(ckpt, data, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    err = cli_error(capsys, "--checkpoint_dir", str(ckpt), "--data_dir", str(data), "--out_dir", str(out),
                    "--accelerator", "cpu", f"--{flag}={value}")
    assert f"--{flag}" in err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(ckpt, data, tmp_path):
    assert "--accelerator cuda" in refused(ckpt, data, tmp_path / "out", accelerator="cuda")


def test_paths_that_do_not_work_are_one_line_before_anything_is_written(ckpt, data, tmp_path):
    message = refused(tmp_path / "no-such-checkpoint", data, tmp_path / "o1")
    assert message.startswith(f"--checkpoint_dir {tmp_path / 'no-such-checkpoint'}: neither a checkpoint folder nor")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "model_config.json", no_weights / "model_config.json")
    assert f"--checkpoint_dir {no_weights}: no oneday/weights*.safetensors" in refused(no_weights, data, tmp_path / "o2")
    no_data = tmp_path / "no-such-data"
    assert f"--data_dir {no_data}: no such folder" in refused(ckpt, no_data, tmp_path / "o3")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert f"--out_dir {a_file / 'run'}: {a_file} is a file" in refused(ckpt, data, a_file / "run")
    with pytest.raises(InputError) as e:
        run(ckpt, data, a_file)
    assert "is a file; choose another --out_dir" in one_line_error(e)


def test_model_config_needs_its_sizes_and_readable_json(ckpt, data, tmp_path):
    config = json.loads((ckpt / "model_config.json").read_text())

    def broken(name, text):
        folder = tmp_path / name
        shutil.copytree(ckpt, folder)
        (folder / "model_config.json").write_text(text)
        return refused(folder, data, tmp_path / f"out-{name}")

    missing = {k: v for k, v in config.items() if k != "n_layer"}
    assert "model_config.json: missing n_layer" in broken("missing", json.dumps(missing))
    assert "model_config.json: n_embd must be" in broken("type", json.dumps({**config, "n_embd": "32"}))
    assert "model_config.json: n_head must be" in broken("zero", json.dumps({**config, "n_head": 0}))
    assert "model_config.json: not valid JSON" in broken("malformed", json.dumps(config)[:-3])
    assert "model_config.json: expected a JSON object" in broken("list", "[1, 2]")
    # Older files without the optional fields still load, with those fields' defaults.
    older = tmp_path / "older"
    shutil.copytree(ckpt, older)
    optional = ("sliding_window", "tie_embeddings", "head_size", "hf_repo", "gelu_approximate", "parallel_residual")
    (older / "model_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in optional}))
    run(older, data, tmp_path / "older-run", max_steps=1, sample_tokens=0)


@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
def test_weights_that_do_not_fit_model_config_are_one_line(ckpt, data, tmp_path, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    config = json.loads((ckpt / "model_config.json").read_text())
    (other / "model_config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    message = refused(other, data, tmp_path / "out", quantize=quantize)
    assert "has shape" in message and "model_config.json does not match the weights" in message
    weights = (other / "oneday/weights.safetensors").read_bytes()
    (other / "oneday/weights.safetensors").write_bytes(weights[:len(weights) // 2])
    (other / "model_config.json").write_text(json.dumps(config))
    assert "unreadable checkpoint shard" in refused(other, data, tmp_path / "out", quantize=quantize)


def test_broken_meta_and_train_config_are_one_line(ckpt, data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    for text, expected in (("{", "meta.json:1:2: not valid JSON"),
                           ("[]", "meta.json: expected a JSON object"),
                           ('{"max_seq_length": "long"}', "meta.json: max_seq_length 'long' is not a positive whole")):
        (bad / "meta.json").write_text(text)
        assert expected in refused(ckpt, bad, tmp_path / "out")
    shutil.copy(data / "meta.json", bad / "meta.json")
    (bad / "prompt_style.json").write_text('{"name": "mine", "user": "Q: {question}"}')
    assert refused(ckpt, bad, tmp_path / "out").startswith(f"{bad}/prompt_style.json: ")

    out = tmp_path / "run"
    run(ckpt, data, out, max_steps=2, sample_tokens=0)
    (out / "train_config.yaml").write_text("lora: [4,\n")
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=4, resume=True)
    assert "train_config.yaml: unreadable or malformed YAML" in one_line_error(e)
    (out / "train_config.yaml").unlink()
    (out / "state.ckpt").write_bytes((out / "state.ckpt").read_bytes()[:100])
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=4, resume=True)
    assert "state.ckpt: unreadable" in one_line_error(e)


def test_empty_training_split_is_refused(ckpt, data, tmp_path):
    for name, samples in (("empty", []), ("no_targets", [(t, [0] * len(t)) for t, _ in make_samples(8, 50, seed=0)])):
        bad = tmp_path / name
        shutil.copytree(data, bad)
        write_split(bad / "train.safetensors", samples)
        message = refused(ckpt, bad, tmp_path / f"out-{name}")
        assert f"{bad}/train.safetensors: no sample with a target token" in message


def test_empty_validation_split_trains_without_validation(ckpt, data, tmp_path, capsys):
    no_val = tmp_path / "no_val"
    shutil.copytree(data, no_val)
    write_split(no_val / "val.safetensors", [])  # what prepare_mix.py writes for a recipe with val_size 0
    out = tmp_path / "out"
    run(ckpt, no_val, out, max_steps=4, eval_interval=2, save_interval=2)
    text = capsys.readouterr().out
    assert f"{no_val}/val.safetensors has no sample with a target token" in text
    assert "tokens: training without validation (no val loss, no adapter_best.safetensors)" in text
    assert "| val loss" not in text and "No validation" in text
    assert (out / "adapter.safetensors").is_file() and not (out / "adapter_best.safetensors").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_data_from_another_tokenizer_is_refused(ckpt, data, tmp_path):
    from tokenizer import Tokenizer

    other = make_tiny_checkpoint(tmp_path / "other", bos=True)  # the same vocabulary, other ids for the same text
    theirs, ours = Tokenizer(other).fingerprint(), Tokenizer(ckpt).fingerprint()
    assert theirs != ours
    tokenized = tmp_path / "data"
    shutil.copytree(data, tokenized)
    meta = json.loads((data / "meta.json").read_text())
    (tokenized / "meta.json").write_text(json.dumps({**meta, "tokenizer_dir": str(other),
                                                     "tokenizer_fingerprint": theirs}))
    message = refused(ckpt, tokenized, tmp_path / "out")
    assert message.startswith(f"{tokenized}/meta.json: the data was tokenized by {other}'s tokenizer")
    assert theirs in message and ours in message and message.endswith(f"--checkpoint_dir {ckpt}")
    (tokenized / "meta.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": ours}))
    run(ckpt, tokenized, tmp_path / "out", max_steps=1, sample_tokens=0)


def test_a_diverging_run_stops_without_saving_over_the_last_good_adapter(ckpt, data, tmp_path):
    out = tmp_path / "out"
    assert run(ckpt, data, out, learning_rate=1e30, sample_tokens=0, save_interval=1) == "stopped"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "stopped" and status["step"] == 1
    assert status["reason"].startswith("the training loss is ") and "at step 2, nothing saved after step 1" in status["reason"]
    assert "lower --train.learning_rate (now 1e+30)" in status["reason"]
    adapter = load_file(out / "adapter.safetensors")  # step 1's: finite, not the diverged step's
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_config_files_that_do_not_work_are_one_line(ckpt, data, tmp_path, capsys):
    """--config FILE: a missing file, broken YAML, an unknown or mistyped flag inside it: one line, exit status 2."""
    common = ["--checkpoint_dir", str(ckpt), "--data_dir", str(data), "--out_dir", str(tmp_path / "out")]
    assert "does not exist" in cli_error(capsys, "--config", str(tmp_path / "missing.yaml"), *common)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora: [\n")
    assert "broken.yaml" in cli_error(capsys, "--config", str(broken), *common)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lora:\n  rank: 8\n")
    assert "rank" in cli_error(capsys, "--config", str(unknown), *common)
    mistyped = tmp_path / "mistyped.yaml"
    mistyped.write_text("train:\n  batch_size: 0\n")
    assert "--train.batch_size" in cli_error(capsys, "--config", str(mistyped), *common)
    assert not (tmp_path / "out").exists()
