"""Exact and near-duplicate removal (MinHash + LSH) and n-gram decontamination, vectorised with numpy.

Texts are normalised (lower case, runs of anything but a-z0-9 become one space) and hashed word by word with a
polynomial rolling hash over the bytes, so a word n-gram's hash is O(1) from prefix sums and no Python loop runs per
word: a million rows take seconds, not hours. Hashes are deterministic (no Python `hash`), so the same input and seed
give the same files in every process.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_NON_WORD = re.compile(r"[^a-z0-9]+")
# bytes.translate instead of the regex: one C pass over the bytes; bytes other than a-z/0-9 (after lower()) become spaces;
# \x01 is kept as the document separator (and removed from the texts themselves first)
_TABLE = bytes(c if (48 <= c <= 57 or 97 <= c <= 122 or c == 1) else 32 for c in range(256))
_P, _Q = np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64
_P_INV, _Q_INV = np.uint64(pow(int(_P), -1, 1 << 64)), np.uint64(pow(int(_Q), -1, 1 << 64))
CHUNK = 4000  # documents hashed at once (bounds memory: ~8 arrays of 8 bytes per character)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    p = np.full(max(n, 0) + 1, base, dtype=np.uint64)
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)  # wraps modulo 2**64 on purpose


def _prefix(values: np.ndarray, base: np.uint64) -> Tuple[np.ndarray, np.ndarray]:
    prefix = np.zeros(len(values) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(values.astype(np.uint64) * _powers(base, len(values) - 1)[:len(values)], out=prefix[1:])
    return prefix, _powers(_P_INV if base == _P else _Q_INV, len(values))


def _range(prefix, inv, starts, ends) -> np.ndarray:
    """Hash of values[starts:ends], independent of where the range sits."""
    return (prefix[ends] - prefix[starts]) * inv[starts]


def normalize(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


@dataclass
class Words:
    hashes: np.ndarray   # uint64, one per word, all documents of the chunk in order
    doc: np.ndarray      # int64, the document of each word
    doc_hash: np.ndarray  # uint64, one per document: hash of its whole normalised text
    n_words: np.ndarray  # int64, per document
    prefix: Optional[Tuple[np.ndarray, np.ndarray]] = None  # word-level prefix hashes, computed once by shingles()


def hash_words(texts: Sequence[str]) -> Words:
    # non-ASCII letters become "?" and then spaces, like in normalize(); \x01 separates documents
    joined = "\x01".join(t.lower().replace("\x01", " ") for t in texts).encode("ascii", "replace").translate(_TABLE)
    b = np.frombuffer(joined, dtype=np.uint8)
    is_char = (b != 32) & (b != 1)
    prev = np.concatenate([[False], is_char[:-1]])
    nxt = np.concatenate([is_char[1:], [False]])
    starts, ends = np.flatnonzero(is_char & ~prev), np.flatnonzero(is_char & ~nxt) + 1
    prefix, inv = _prefix(b, _P)
    with np.errstate(over="ignore"):
        words = _mix(_range(prefix, inv, starts, ends))
    doc = np.searchsorted(np.flatnonzero(b == 1), starts)  # separators before a word = its document
    first_word = np.searchsorted(doc, np.arange(len(texts) + 1))
    wprefix, winv = _prefix(words, _Q)
    with np.errstate(over="ignore"):  # the whole text's hash from its words: whitespace and punctuation do not count
        doc_hash = _mix(_range(wprefix, winv, first_word[:-1], first_word[1:]))
    return Words(words, doc.astype(np.int64), doc_hash, np.diff(first_word).astype(np.int64), (wprefix, winv))


def shingles(words: Words, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of n consecutive words inside one document, and the document of each."""
    if len(words.hashes) < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if words.prefix is None:
        words.prefix = _prefix(words.hashes, _Q)
    prefix, inv = words.prefix
    starts = np.arange(len(words.hashes) - n + 1)
    same_doc = words.doc[starts] == words.doc[starts + n - 1]
    starts = starts[same_doc]
    with np.errstate(over="ignore"):
        return _mix(_range(prefix, inv, starts, starts + n) + np.uint64(n)), words.doc[starts]


# ------------------------------------------------------------------------------------------ dedup
def find_duplicates(texts: Sequence[str], near: bool = True, threshold: float = 0.8, ngram: int = 5,
                    num_perm: int = 32, bands: int = 8, seed: int = 0, progress=None) -> Dict[int, Tuple[str, int]]:
    """{index: ("exact" | "near", index of the earlier text it duplicates)}. Earlier texts win.
    Near duplicates: MinHash over word n-grams, LSH with `bands` bands of num_perm/bands rows for candidates, then
    the estimated Jaccard similarity (fraction of equal MinHash values) must reach `threshold`."""
    rng = np.random.default_rng(seed)
    salt = rng.integers(0, 2**63, dtype=np.uint64)
    doc_hashes = np.zeros(len(texts), np.uint64)
    sigs = np.zeros((len(texts), num_perm), np.uint64)
    for lo in range(0, len(texts), CHUNK):
        w = hash_words(texts[lo:lo + CHUNK])
        doc_hashes[lo:lo + len(w.doc_hash)] = w.doc_hash
        if near:
            sigs[lo:lo + len(w.doc_hash)] = _one_permutation_minhash(w, ngram, num_perm, salt)
        if progress:
            progress(min(CHUNK, len(texts) - lo))
    dups: Dict[int, Tuple[str, int]] = {}
    _, first, inverse = np.unique(doc_hashes, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    for i in np.flatnonzero(rep != np.arange(len(texts))):
        dups[int(i)] = ("exact", int(rep[i]))
    if near and len(texts):
        rows = num_perm // bands
        weights = rng.integers(1, 2**63, size=rows, dtype=np.uint64)
        for band in range(bands):
            with np.errstate(over="ignore"):
                bh = (sigs[:, band * rows:(band + 1) * rows] * weights).sum(axis=1, dtype=np.uint64)
            _, first, inverse = np.unique(bh, return_index=True, return_inverse=True)
            rep = first[inverse.reshape(-1)]
            cand = np.flatnonzero(rep != np.arange(len(texts)))
            if len(cand) == 0:
                continue
            similar = (sigs[cand] == sigs[rep[cand]]).mean(axis=1) >= threshold
            for i, r in zip(cand[similar], rep[cand][similar]):
                dups.setdefault(int(i), ("near", int(r)))
    return dups


def _one_permutation_minhash(w: Words, ngram: int, k: int, salt: np.uint64) -> np.ndarray:
    """One-permutation MinHash with rotation densification (Shrivastava 2017): each shingle hash falls into one of
    k bins and each bin keeps its minimum, one pass instead of k; an empty bin borrows from the next full one."""
    h, d = shingles(w, ngram)
    short = np.flatnonzero(w.n_words < ngram)  # too short for one n-gram: the whole text is its shingle
    h, d = np.concatenate([h, w.doc_hash[short]]), np.concatenate([d, short])
    with np.errstate(over="ignore"):
        h = _mix(h ^ salt)
    n_docs, full = len(w.doc_hash), np.iinfo(np.uint64).max
    sig = np.full(n_docs * k, full, dtype=np.uint64)
    np.minimum.at(sig, d * k + (h >> np.uint64(40)).astype(np.int64) % k, h)
    sig = np.concatenate([sig.reshape(n_docs, k)] * 2, axis=1)
    pos = np.where(sig != full, np.arange(2 * k), 2 * k)
    nearest = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1][:, :k]
    borrowed = np.take_along_axis(sig, np.minimum(nearest, 2 * k - 1), axis=1)
    with np.errstate(over="ignore"):
        return borrowed + (nearest - np.arange(k)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)


# ---------------------------------------------------------------------------------- decontamination
class EvalIndex:
    """Word n-grams of evaluation questions. A training text is contaminated when it shares an n-gram with a
    question; a question shorter than n words (but at least `min_words`) must appear whole. One pass per distinct
    length, with a bitmap in front of each sorted table, keeps this fast."""

    BITS = 1 << 24

    def __init__(self, questions: Sequence[Tuple[str, str]], ngram: int = 13, min_words: int = 8):
        self.ngram, self.questions = ngram, list(questions)  # (eval set name, question text)
        self.by_length: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        parts: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {n: [] for n in range(min(min_words, ngram), ngram + 1)}
        for lo in range(0, len(self.questions), CHUNK):
            w = hash_words([q for _, q in self.questions[lo:lo + CHUNK]])
            h, d = shingles(w, ngram)
            parts[ngram].append((h, d + lo))
            for length in range(min_words, ngram):
                whole = np.flatnonzero(w.n_words == length)
                if len(whole):
                    h, d = shingles(w, length)
                    keep = np.isin(d, whole)
                    parts[length].append((h[keep], d[keep] + lo))
        for length, chunks in parts.items():
            if not chunks or not sum(len(h) for h, _ in chunks):
                continue
            h, owner = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
            order = np.argsort(h, kind="stable")
            bitmap = np.zeros(self.BITS, dtype=bool)
            bitmap[(h & np.uint64(self.BITS - 1)).astype(np.int64)] = True
            self.by_length[length] = (h[order], owner[order], bitmap)

    def __len__(self) -> int:
        return len(self.questions)

    def find(self, texts: Sequence[str], progress=None) -> Dict[int, int]:
        """{index of a contaminated text: index of the evaluation question it overlaps}."""
        hits: Dict[int, int] = {}
        for lo in range(0, len(texts), CHUNK):
            w = hash_words(texts[lo:lo + CHUNK])
            for length, (table, owner, bitmap) in self.by_length.items():
                h, d = shingles(w, length)
                maybe = np.flatnonzero(bitmap[(h & np.uint64(self.BITS - 1)).astype(np.int64)])
                h, d = h[maybe], d[maybe]
                pos = np.clip(np.searchsorted(table, h), 0, len(table) - 1)
                found = table[pos] == h
                for doc, q in zip(d[found], owner[pos[found]]):
                    hits.setdefault(int(doc) + lo, int(q))
            if progress:
                progress(min(CHUNK, len(texts) - lo))
        return hits
