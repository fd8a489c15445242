"""The logic every prepare_data script shares: finding and reading source files, the common row schema, error
reporting, tokenization with loss masks and truncation. The data folder's format (what finetune/lora.py reads) is
data.py's: save_split and save_meta write it.

A bad file, folder or column raises `cli.InputError` (one line naming it, no traceback); a bad record inside a good
file is only skipped and counted.

A row is `{"messages": [{"role": "user", "content": ..., "input": ...}, {"role": "assistant", "content": ...}, ...]}`
(optionally with `"system"`). Source scripts turn their dataset's records into rows through `collect`, raising
`Malformed` for a record that cannot be used: it is skipped and counted, and the report shows the first few.
"""
import csv
import fnmatch
import glob
import gzip
import json
import random
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from cli import InputError
from data import read_json  # noqa: F401  (one JSON reader for the whole repository; the source scripts import it here)

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 5  # malformed / removed rows shown in the report, per source and reason
csv.field_size_limit(sys.maxsize)


class Malformed(ValueError):
    """A record that cannot become a row (empty field, wrong type, broken JSON line): skipped and counted."""


@dataclass
class SourceRows:
    """The rows a source produced, with what was skipped and why (reason -> count, and the first few examples)."""
    name: str
    rows: List[dict] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    read: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def merge(self, other: "SourceRows") -> None:
        self.read += other.read
        self.rows += other.rows
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            shown = self.examples.setdefault(reason, [])
            shown += other.examples.get(reason, [])[:MAX_EXAMPLES - len(shown)]

    def drop(self, reason: str, where: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES and where:
            shown.append(where)

    def require_rows(self, where: str) -> "SourceRows":
        if not self.rows:
            raise InputError(f"{where}: source {self.name!r} produced no rows from {self.read:,} records "
                             f"({drop_reasons(self.dropped, self.examples)}); check its data file and options")
        return self


def drop_reasons(dropped: Dict[str, int], examples: Dict[str, List[str]], n: int = 3) -> str:
    """The commonest reasons rows were skipped, each with its first example: the report's list, in one line."""
    top = sorted(dropped.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join(f"{reason}: {count:,}" + (f" (e.g. {examples[reason][0]})" if examples.get(reason) else "")
                     for reason, count in top) or "none was skipped"


# ----------------------------------------------------------------------------------------------- rows
def text_field(record: dict, key: str, required: bool = True) -> str:
    """A string field of a record, stripped. Missing/empty/non-string -> Malformed (if required) or ""."""
    value = record.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (CSV/Parquet gaps)
        value = ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Malformed(f"field {key!r} is {type(value).__name__}, expected text")
    value = value.strip()
    if required and not value:
        raise Malformed(f"empty {key!r}")
    return value


def instruction_row(instruction: str, output: str, input: str = "", system: str = "") -> dict:
    if not instruction.strip():
        raise Malformed("empty instruction")
    if not output.strip():
        raise Malformed("empty response")
    row = {"messages": [{"role": "user", "content": instruction.strip(), "input": input.strip()},
                        {"role": "assistant", "content": output.strip()}]}
    if system:
        row["system"] = system
    return row


def chat_row(turns: Sequence[str], system: str = "") -> dict:
    """Alternating user/assistant texts (user first) -> row. A trailing user turn without a reply is dropped."""
    turns = list(turns)
    if len(turns) % 2:
        turns = turns[:-1]
    if len(turns) < 2:
        raise Malformed("conversation has no user/assistant pair")
    messages = []
    for i, text in enumerate(turns):
        if not isinstance(text, str) or not text.strip():
            raise Malformed(f"turn {i} is empty or not text")
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text.strip()})
    row = {"messages": messages}
    if system:
        row["system"] = system
    return row


def multiple_choice(question: str, choices: Sequence[str], letters: str = "ABCDEFGHIJ") -> str:
    """HELM-style multiple-choice prompt: the question, then 'A. choice' lines, then 'Answer:'."""
    lines = [question.strip()] + [f"{letters[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def row_text(row: dict) -> str:
    """All the words of a row (system, turns, inputs): what filters, dedup and decontamination look at."""
    parts = [row.get("system", "")]
    for m in row["messages"]:
        parts += [m["content"], m.get("input", "")]
    return "\n".join(p for p in parts if p)


def dedup_text(row: dict) -> str:
    """What makes a row itself: a user turn's input when it has one (a task definition shared by thousands of
    Natural Instructions / FLAN rows would otherwise make them all near-duplicates), else its text; and the replies."""
    parts = [m.get("input") or m["content"] for m in row["messages"]]
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------- files
SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")
DataFile = Optional[Union[Path, List[Path]]]  # a file, a folder of supported files, a glob, or a list of those


def bigbench_missing(path, task: str, alternative: str = "") -> str:
    """What to do when BIG-bench task files are absent: the PyPI sdist that shipped them is no longer served."""
    return (f"BIG-bench task files {task} not found at {path}: the bigbench PyPI package that shipped them "
            f"is no longer served; copy github.com/google/BIG-bench's bigbench/benchmark_tasks/{task} to {path}"
            + (f", or {alternative}" if alternative else ""))


def hub_files(repo_id: str, patterns: Union[str, Sequence[str]], revision: Optional[str] = None,
              fix: str = "download the files yourself and give data_file") -> List[Path]:
    """Download a dataset's real files from the Hugging Face hub (cached by huggingface_hub) matching the patterns."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    try:
        from huggingface_hub import HfApi, hf_hub_download

        names = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision)
    except Exception as e:  # offline, gated (LIMA: accept its terms and `huggingface-cli login`), renamed...
        raise InputError(f"could not download {patterns} from hub dataset {repo_id} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})" + (f"; {fix}" if fix else "")) from None
    wanted = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))
    if not wanted:
        raise InputError(f"hub dataset {repo_id}: no file matches {patterns}; files are {names[:20]}")
    print(f"downloading {len(wanted)} file(s) from hub dataset {repo_id}", file=sys.stderr)
    return [Path(hf_hub_download(repo_id, n, repo_type="dataset", revision=revision)) for n in wanted]


def _supported_files(p: Path) -> List[Path]:
    if p.is_file():
        return [p]
    return sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith(SUPPORTED))


def resolve_files(data_file: DataFile, repo_id: Optional[str], patterns) -> List[Path]:
    """`data_file` (a file, a folder of supported files, a glob, or a list of those) or else the hub files."""
    if data_file is None or data_file == "":
        if repo_id is None:
            raise InputError("this source has no copy on the hub: give data_file")
        return hub_files(repo_id, patterns)
    out: List[Path] = []
    for item in [data_file] if isinstance(data_file, (str, Path)) else data_file:
        p = Path(item).expanduser()
        if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
            p = REPO_ROOT / p
        if p.exists():
            found = _supported_files(p)
        elif any(c in str(item) for c in "*?["):
            matches = sorted(glob.glob(str(p))) or sorted(glob.glob(str(REPO_ROOT / p)))
            if not matches:
                raise InputError(f"data file {item}: the pattern matches nothing; check the path")
            found = [f for m in matches for f in _supported_files(Path(m))]
        elif "bigbench" in p.parts:  # data/assets/bigbench/<task>, filled by hand since the PyPI sdist is gone
            task = "/".join(p.parts[p.parts.index("bigbench") + 1:])
            raise InputError(bigbench_missing(item if task else f"{item}/<task>", task or "<task>",
                                              repo_id and f"leave data_file out to download {repo_id} from the hub"))
        else:
            raise InputError(f"data file {item} not found; check the path")
        if not found:
            raise InputError(f"data file {item}: no {'/'.join(SUPPORTED)} file there; "
                             "point data_file at the data itself")
        out += found
    return out


def _lines(path: Path) -> Iterator[str]:
    """The lines of a text file (gzip-compressed if it ends in .gz), with one clear error for bytes that
    are not UTF-8."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            offset = 0
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    fix = f"it is gzip-compressed: name it {path.name}.gz" if raw.startswith(b"\x1f\x8b") else \
                        "re-save the file as UTF-8"
                    raise InputError(f"{path}: line {i} (byte {offset + e.start}) is not UTF-8 text; {fix}") from None
                offset += len(raw)
                yield line.removeprefix("\ufeff") if i == 1 else line  # a byte order mark (Excel) is not data
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip file ({e}); decompress it or download it again") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; check the path") from None


def read_text(path: Path) -> str:
    return "".join(_lines(Path(path)))


def read_records(path: Path, list_key: Optional[str] = None) -> Iterator[Tuple[int, Union[dict, Malformed]]]:
    """Yield (row number from 1, record) for JSONL, JSON (a list, or the list under `list_key`), CSV/TSV or Parquet.
    A line that is not valid JSON comes back as a Malformed instead of a record.
    A file without any record is an error."""
    n = 0
    for n, record in enumerate(_records(path, path.name.removesuffix(".gz"), list_key), 1):
        yield record
    if n == 0:
        raise InputError(f"{path}: no records in this file (empty, a header only, or an empty list); "
                         f"check that it is the right file")


def _records(path: Path, name: str, list_key: Optional[str]):
    if name.endswith(".jsonl"):
        for i, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, Malformed(f"invalid JSON ({e.msg})")
                continue
            yield i, record if isinstance(record, dict) else Malformed("line is not a JSON object")
    elif name.endswith(".json"):
        data = read_json(path)
        if isinstance(data, dict):
            key = list_key or next((k for k in ("data", "examples", "rows", "train") if isinstance(data.get(k), list)), None)
            if key is None or not isinstance(data.get(key), list):
                raise InputError(f"{path}: JSON object has no list of records (keys: {list(data)[:10]}); "
                                 "use a JSON list or JSONL")
            data = data[key]
        if not isinstance(data, list):
            raise InputError(f"{path}: holds a JSON {type(data).__name__}, not a list of records; "
                             "use a JSON list or JSONL")
        for i, record in enumerate(data, 1):
            yield i, record if isinstance(record, dict) else Malformed("record is not a JSON object")
    elif name.endswith((".csv", ".tsv")):
        for i, record in enumerate(csv.DictReader(_lines(path), delimiter="\t" if name.endswith(".tsv") else ","), 2):
            yield i, Malformed("more fields than the header has") if None in record else record  # row 1 is the header
    elif name.endswith(".parquet"):
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`), "
                             "or convert the file to JSONL") from None
        try:
            i = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
                for record in batch.to_pylist():
                    i += 1
                    yield i, record
        except (pyarrow.ArrowException, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e}); "
                             "download it again or convert it to JSONL") from None
    else:
        raise InputError(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED)}")


def collect(name: str, paths: Sequence[Path], parse: Callable[[dict], Union[None, dict, List[dict]]],
            required: Sequence[str] = (), list_key: Optional[str] = None,
            transform: Optional[Callable[[dict], dict]] = None) -> SourceRows:
    """Run `parse` over every record of every file. `required` columns must exist in a file's first record (else one
    error naming the column and the file); after that a bad record is only skipped and counted.
    `parse` returns a row, a list of rows, or None (filtered on purpose: counted as 'not selected').
    `transform` rewrites each record first (e.g. CSV headers to the hub's column names)."""
    out = SourceRows(name=name, files=[str(p) for p in paths])
    for path in paths:
        first = True
        for row_no, record in read_records(path, list_key):
            out.read += 1
            try:
                if isinstance(record, Malformed):
                    raise record
                record = transform(record) if transform else record
                missing = [c for c in required if c not in record] if first else []
                first = False
                if missing:
                    raise InputError(f"{path}: column {missing[0]!r} not found (columns: {sorted(map(str, record))}); "
                                     f"is this the right file for source {name!r}?")
                parsed = parse(record)
            except (Malformed, KeyError, TypeError, AttributeError, IndexError) as e:
                reason = f"malformed: {e}" if isinstance(e, Malformed) else f"malformed: {type(e).__name__} {e}"
                out.drop(reason.split(" (")[0][:80], f"{path}:{row_no}")
                continue
            if parsed is None:
                out.drop("not selected by source options")
                continue
            out.rows += parsed if isinstance(parsed, list) else [parsed]
    return out


# ---------------------------------------------------------------------------------- tokenization
@dataclass
class Tokenized:
    tokens: List[np.ndarray]
    masks: List[np.ndarray]
    keep: List[int]  # index into the input rows of each kept sample
    dropped: Dict[int, str]  # row index -> reason
    truncated: int = 0


def tokenize_rows(tokenizer, style, rows: Sequence[dict], max_seq_length: int, mask_prompt: bool = True,
                  overlong: str = "truncate", batch_size: int = 4096, progress: bool = True) -> Tokenized:
    """Segments (prompts.conversation_segments) -> BOS + tokens + EOS with a loss mask, batched through the Rust
    tokenizer. An over-long sample is shortened by cutting the end of the user text just before the response
    header (the header, the response and the EOS are kept); if the response alone does not fit it is dropped."""
    import prompts

    if tokenizer.eos_id is None:
        raise InputError(f"{tokenizer.checkpoint_dir}: the tokenizer has no EOS id (generation_config.json / "
                         f"tokenizer_config.json); samples need one")
    bos = [tokenizer.bos_id] if tokenizer.use_bos and tokenizer.bos_id is not None else []
    header_segment = 1 if prompts.get_style(style).header else 0
    out = Tokenized([], [], [], {})
    iterator = range(0, len(rows), batch_size)
    bar = progress_bar(len(rows), "tokenizing", progress)
    for start in iterator:
        chunk = rows[start:start + batch_size]
        segs = [prompts.conversation_segments(style, r["messages"], r.get("system")) for r in chunk]
        flat = [text for s in segs for text, _ in s]
        unique = list(dict.fromkeys(flat))  # template headers repeat in every row: encode them once
        encoded = dict(zip(unique, tokenizer.encode_batch(unique, bos=False, eos=False)))
        ids = [list(encoded[text]) for text in flat]
        k = 0
        for j, s in enumerate(segs):
            pieces = ids[k:k + len(s)]
            k += len(s)
            targets = [t for _, t in s]
            first_target = targets.index(True)
            total = len(bos) + sum(map(len, pieces)) + 1
            if total > max_seq_length:
                if overlong == "drop":
                    out.dropped[start + j] = "longer than max_seq_length"
                    continue
                # cut the end of the user text of the first turn with a reply (the segment before the header)
                cut_at = first_target - 1 - header_segment
                excess = total - max_seq_length
                if cut_at < 0 or len(pieces[cut_at]) <= excess:
                    out.dropped[start + j] = "too long even with the prompt cut"
                    continue
                pieces[cut_at] = pieces[cut_at][:len(pieces[cut_at]) - excess]
                out.truncated += 1
            tokens = bos + [t for p in pieces for t in p] + [tokenizer.eos_id]
            mask = [0] * len(bos)
            for p, is_target in zip(pieces, targets):
                mask += [1 if (is_target or not mask_prompt) else 0] * len(p)
            mask.append(1)
            out.tokens.append(np.asarray(tokens, dtype=np.int32))
            out.masks.append(np.asarray(mask, dtype=np.uint8))
            out.keep.append(start + j)
        bar.update(len(chunk))
    bar.close()
    return out


def progress_bar(total: int, what: str, enabled: bool = True):
    """A tqdm bar over rows (to stderr; off with enabled=False): `bar(n)` adds n rows, `bar.close()` ends it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit=" rows", disable=not enabled or not total, mininterval=5, file=sys.stderr)


def seeded_shuffle(n: int, seed: int) -> List[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
