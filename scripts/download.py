"""Download a model's weights and tokenizer from the Hugging Face hub into checkpoints/<repo_id>.

    python scripts/download.py --repo_id mistralai/Mistral-7B-v0.1
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/mistralai/Mistral-7B-v0.1

Only what the converter needs: safetensors weights (pytorch .bin only when the repo has no safetensors), the configs
and the tokenizer files. The converter writes its own files beside them (model_config.json, oneday/) and leaves these
as downloaded, so transformers and vLLM load the same folder. Gated models (Llama 2, ...) need an access token:
`export HF_TOKEN=hf_...`.
"""

import fnmatch
import os
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from huggingface_hub import list_repo_files, snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

from cli import InputError

TOKENIZER_AND_CONFIG = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                        "*.tiktoken"]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
PYTORCH_BIN = ["*.bin", "*.bin.index.json"]
# Weights the converter never reads: original-format copies (Mistral's consolidated.*), training leftovers.
SKIP = ["consolidated*", "training_args.bin", "optimizer*", "*adapter_model*"]


def main(repo_id: str, checkpoint_dir: Path = Path("checkpoints"), access_token: Optional[str] = None,
         tokenizer_only: bool = False) -> Path:
    """Download one model repository.

    Args:
        repo_id: The hub repository, e.g. mistralai/Mistral-7B-v0.1.
        checkpoint_dir: Parent folder; the files land in <checkpoint_dir>/<repo_id>.
        access_token: Hugging Face token for gated or private repos; defaults to the HF_TOKEN environment variable.
        tokenizer_only: Fetch the configs and tokenizer files but no weights.
    """
    token = access_token or os.getenv("HF_TOKEN")
    try:
        files = list_repo_files(repo_id, token=token)
        patterns = files_to_fetch(files, tokenizer_only)
        out = Path(checkpoint_dir) / repo_id
        print(f"Downloading {len(patterns)} files of {repo_id} into {out}: {', '.join(patterns)}")
        snapshot_download(repo_id, local_dir=out, allow_patterns=patterns, token=token)
    except GatedRepoError:
        how = ("your token has no access to it yet" if token else "set HF_TOKEN (export HF_TOKEN=hf_...) or pass "
               "--access_token")
        raise InputError(f"{repo_id} is a gated model: accept its license on https://huggingface.co/{repo_id} "
                         f"and {how}") from None
    except RepositoryNotFoundError:
        hint = "" if token else " (for a private repo set HF_TOKEN)"
        raise InputError(f"repository {repo_id!r} not found on the Hugging Face hub; check the name{hint}") from None
    except HFValidationError as e:
        raise InputError(f"--repo_id {repo_id!r}: not a hub repository name ({e}); use ORG/NAME") from None
    print(f"Done. Next: python scripts/convert_hf_checkpoint.py --checkpoint_dir {out}")
    return out


def files_to_fetch(files: List[str], tokenizer_only: bool = False) -> List[str]:
    """Names to pass as allow_patterns: top-level files only (subfolders hold other formats, e.g. onnx/ or
    original/), safetensors preferred over pytorch .bin."""
    top = [f for f in files if "/" not in f and not any(fnmatch.fnmatch(f, p) for p in SKIP)]
    wanted = [f for f in top if any(fnmatch.fnmatch(f, p) for p in TOKENIZER_AND_CONFIG)]
    if not tokenizer_only:
        weights = [f for f in top if any(fnmatch.fnmatch(f, p) for p in SAFETENSORS)]
        if not any(f.endswith(".safetensors") for f in weights):
            weights = [f for f in top if any(fnmatch.fnmatch(f, p) for p in PYTORCH_BIN)]
        if not weights:
            raise InputError(f"no *.safetensors or *.bin weights at the top of the repository (files: "
                             f"{', '.join(files[:8])}{' ...' if len(files) > 8 else ''})")
        wanted += weights
    return sorted(wanted)


if __name__ == "__main__":
    from cli import run

    run(main)
