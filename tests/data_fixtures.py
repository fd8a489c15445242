"""Fixtures for the data tests: a tiny byte-level BPE tokenizer folder, and writers for each source's real format."""
import json
import random
from pathlib import Path

WORDS = ("the a of and to in is was for on with as by at from that this it be are or an which one two three "
         "question answer instruction response input what who when where why how summarize article capital "
         "france paris city river number plus minus equals cat dog bird red blue green").split()


def tiny_tokenizer_dir(folder: Path, bos: bool = True) -> Path:
    """A checkpoint-like folder with a real tokenizer.json (byte-level BPE trained on a few sentences) and
    tokenizer_config.json naming BOS/EOS, loadable by tokenizer.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["### Instruction:\n### Response:\n### Input:\n"]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": bos}))
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def dolly_file(path: Path, n: int, seed: int = 0, tag: str = "", start: int = 0) -> Path:
    rng = random.Random(seed)
    return write_jsonl(path, [{"instruction": f"{sentence(rng, 12)} item{start + i}{tag}", "context": "",
                               "response": sentence(rng, 15), "category": "open_qa"} for i in range(n)])


def small_recipe(sources, **kw) -> dict:
    """A checked recipe without decontamination or a val split, for the tests' small files."""
    from prepare_data.prepare_mix import check_recipe

    return check_recipe({"name": "t", "max_seq_length": 256, "val_size": 0, "decontaminate": False,
                         "sources": sources, **kw})
