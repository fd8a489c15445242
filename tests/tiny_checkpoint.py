"""A tiny random checkpoint folder (model_config.json, oneday/weights.safetensors, tokenizer.json + configs) for
server and evaluation tests: byte-level BPE trained in a blink on a few sentences, a 2-layer GQA decoder with peaked
logits."""

import json
from pathlib import Path
from typing import Optional

import torch

from model import GPT, Config
from utils import model_state_to_save, save_safetensors, weight_names

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: B",
    "The following are multiple choice questions (with answers) about anatomy.",
    "Summarize the above article in 1 sentence.\n###\nArticle: ",
    "Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA: 3 + 4 = 7. The answer is 7.",
    "naïve café — ünïcödé 東京 🙂",
]


def make_tokenizer_files(folder: Path, bos: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_tiny_checkpoint(folder: Path, bos: bool = False, seed: int = 0, prompt_style: Optional[str] = None,
                         **config_overrides) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer_files(folder, bos=bos)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config = Config(**{**dict(name="tiny", block_size=256, vocab_size=vocab, n_layer=3, n_head=4, n_query_groups=2,
                              n_embd=32, intermediate_size=64, tie_embeddings=False), **config_overrides})
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # peaked next-token distributions: greedy choices are far from ties
    config.to_json(folder / "model_config.json")
    (weights,) = weight_names(1)
    (folder / weights).parent.mkdir(exist_ok=True)
    save_safetensors(model_state_to_save(model.state_dict(), config), folder / weights)
    if prompt_style is not None:
        from prompts import save_style

        save_style(folder, prompt_style)
    return folder
