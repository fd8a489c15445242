"""The tokenizer of a checkpoint folder: Hugging Face `tokenizer.json`, sentencepiece `tokenizer.model`, or
first-generation Qwen's `qwen.tiktoken` (converted to a byte-level BPE `tokenizer.json`, so runtime needs only the
`tokenizers` package).

BOS/EOS and whether BOS is added come from the checkpoint's own tokenizer_config.json / special_tokens_map.json /
generation_config.json, never from a guess per family.
"""

import base64
import codecs
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from tokenizers import Tokenizer as HFTokenizer

from cli import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "qwen.tiktoken")

# First-generation Qwen (tokenization_qwen.py): the pre-tokenizer regex and the special tokens that follow the
# mergeable ranks (151,643 of them in Qwen-7B/14B), in this order.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))


class Tokenizer:
    def __init__(self, checkpoint_dir: Union[Path, str]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise InputError(f"{checkpoint_dir}: tokenizer folder does not exist")
        self.checkpoint_dir = checkpoint_dir
        config = _read_json(checkpoint_dir / "tokenizer_config.json")
        special_map = _read_json(checkpoint_dir / "special_tokens_map.json")
        generation = _read_json(checkpoint_dir / "generation_config.json")

        file = next((checkpoint_dir / f for f in TOKENIZER_FILES if (checkpoint_dir / f).is_file()), None)
        if file is None:
            raise InputError(f"{checkpoint_dir}: no tokenizer file; looked for {', '.join(TOKENIZER_FILES)}")
        if file.name == "tokenizer.model":
            import sentencepiece  # imported only for such checkpoints, outside the try: a missing package is no bad file
        try:
            if file.name == "tokenizer.json":
                self.backend, self.processor = "huggingface", HFTokenizer.from_file(str(file))
            elif file.name == "tokenizer.model":
                self.backend = "sentencepiece"
                self.processor = sentencepiece.SentencePieceProcessor(model_file=str(file))
            else:  # Converters write tokenizer.json next to it; converting here keeps an unconverted folder usable.
                self.backend, self.processor = "huggingface", tiktoken_to_hf_tokenizer(file)
        except InputError:
            raise
        except Exception as e:  # each library raises its own types (Exception, RuntimeError, OSError) on a bad file
            raise InputError(f"{file}: not a readable tokenizer ({type(e).__name__}: {e}); download it again") from None

        self.bos_id = self._special_id("bos", config, special_map, generation)
        self.eos_id = self._special_id("eos", config, special_map, generation)
        self.use_bos = self._use_bos(config)
        self.chat_template = _chat_template(checkpoint_dir, config)
        self._piece_bytes: Optional[List[bytes]] = None

    @property
    def vocab_size(self) -> int:
        if self.backend == "huggingface":
            return self.processor.get_vocab_size(with_added_tokens=True)
        return self.processor.vocab_size()

    def fingerprint(self) -> str:
        """Which token ids this tokenizer produces, whatever file it is stored in: a hash of its vocabulary size,
        BOS/EOS ids and the ids of a probe text. prepare_data records it; finetune/lora.py compares it with the
        checkpoint's, because ids from another tokenizer train silently on nonsense."""
        import hashlib

        probe = "The quick brown fox, 1234 ünïcode 東京 \n\t  <|im_start|> </s> {\"x\": [1.5e-3]}"
        blob = json.dumps([self.vocab_size, self.bos_id, self.eos_id, self.use_bos, self._encode_plain([probe])[0]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def token_to_id(self, token: str) -> Optional[int]:
        if self.backend == "huggingface":
            return self.processor.token_to_id(token)
        id_ = self.processor.piece_to_id(token)
        return None if id_ == self.processor.unk_id() and token != self.processor.id_to_piece(id_) else id_

    def _special_id(self, kind: str, config: dict, special_map: dict, generation: dict) -> Optional[int]:
        # The token string in tokenizer_config.json / special_tokens_map.json names it; generation_config.json
        # gives ids; sentencepiece models carry their own as a last resort.
        for source in (config, special_map):
            token = _token_content(source.get(f"{kind}_token"))
            if token is not None and self.token_to_id(token) is not None:
                return self.token_to_id(token)
        id_ = generation.get(f"{kind}_token_id")
        if isinstance(id_, list):  # e.g. Llama-3-Instruct lists several EOS ids; the first is the canonical one
            id_ = id_[0] if id_ else None
        if id_ is not None:
            return int(id_)
        if self.backend == "sentencepiece":
            id_ = self.processor.bos_id() if kind == "bos" else self.processor.eos_id()
            return id_ if id_ >= 0 else None
        return None

    def _use_bos(self, config: dict) -> bool:
        if "add_bos_token" in config:
            return bool(config["add_bos_token"]) and self.bos_id is not None
        if self.bos_id is None:
            return False
        # Llama tokenizers add BOS without saying so in tokenizer_config.json (transformers' LlamaTokenizer default).
        if "llama" in str(config.get("tokenizer_class", "")).lower():
            return True
        if self.backend == "huggingface":
            # Llama-3 style tokenizer.json files add BOS through their post-processor.
            return self.bos_id in _post_processor_prefix_ids(_component_json(self.processor.post_processor))
        return False

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """Token ids of `text` (1-D LongTensor). bos=None follows the tokenizer's own add_bos_token setting; BOS is
        not added twice when the text already starts with it (chat templates often write it). max_length > 0 keeps
        the first max_length ids."""
        return torch.tensor(self._finish(self._encode_plain([text])[0], bos, eos, max_length), dtype=torch.long)

    def encode_batch(self, texts: List[str], bos: Optional[bool] = None, eos: bool = False) -> List[List[int]]:
        return [self._finish(ids, bos, eos, -1) for ids in self._encode_plain(list(texts))]

    def _encode_plain(self, texts: List[str]) -> List[List[int]]:
        if self.backend == "huggingface":
            return [e.ids for e in self.processor.encode_batch(texts, add_special_tokens=False)]
        return self.processor.encode(texts)

    def _finish(self, ids: List[int], bos: Optional[bool], eos: bool, max_length: int) -> List[int]:
        if self.use_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"{self.checkpoint_dir}: BOS requested but the tokenizer defines no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.checkpoint_dir}: EOS requested but the tokenizer defines no EOS token")
            ids = ids + [self.eos_id]
        return ids[:max_length] if max_length > 0 else ids

    def decode(self, ids) -> str:
        """Text of `ids`, so that decode(encode(text)) == text. Special tokens of a tokenizer.json (e.g. <|im_start|>)
        are kept as text, so chat-formatted text round-trips, except a leading BOS when encode adds one by default
        (use_bos); sentencepiece drops its control tokens (<s>, </s>) as sentencepiece itself does."""
        ids = _as_list(ids)
        return self._decode_raw(ids[1:] if self._skips_first(ids) else ids)

    def _decode_raw(self, ids: List[int]) -> str:
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=False)
        return self.processor.decode(ids)

    def _skips_first(self, ids: List[int]) -> bool:
        return self.use_bos and bool(ids) and ids[0] == self.bos_id

    def token_texts(self, ids) -> List[str]:
        """The text each token contributes, such that "".join(token_texts(ids)) == decode(ids).

        A character whose UTF-8 bytes are split over several byte-level tokens belongs to the token that completes
        it; the earlier tokens get ''. Sentencepiece's '▁' reads as a space, except the one the decoder strips at
        the start of the text."""
        ids = _as_list(ids)
        if self._skips_first(ids):
            return [""] + self._token_texts_raw(ids[1:])
        return self._token_texts_raw(ids)

    def _token_texts_raw(self, ids: List[int]) -> List[str]:
        full = self._decode_raw(ids)
        texts = _texts_from_bytes([self._token_bytes(i) for i in ids])
        if texts is not None:
            joined = "".join(texts)
            if joined == full:
                return texts
            if joined.startswith(" ") and joined[1:] == full:  # the decoder stripped the dummy-prefix space
                first = next(k for k, t in enumerate(texts) if t)
                texts[first] = texts[first][1:]
                return texts
        return self._token_texts_by_prefix(ids, full)

    def _token_bytes(self, id_: int) -> bytes:
        if self._piece_bytes is None:
            self._piece_bytes = self._all_piece_bytes()
        return self._piece_bytes[id_] if 0 <= id_ < len(self._piece_bytes) else b""

    def _all_piece_bytes(self) -> List[bytes]:
        """The bytes each vocabulary entry stands for, following the decoder: byte-level BPE alphabet, byte-fallback
        pieces <0xNN>, or '▁' as a space."""
        if self.backend == "huggingface":
            pieces = [self.processor.id_to_token(i) or "" for i in range(self.vocab_size)]
            byte_level = '"ByteLevel"' in json.dumps(_component_json(self.processor.decoder))
        else:
            pieces = [self.processor.id_to_piece(i) for i in range(self.vocab_size)]
            byte_level = False
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        out = []
        for i, piece in enumerate(pieces):
            if self.backend == "sentencepiece" and (self.processor.is_control(i) or self.processor.is_unknown(i)):
                out.append(b"")  # control tokens decode to nothing; <unk> is left to the exact fallback
            elif byte_level and all(c in byte_decoder for c in piece):
                out.append(bytes(byte_decoder[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def _token_texts_by_prefix(self, ids: List[int], full: str) -> List[str]:
        """Exact but quadratic: token i ends where decode(ids[:i+1]) stops agreeing with decode(ids)."""
        texts, end = [], 0
        for i in range(len(ids)):
            prefix = self._decode_raw(ids[: i + 1]) if i + 1 < len(ids) else full
            common = end if prefix.startswith(full[:end]) else 0  # usually: only the new part needs comparing
            for a, b in zip(prefix[common:], full[common:]):
                if a != b:
                    break
                common += 1
            new_end = max(end, common)
            texts.append(full[end:new_end])
            end = new_end
        if texts:
            texts[-1] += full[end:]
        return texts


def _texts_from_bytes(token_bytes: List[bytes]) -> Optional[List[str]]:
    """Per-token text from per-token bytes; None when the bytes are not valid UTF-8 as a whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    texts = []
    try:
        for b in token_bytes:
            texts.append(decoder.decode(b))
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    return texts


def _component_json(component) -> dict:
    """A tokenizers pre-tokenizer/decoder/post-processor as its JSON dict ({} when absent)."""
    return json.loads(component.__getstate__()) if component is not None else {}


def _as_list(ids) -> List[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); download the file again") from None


def _token_content(token) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(checkpoint_dir: Path, config: dict) -> Optional[str]:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (checkpoint_dir / "chat_template.jinja").is_file():  # transformers >= 4.43 layout
        template = (checkpoint_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(checkpoint_dir / "chat_template.json").get("chat_template")
    return template


def _post_processor_prefix_ids(post: dict) -> List[int]:
    """Ids a TemplateProcessing post-processor puts before a single sequence (possibly inside a Sequence)."""
    if post.get("type") == "Sequence":
        return [i for p in post.get("processors", []) for i in _post_processor_prefix_ids(p)]
    if post.get("type") != "TemplateProcessing":
        return []
    ids = []
    for item in post.get("single", []):
        if "Sequence" in item:
            break
        name = item.get("SpecialToken", {}).get("id")
        ids.extend(post.get("special_tokens", {}).get(name, {}).get("ids", []))
    return ids


# ---- byte-level BPE helpers shared with the converters ----------------------------------------------------------


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_tiktoken(path: Path) -> Dict[bytes, int]:
    """A tiktoken vocabulary file: one `base64(token) rank` per line."""
    ranks = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise InputError(f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    return ranks


def merges_from_ranks(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """BPE merges that reproduce tiktoken's rank-ordered merging: every split of a token into two known tokens,
    ordered by the rank of the merged token (as transformers' TikTokenConverter does)."""
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda m: m[0])
    return [(left, right) for _, left, right in merges]


def byte_level_bpe_json(vocab: Dict[str, int], merges: List[Tuple[str, str]], special_tokens: Dict[str, int],
                        split_pattern: Optional[str], individual_digits: bool = False,
                        ignore_merges: bool = False) -> dict:
    """A tokenizer.json (as a dict) for byte-level BPE: optional regex split (Qwen) or digit split (SmolLM2), then
    the byte-level alphabet without a prefix space. ignore_merges: a pre-token found whole in the vocabulary is one
    token (tiktoken's rule, and Llama-3's)."""
    pre = []
    if individual_digits:
        pre.append({"type": "Digits", "individual_digits": True})
    if split_pattern is not None:
        pre.append({"type": "Split", "pattern": {"Regex": split_pattern}, "behavior": "Isolated", "invert": False})
    pre.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": split_pattern is None})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for t, i in sorted(special_tokens.items(), key=lambda x: x[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


def tiktoken_to_tokenizer_json(path: Path, special_tokens=QWEN_SPECIAL_TOKENS, pattern: str = QWEN_PATTERN) -> dict:
    """First-generation Qwen's qwen.tiktoken as a byte-level BPE tokenizer.json dict; specials follow the ranks."""
    ranks = read_tiktoken(path)
    to_str = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(to_str[b] for b in token)

    vocab = {as_text(t): r for t, r in ranks.items()}
    merges = [(as_text(a), as_text(b)) for a, b in merges_from_ranks(ranks)]
    start = max(ranks.values()) + 1
    specials = {t: start + i for i, t in enumerate(special_tokens)}
    return byte_level_bpe_json(vocab, merges, specials, pattern, ignore_merges=True)


def tiktoken_to_hf_tokenizer(path: Path):
    return HFTokenizer.from_str(json.dumps(tiktoken_to_tokenizer_json(path)))


def convert_tiktoken(checkpoint_dir: Path) -> Path:
    """Writes tokenizer.json next to qwen.tiktoken (once), so loading the folder needs only `tokenizers`.

    Also fills in tokenizer_config.json's EOS (<|endoftext|>, as Qwen's generation_config.json says) when absent."""
    checkpoint_dir = Path(checkpoint_dir)
    out = checkpoint_dir / "tokenizer.json"
    out.write_text(json.dumps(tiktoken_to_tokenizer_json(checkpoint_dir / "qwen.tiktoken"), ensure_ascii=False),
                   encoding="utf-8")
    config_path = checkpoint_dir / "tokenizer_config.json"
    config = _read_json(config_path)
    config.setdefault("eos_token", "<|endoftext|>")
    config.setdefault("add_bos_token", False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
