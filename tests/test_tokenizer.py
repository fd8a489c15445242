"""tokenizer.py against the libraries it wraps, on tiny tokenizers made here: Hugging Face tokenizer.json (checked with
transformers), sentencepiece tokenizer.model (checked with sentencepiece) and a Qwen-style qwen.tiktoken (checked with
tiktoken's own BPE)."""

import base64
import io
import json
import random

import pytest
import torch

from tokenizer import QWEN_PATTERN, QWEN_SPECIAL_TOKENS, Tokenizer, bytes_to_unicode, convert_tiktoken

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Numbers like 12, 345 and 6789 appear in text; so do dates such as 2023-10-01.",
    "café naïve résumé — über straße, 東京 and 北京 are cities.",
    "def main():\n    return [x * 2 for x in range(10)]\n",
    "I'm sure they'll say we've done what you'd expect, isn't it?",
] * 20

SAMPLES = [
    "Hello world",
    "The capital of France is Paris.",
    "naïve café — 東京 🤖👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "digits 1234567890, 3.14159 and 2024-01-01",
    "tabs\t\tand   spaces    \n\n\n  trailing  ",
    "  leading spaces",
    "I'M SHOUTING, don't you'LL see?",
    "",
]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


def check_token_texts(tok, ids):
    texts = tok.token_texts(ids)
    assert len(texts) == len(ids)
    assert "".join(texts) == tok.decode(ids)
    return texts


# ---- Hugging Face tokenizer.json -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_tok")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    hf.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
        # transformers writes special tokens either as strings or as AddedToken dicts
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    })
    return folder


def test_hf_tokenizer_matches_transformers(hf_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    tok = Tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert tok.use_bos and tok.vocab_size == len(ref)
    assert tok.chat_template.startswith("{% for m in messages %}")
    texts = SAMPLES + ["<|im_start|>user\nHi there<|im_end|>\n"]
    for text in texts:
        expected = [ref.bos_token_id] + ref.encode(text, add_special_tokens=False)
        ids = tok.encode(text)
        assert ids.dtype == torch.long and ids.tolist() == expected, text
        assert tok.decode(ids) == text  # the BOS that encode adds by default is not rendered
        assert tok.decode(ids[1:]) == ref.decode(expected[1:])
        check_token_texts(tok, ids)
    assert tok.encode_batch(texts, bos=False) == [ref.encode(t, add_special_tokens=False) for t in texts]
    assert tok.encode("Hello", bos=False, eos=True).tolist() == ref.encode("Hello", add_special_tokens=False) + [2]
    assert tok.encode("Hello world " * 20, max_length=5).shape == (5,)
    # a text that already starts with BOS (as chat templates write it) does not get a second one
    assert tok.encode("<s>Hello").tolist() == [1] + ref.encode("Hello", add_special_tokens=False)


def test_token_texts_split_multibyte_characters(hf_dir):
    tok = Tokenizer(hf_dir)
    text = "🤖 東京!"  # emoji and CJK are unknown to the tiny vocabulary: one token per UTF-8 byte
    ids = tok.encode(text, bos=False).tolist()
    texts = check_token_texts(tok, ids)
    assert len(ids) > len(text)
    # the character goes to the token holding its last byte; the tokens before get ''
    assert texts[:4] == ["", "", "", "🤖"]
    assert [t for t in texts if t] == list(text) or "".join(texts) == text
    # an incomplete character at the end decodes as U+FFFD in both decode and token_texts
    partial = ids[:2]
    assert "".join(tok.token_texts(partial)) == tok.decode(partial) == "\ufffd"


def test_special_ids_from_config_files(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    # only generation_config.json: ids, EOS as a list (Llama-3-Instruct style); no BOS added without add_bos_token
    write_json(tmp_path / "generation_config.json", {"bos_token_id": 3, "eos_token_id": [4, 0]})
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.use_bos) == (3, 4, False)
    assert tok.encode("Hello").tolist() == tok.encode("Hello", bos=False).tolist()
    # special_tokens_map.json wins over generation_config.json; tokenizer_config.json wins over both
    write_json(tmp_path / "special_tokens_map.json", {"bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    assert (Tokenizer(tmp_path).bos_id, Tokenizer(tmp_path).eos_id) == (1, 2)
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|im_end|>", "add_bos_token": False})
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.use_bos) == (1, 4, False)
    assert tok.chat_template is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer(tmp_path).chat_template == "{{ messages }}"


def test_missing_or_broken_tokenizer_is_one_line_input_error(tmp_path):
    from cli import InputError

    with pytest.raises(InputError) as e:
        Tokenizer(tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message
    assert all(name in message for name in ("tokenizer.json", "tokenizer.model", "qwen.tiktoken"))
    with pytest.raises(InputError, match="does not exist"):
        Tokenizer(tmp_path / "nope")
    for name, content in (("tokenizer.json", "{not json"), ("tokenizer.model", "not a sentencepiece model")):
        (tmp_path / name).write_text(content)
        with pytest.raises(InputError, match="not a readable tokenizer") as e:
            Tokenizer(tmp_path)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)
        (tmp_path / name).unlink()
    (tmp_path / "tokenizer_config.json").write_text("{")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer(tmp_path)


# ---- sentencepiece tokenizer.model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp_tok")
    model = io.BytesIO()
    # Llama-style: BPE with byte fallback, <unk>=0 <s>=1 </s>=2
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                   minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def test_sentencepiece_matches_reference(sp_dir):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer(sp_dir)
    assert tok.backend == "sentencepiece"
    # no config files: the model's own ids; BOS only when asked for
    assert (tok.bos_id, tok.eos_id, tok.use_bos, tok.vocab_size) == (1, 2, False, ref.vocab_size())
    for text in SAMPLES:
        ids = tok.encode(text, bos=True, eos=True).tolist()
        assert ids == [1] + ref.encode(text) + [2], text
        assert tok.decode(ids) == ref.decode(ids)
        texts = check_token_texts(tok, ids)
        assert texts[0] == texts[-1] == ""  # control tokens decode to nothing
    assert tok.encode_batch(SAMPLES) == [ref.encode(t) for t in SAMPLES]
    # sentencepiece's leading '▁' reads as a space inside the text, and not at its start
    ids = tok.encode("the fox").tolist()
    texts = check_token_texts(tok, ids)
    assert texts[0].startswith("t") and any(t.startswith(" ") for t in texts[1:])
    # byte fallback: the emoji is four <0x..> pieces and belongs to the last one
    ids = tok.encode("a🤖").tolist()
    texts = check_token_texts(tok, ids)
    assert texts[-4:] == ["", "", "", "🤖"]


def test_sentencepiece_config_files(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                    "eos_token": {"content": "</s>"}})
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.use_bos) == (1, 2, True)  # Llama tokenizers add BOS by default
    ids = tok.encode("Hello world")
    assert ids[0].item() == 1 and tok.decode(ids) == "Hello world"
    assert "".join(tok.token_texts(ids)) == "Hello world"


# ---- first-generation Qwen: qwen.tiktoken ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory):
    """A tiktoken vocabulary whose ranks follow the merge order of a byte-level BPE trained here."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    model = json.loads(hf.to_str())["model"]
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    as_bytes = lambda s: bytes(to_byte[c] for c in s)
    ranks = {bytes([b]): b for b in range(256)}
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        ranks.setdefault(as_bytes(left) + as_bytes(right), len(ranks))
    folder = tmp_path_factory.mktemp("qwen_tok")
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (folder / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    write_json(folder / "generation_config.json", {"eos_token_id": len(ranks)})  # Qwen's: <|endoftext|>
    return folder, ranks


def tiktoken_reference(ranks):
    tiktoken = pytest.importorskip("tiktoken")
    specials = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen-test", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_tiktoken_matches_tiktoken(tiktoken_dir, tmp_path):
    folder, ranks = tiktoken_dir
    ref = tiktoken_reference(ranks)
    texts = SAMPLES + ["<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n", "x<|extra_3|>y",
                       "  \n\n  multiple   lines\r\n\tend", "ABC abc AbC 'S 'll", "x" * 300]
    tok = Tokenizer(folder)  # converted in memory: the folder has no tokenizer.json yet
    assert not (folder / "tokenizer.json").exists()
    assert tok.eos_id == len(ranks) == tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<|im_end|>") == len(ranks) + 2
    assert tok.vocab_size == len(ranks) + len(QWEN_SPECIAL_TOKENS)
    assert not tok.use_bos and tok.bos_id is None
    for text in texts:
        ids = tok.encode(text).tolist()
        assert ids == ref.encode(text, allowed_special="all"), text
        assert tok.decode(ids) == text
        check_token_texts(tok, ids)

    # random strings over the corpus' characters and words: merge order and whole-piece lookups must agree
    rng = random.Random(0)
    chars, words = sorted(set("".join(CORPUS))), " ".join(CORPUS).split(" ")
    for _ in range(200):
        text = "".join(rng.choice(chars) if rng.random() < 0.3 else " " + rng.choice(words) for _ in range(12))
        assert tok.encode(text).tolist() == ref.encode(text, allowed_special="all"), text

    # converted once to tokenizer.json, then loaded by `tokenizers` alone
    converted = tmp_path / "converted"
    converted.mkdir()
    for name in ("qwen.tiktoken", "generation_config.json"):
        (converted / name).write_bytes((folder / name).read_bytes())
    convert_tiktoken(converted)
    tok2 = Tokenizer(converted)
    assert tok2.eos_id == len(ranks)
    assert tok2.encode_batch(texts) == [ref.encode(t, allowed_special="all") for t in texts]


def test_bad_tiktoken_line(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-base64!\n")
    with pytest.raises(ValueError, match=r"qwen\.tiktoken:2: expected"):
        Tokenizer(tmp_path)


def test_token_texts_exact_fallback_agrees(hf_dir, sp_dir, monkeypatch):
    """The quadratic prefix-decoding fallback (used when a decoder is not understood) splits text the same way."""
    import tokenizer

    cases = [(Tokenizer(hf_dir), "🤖 東京! naïve"), (Tokenizer(sp_dir), "the fox 🤖 naïve")]
    fast = [tok.token_texts(tok.encode(text, bos=True)) for tok, text in cases]
    monkeypatch.setattr(tokenizer, "_texts_from_bytes", lambda token_bytes: None)
    slow = [tok.token_texts(tok.encode(text, bos=True)) for tok, text in cases]
    assert slow == fast


def test_tiktoken_whole_piece_rule(tmp_path):
    """tiktoken takes a pre-token that is in the vocabulary whole, even where pairwise merges cannot reach it."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"bc", b"ab", b"cd", b"abcd"):  # merging b+c first leaves a|bc|d, which merges no further
        ranks[token] = len(ranks)
    (tmp_path / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    ref = tiktoken_reference(ranks)
    tok = Tokenizer(tmp_path)
    for text in ("abcd", "xabcd", "abc", "bcd abcd"):
        assert tok.encode(text).tolist() == ref.encode(text), text
    assert tok.encode("abcd").tolist() == [ranks[b"abcd"]]
