"""scripts/download.py without the network: the hub listing and download functions are replaced by stubs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import download  # noqa: E402
from cli import InputError  # noqa: E402

# File listings as the hub returns them (abridged from the real repositories).
MISTRAL = ["README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
           "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
           "tokenizer.json", "tokenizer.model", "tokenizer_config.json", ".gitattributes"]
BIN_ONLY = ["config.json", "generation_config.json", "pytorch_model-00001-of-00003.bin",
            "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json",
            "qwen.tiktoken", "tokenizer_config.json", "tokenization_qwen.py", "modeling_qwen.py", "training_args.bin",
            "onnx/model.bin"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    calls = {}

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, token):
        calls.update(repo_id=repo_id, local_dir=Path(local_dir), allow_patterns=allow_patterns, token=token)
        return str(local_dir)

    monkeypatch.setattr(download, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return calls


def test_safetensors_preferred(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(download, "list_repo_files", lambda repo_id, token: MISTRAL)
    out = download.main("mistralai/Mistral-7B-v0.1", checkpoint_dir=tmp_path)
    assert out == hub["local_dir"] == tmp_path / "mistralai/Mistral-7B-v0.1"
    assert hub["allow_patterns"] == sorted([
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"])


def test_bin_only_repo_falls_back_to_bin(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(download, "list_repo_files", lambda repo_id, token: BIN_ONLY)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    download.main("Qwen/Qwen-7B", checkpoint_dir=tmp_path)
    assert hub["token"] == "hf_secret"
    assert hub["allow_patterns"] == sorted([
        "config.json", "generation_config.json", "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json",
        "qwen.tiktoken", "tokenizer_config.json"])
    download.main("Qwen/Qwen-7B", checkpoint_dir=tmp_path, tokenizer_only=True)
    assert hub["allow_patterns"] == ["config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"]


def gated_error():
    from huggingface_hub.errors import GatedRepoError

    error = GatedRepoError.__new__(GatedRepoError)  # its constructor differs between huggingface_hub versions
    Exception.__init__(error, "401 Client Error: access to model meta-llama/Llama-2-7b-hf is restricted")
    return error


def test_gated_repo_without_token_is_one_line_error(hub, monkeypatch, tmp_path):
    def gated(repo_id, token):
        raise gated_error()

    monkeypatch.setattr(download, "list_repo_files", gated)
    with pytest.raises(InputError) as e:
        download.main("meta-llama/Llama-2-7b-hf", checkpoint_dir=tmp_path)
    message = str(e.value)
    assert "\n" not in message and "meta-llama/Llama-2-7b-hf" in message and "HF_TOKEN" in message
    assert "repo_id" not in hub  # nothing was downloaded


def test_no_weights_is_one_line_error(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(download, "list_repo_files", lambda repo_id, token: ["README.md", "config.json"])
    with pytest.raises(InputError, match="no \\*.safetensors or \\*.bin"):
        download.main("someone/empty", checkpoint_dir=tmp_path)


def test_help_lists_the_flags():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "download.py"), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in ("--repo_id", "--checkpoint_dir", "--access_token", "HF_TOKEN"))
