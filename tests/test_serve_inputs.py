"""The command lines of generate/, the converters, merge_lora, download and evaluate: a value that means nothing and a
file that is wrong each get one line (exit status 2), no traceback, naming the flag or file (cli.run)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cli import run
from tests.tiny_checkpoint import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import convert_gguf_checkpoint  # noqa: E402
import convert_hf_checkpoint  # noqa: E402
import convert_lit_checkpoint  # noqa: E402
import download  # noqa: E402
import export_adapter  # noqa: E402
import merge_lora  # noqa: E402
from generate import base, lora as generate_lora, server  # noqa: E402
from benchmarks import e2e_report  # noqa: E402
from scripts import evaluate  # noqa: E402
from utils import weight_names  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
(WEIGHTS,) = weight_names(1)


def one_line_error(capsys, fn, *args) -> str:
    """What a script prints for a user mistake: one line, exit status 2, no traceback."""
    with pytest.raises(SystemExit) as e:
        run(fn, args=[str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fn, args, flag", [
    (base.main, ["--max_new_tokens", "-1"], "--max_new_tokens"),
    (base.main, ["--max_new_tokens", "0"], "--max_new_tokens"),
    (base.main, ["--temperature", "-0.5"], "--temperature"),
    (base.main, ["--top_k", "0"], "--top_k"),
    (base.main, ["--top_p", "0"], "--top_p"),
    (base.main, ["--top_p", "1.5"], "--top_p"),
    (base.main, ["--num_samples", "0"], "--num_samples"),
    (base.main, ["--precision", "fp8"], "--precision"),
    (base.main, ["--quantize", "nf4"], "--quantize"),
    (generate_lora.main, ["--max_new_tokens", "-5"], "--max_new_tokens"),
    (generate_lora.main, ["--quantize", "4bit"], "--quantize"),
    (server.main, ["--port", "0"], "--port"),
    (server.main, ["--port", "70000"], "--port"),
    (server.main, ["--max_batch_size", "0"], "--max_batch_size"),
    (server.main, ["--max_seq_length", "-1"], "--max_seq_length"),
    (server.main, ["--max_body_mb", "0"], "--max_body_mb"),
    (evaluate.main, ["--limit", "0"], "--limit"),
    (evaluate.main, ["--limit", "-3"], "--limit"),
    (evaluate.main, ["--concurrency", "0"], "--concurrency"),
    (evaluate.main, ["--source", "web"], "--source"),
    (merge_lora.main, ["--precision", "int4"], "--precision"),
    (convert_hf_checkpoint.setup, ["--checkpoint_dir", "x", "--dtype", "int8"], "--dtype"),
    (convert_lit_checkpoint.setup, ["--checkpoint_dir", "x", "--out_dir", "y", "--max_shard_size_gb", "0"],
     "--max_shard_size_gb"),
    (convert_gguf_checkpoint.main, ["--dtype", "q4"], "--dtype"),
    (convert_gguf_checkpoint.main, ["--shard_size_gb", "-1"], "--shard_size_gb"),
    (export_adapter.main, ["--adapter", "x", "--family", "falcon"], "--family"),
])
def test_meaningless_flag_values_are_refused(capsys, fn, args, flag):
    assert one_line_error(capsys, fn, *args).startswith(f"error: {flag}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base checkpoint, an adapter trained on it, and an adapter trained on a model of another shape."""
    from lora import LoRAConfig, inject_lora, save_adapter
    from utils import load_model

    root = tmp_path_factory.mktemp("inputs")
    ckpt = make_tiny_checkpoint(root / "base")
    for name, folder in (("adapter", ckpt), ("foreign", make_tiny_checkpoint(root / "other", n_embd=48))):
        model = inject_lora(load_model(folder), LoRAConfig(r=2, alpha=4, targets=("q", "v")))
        (root / name).mkdir()
        save_adapter(model, root / name / "adapter.safetensors", extra={"checkpoint_dir": str(folder)})
    return root


def copy_with(tiny: Path, tmp_path: Path, name: str, content) -> Path:
    """A copy of the base checkpoint with one file replaced (text or bytes)."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny / "base", folder)
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def moved_to_old_names(folder: Path) -> Path:
    """The checkpoint as versions before oneday/ left it: our tensors in model.safetensors."""
    (folder / WEIGHTS).rename(folder / "model.safetensors")
    return folder


def a_file(tmp_path: Path, name: str, content: str = "junk") -> Path:
    (tmp_path / name).write_text(content)
    return tmp_path / name


LLAMA = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32}
# mistake -> (tiny, tmp_path) -> (script, its flags, words the message must hold)
MISTAKES = {
    "checkpoint_dir that does not exist": lambda t, tmp: (
        base.main, ["--checkpoint_dir", tmp / "nowhere"], "neither a checkpoint folder nor a registered model name"),
    "checkpoint_dir that is a file": lambda t, tmp: (
        base.main, ["--checkpoint_dir", t / "base" / "model_config.json"], "is a file"),
    "checkpoint_dir without model_config.json": lambda t, tmp: (
        server.main, ["--checkpoint_dir", tmp], "no model_config.json here"),
    "model_config.json that is not JSON": lambda t, tmp: (
        base.main, ["--checkpoint_dir", copy_with(t, tmp, "model_config.json", "{oops")], "model_config.json"),
    "model_config.json that is a list": lambda t, tmp: (
        base.main, ["--checkpoint_dir", copy_with(t, tmp, "model_config.json", "[1, 2]")], "model_config.json"),
    "model_config.json with impossible sizes": lambda t, tmp: (
        generate_lora.main, ["--adapter", t / "adapter", "--checkpoint_dir", copy_with(
            t, tmp, "model_config.json", (t / "base" / "model_config.json").read_text().replace('"n_head": 4',
                                                                                              '"n_head": 0'))],
        "model_config.json"),
    "weights that are not safetensors": lambda t, tmp: (
        base.main, ["--checkpoint_dir", copy_with(t, tmp, WEIGHTS, b"\0" * 16)], "unreadable checkpoint"),
    "weights of another model": lambda t, tmp: (
        base.main, ["--checkpoint_dir", copy_with(t, tmp, WEIGHTS, (t / "other" / WEIGHTS).read_bytes())],
        "model_config.json does not match the weights"),
    "weights under the file names of an older version": lambda t, tmp: (
        base.main, ["--checkpoint_dir", moved_to_old_names(copy_with(t, tmp, "x", ""))],
        "move them to oneday/weights*.safetensors with: python scripts/convert_hf_checkpoint.py"),
    "tokenizer.json that is broken": lambda t, tmp: (
        base.main, ["--checkpoint_dir", copy_with(t, tmp, "tokenizer.json", "{")], "not a readable tokenizer"),
    "adapter that does not exist": lambda t, tmp: (
        generate_lora.main, ["--adapter", tmp / "a.safetensors"], "adapter not found"),
    "adapter that is not safetensors": lambda t, tmp: (
        generate_lora.main, ["--adapter", a_file(tmp, "a.safetensors")], "not a readable safetensors file"),
    "adapter folder without an adapter (server)": lambda t, tmp: (
        server.main, ["--checkpoint_dir", t / "base", "--adapter_dir", tmp], "adapter not found"),
    "adapter for another base (generate/lora.py)": lambda t, tmp: (
        generate_lora.main, ["--adapter", t / "foreign", "--checkpoint_dir", t / "base"], "adapter was trained on"),
    "adapter for another base (merge_lora.py)": lambda t, tmp: (
        merge_lora.main, ["--adapter", t / "foreign", "--checkpoint_dir", t / "base"], "adapter was trained on"),
    "adapter for another base (export_adapter.py)": lambda t, tmp: (
        export_adapter.main, ["--adapter", t / "foreign", "--checkpoint_dir", t / "base"], "adapter was trained on"),
    "adapter for another base (server)": lambda t, tmp: (
        server.main, ["--adapter_dir", t / "foreign", "--checkpoint_dir", t / "base"], "adapter was trained on"),
    "merge into the base folder": lambda t, tmp: (
        merge_lora.main, ["--adapter", t / "adapter", "--out_dir", t / "base"], "must differ"),
    "dola_layers past the last layer": lambda t, tmp: (
        server.main, ["--checkpoint_dir", t / "base", "--dola_layers", "7"], "--dola_layers '7'"),
    "dola_layers that are not numbers": lambda t, tmp: (
        server.main, ["--checkpoint_dir", t / "base", "--dola_layers", "a,b"], "--dola_layers 'a,b'"),
    "unknown prompt style": lambda t, tmp: (
        server.main, ["--checkpoint_dir", t / "base", "--prompt_style", "klingon"], "'klingon'"),
    "GGUF file that is not GGUF": lambda t, tmp: (
        convert_gguf_checkpoint.main, ["--gguf_file", a_file(tmp, "m.gguf")], "not a readable GGUF file"),
    "export into the folder it reads": lambda t, tmp: (
        convert_lit_checkpoint.setup, ["--checkpoint_dir", t / "base", "--out_dir", t / "base"], "must differ"),
    "export into a file": lambda t, tmp: (
        convert_lit_checkpoint.setup, ["--checkpoint_dir", t / "base", "--out_dir", a_file(tmp, "x")], "is a file"),
    "config.json that is not JSON": lambda t, tmp: (
        convert_hf_checkpoint.setup, ["--checkpoint_dir", a_file(tmp, "config.json", "{oops").parent],
        "config.json: not a usable Hugging Face config (JSONDecodeError"),
    "config.json without the sizes": lambda t, tmp: (
        convert_hf_checkpoint.setup, ["--checkpoint_dir", a_file(tmp, "config.json", '{"model_type": "llama"}').parent],
        "'vocab_size'"),
    "unknown --model_name": lambda t, tmp: (
        convert_hf_checkpoint.setup, ["--checkpoint_dir", a_file(tmp, "config.json", json.dumps(LLAMA)).parent,
                                      "--model_name", "Mistral-7B-v0.2"], "Mistral-7B-v0.2"),
    "repo_id that is no repository name": lambda t, tmp: (
        download.main, ["--repo_id", "not a repo", "--checkpoint_dir", tmp], "--repo_id 'not a repo'"),
    "runs that are not name=folder": lambda t, tmp: (
        e2e_report.main, ["--runs", "base", "--heldout", tmp], "--runs 'base'"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistakes_are_one_line(capsys, tiny, tmp_path, mistake):
    fn, args, words = MISTAKES[mistake](tiny, tmp_path)
    assert words in one_line_error(capsys, fn, *args)
    assert (tiny / "base" / WEIGHTS).is_file()  # no mistake costs the user their checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_device_mistakes(capsys, tiny):
    assert "no CUDA GPU" in one_line_error(capsys, base.main, "--checkpoint_dir", tiny / "base", "--device", "cuda")
    assert "--device 'gpu'" in one_line_error(capsys, base.main, "--checkpoint_dir", tiny / "base", "--device", "gpu")


def test_evaluate_mistakes(capsys, tiny, tmp_path):
    assert "exactly one" in one_line_error(capsys, evaluate.main)
    assert "unknown ['hellaswag']" in one_line_error(capsys, evaluate.main, "--url", "http://x", "--tasks",
                                                      "mmlu,hellaswag")
    message = one_line_error(capsys, evaluate.main, "--checkpoint_dir", tiny / "base", "--tasks", "bbq",
                             "--data_dir", tmp_path)
    assert str(tmp_path / "bigbench" / "bbq_lite_json") in message and "--source hub" in message
    assert "PyPI" in message and "github.com/google/BIG-bench" in message
    (tmp_path / "gsm8k").mkdir()
    for split in ("test", "train"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}))
    assert "/health did not answer" in one_line_error(capsys, evaluate.main, "--url", "http://127.0.0.1:9",
                                                      "--tasks", "gsm8k", "--data_dir", tmp_path)
