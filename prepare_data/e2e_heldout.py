"""Deterministic held-out evaluation splits of BIG-bench tasks, written as MMLU-format CSVs (what HELM's MMLU scenario
reads) plus the file the e2e recipe decontaminates against.

    python prepare_data/e2e_heldout.py --out_dir data/e2e_heldout

For each task ("subject") the examples are shuffled with a seed fixed per subject; the first `n_dev` become the dev
split (HELM takes its 5 in-context examples from it) and the next `n_test` the test split. Choices beyond four are cut
to the correct one plus three seeded distractors (HELM's MMLU reader knows the letters A-D only), in a seeded
order (date_understanding lists the correct answer first). Written:

    <out_dir>/dev/<subject>_dev.csv, <out_dir>/test/<subject>_test.csv   rows: question, A, B[, C, D], answer letter
    <out_dir>/decontaminate.jsonl   {"subject", "split", "question"} for every dev and test example: the text of the
                                    row the training sources (prepare_bigbench / prepare_bbq) make of that example, so
                                    the recipe's n-gram decontamination removes it and anything sharing 13 words with it
    <out_dir>/train/<subject>.jsonl every other item that shares no 13-word run with a held-out one, in the format
                                    it is scored in: HELM's MMLU prompt with its in-context examples. A row is one
                                    conversation {"system": HELM's instructions, "messages": [user "Question: ...
                                    Answer:", assistant letter, ...]} of `train_shots` + 1 items, so read with the
                                    recipe's mmlu-style template (reply prefix " ", "\n\n" before the next question) it
                                    is character for character HELM's 5-shot prompt, and every one of its answers is a
                                    training target (each in the context of the ones before it). `train_passes` groups
                                    the items anew each pass (different shots for every item).
    <out_dir>/heldout.json          what was written, counts and the settings

The BIG-bench files come from prepare_data/fetch_offline_assets.py (data/assets/bigbench).
"""
import csv
import json
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data import dedup as dd  # noqa: E402
from prepare_data.data_utils import Malformed, row_text  # noqa: E402
from prepare_data.prepare_bigbench import example_row  # noqa: E402

# subject -> (task.json globs under the BIG-bench folder, number of test items)
SUBJECTS: Dict[str, tuple] = {
    "bbq_lite": (["bbq_lite_json/*/task.json"], 150),
    "logical_deduction": (["logical_deduction/*_objects/task.json"], 150),
    "strategyqa": (["strategyqa/task.json"], 150),
    "date_understanding": (["date_understanding/task.json"], 100),
    "elementary_math_qa": (["elementary_math_qa/question_only/task.json"], 150),
}
LETTERS = "ABCD"


def load_examples(root: Path, globs: List[str]) -> List[dict]:
    paths = sorted(p for g in globs for p in root.glob(g))
    if not paths:
        raise SystemExit(f"{root}: no files match {globs}; run python prepare_data/fetch_offline_assets.py first")
    out = []
    for p in paths:
        task = json.loads(p.read_text(encoding="utf-8"))
        for ex in task.get("examples", []):
            if isinstance(ex.get("target_scores"), dict) and len(ex["target_scores"]) >= 2:
                out.append(ex)
    return out


def to_four(example: dict, rng: random.Random) -> tuple:
    """(question, choices, index of the correct one) with at most four choices, the original order kept."""
    choices = list(example["target_scores"])
    scores = [example["target_scores"][c] for c in choices]
    best = max(range(len(choices)), key=lambda i: scores[i])
    if scores.count(scores[best]) != 1:
        raise Malformed("more than one best choice")
    keep = [best] + rng.sample([i for i in range(len(choices)) if i != best], min(3, len(choices) - 1))
    rng.shuffle(keep)  # some tasks (date_understanding) list the correct answer first: it must not always be A
    return example["input"].strip(), [str(choices[i]).strip() for i in keep], keep.index(best)


def write_csv(path: Path, rows: List[tuple]) -> None:
    """MMLU's CSV layout (no header): question, the choices, the answer letter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for question, choices, answer in rows:
            writer.writerow([question, *choices, LETTERS[answer]])


def read_csv(path: Path) -> List[tuple]:
    """The inverse of write_csv: [(question, choices, answer index)]."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if len(row) < 4 or row[-1] not in LETTERS[:len(row) - 2]:
                raise ValueError(f"{path}:{line_no}: expected question, 2-4 choices, answer letter; got {len(row)} fields")
            out.append((row[0], row[1:-1], LETTERS.index(row[-1])))
    return out


def question_block(question: str, choices: List[str]) -> str:
    """One item as HELM's MMLU prompt shows it (scripts/eval_tasks.mc_block), up to "Answer:"."""
    return f"Question: {question}\n" + "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(choices)) + "Answer:"


def instructions(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."


def shot_rows(subject: str, items: List[tuple], shots: int, passes: int, seed: int) -> List[dict]:
    """Each pass shuffles the items and cuts them into conversations of shots + 1 questions, each answered."""
    rows = []
    for p in range(passes):
        order = list(range(len(items)))
        random.Random(f"{seed}:{subject}:pass{p}").shuffle(order)
        for lo in range(0, len(order), shots + 1):
            messages = []
            for i in order[lo:lo + shots + 1]:
                question, choices, answer = items[i]
                messages += [{"role": "user", "content": question_block(question, choices)},
                             {"role": "assistant", "content": LETTERS[answer]}]
            rows.append({"system": instructions(subject), "messages": messages})
    return rows


def build(bigbench_dir: Path, out_dir: Path, subjects: Optional[List[str]] = None, n_dev: int = 5,
          n_test: Optional[int] = None, seed: int = 1234, train_shots: int = 5, train_passes: int = 1,
          ngram: int = 13, min_words: int = 8) -> dict:
    root, out_dir = Path(bigbench_dir), Path(out_dir)
    summary = {"seed": seed, "n_dev": n_dev, "train_shots": train_shots, "train_passes": train_passes, "subjects": {}}
    if train_shots < 0 or train_passes < 1:
        raise SystemExit(f"--train_shots {train_shots} / --train_passes {train_passes}: need shots >= 0 and passes >= 1")
    decontam = []
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    for subject in subjects or list(SUBJECTS):
        if subject not in SUBJECTS:
            raise SystemExit(f"--subjects: unknown {subject!r}; known: {', '.join(SUBJECTS)}")
        globs, default_test = SUBJECTS[subject]
        examples = load_examples(root, globs)
        rng = random.Random(f"{seed}:{subject}")  # a string seed: the same order in every Python process
        order = list(range(len(examples)))
        rng.shuffle(order)
        wanted = n_dev + (n_test or default_test)
        if wanted > len(examples) // 2:
            raise SystemExit(f"{subject}: {wanted} held-out items leave too little of its {len(examples)} for training")
        splits = {"dev": order[:n_dev], "test": order[n_dev:wanted]}
        held_out = []
        for split, ids in splits.items():
            rows = [to_four(examples[i], rng) for i in ids]
            write_csv(out_dir / split / f"{subject}_{split}.csv", rows)
            for i in ids:
                held_out.append(row_text(example_row(examples[i])))
                decontam.append({"subject": subject, "split": split, "question": held_out[-1]})
        # Every other item is a training item, unless it shares a 13-word run with a held-out one (prepare_mix's
        # decontamination would drop it, and with it the whole conversation it is an in-context example in).
        items = []
        for i in order[wanted:]:
            try:
                items.append(to_four(examples[i], rng))
            except Malformed:
                continue
        index = dd.EvalIndex([(subject, q) for q in held_out], ngram=ngram, min_words=min_words)
        overlapping = index.find([question_block(q, c) for q, c, _ in items])
        clean = [it for j, it in enumerate(items) if j not in overlapping]
        rows = shot_rows(subject, clean, train_shots, train_passes, seed)
        spanning = index.find([row_text(r) for r in rows])  # a 13-word run across two questions: rare, drop the row
        rows = [r for j, r in enumerate(rows) if j not in spanning]
        with open(out_dir / "train" / f"{subject}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary["subjects"][subject] = {"files": sorted(map(str, sorted(p for g in globs for p in root.glob(g)))),
                                        "examples": len(examples), "dev": n_dev, "test": len(splits["test"]),
                                        "train_items": len(clean), "train_items_overlapping_heldout": len(overlapping),
                                        "train_rows": len(rows), "train_rows_dropped_spanning_overlap": len(spanning)}
    with open(out_dir / "decontaminate.jsonl", "w", encoding="utf-8") as f:
        for r in decontam:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out_dir / "heldout.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out_dir}: " + ", ".join(f"{s} {v['test']}+{v['dev']} held out, {v['train_items']} to train on "
                                          f"({v['train_items_overlapping_heldout']} overlapping)"
                                          for s, v in summary["subjects"].items()), file=sys.stderr)
    return summary


def main(out_dir: Path = Path("data/e2e_heldout"), bigbench_dir: Path = Path("data/assets/bigbench"),
         subjects: Optional[List[str]] = None, n_dev: int = 5, n_test: Optional[int] = None, seed: int = 1234,
         train_shots: int = 5, train_passes: int = 1) -> None:
    """Write the held-out dev/test CSVs and the decontamination file.

    Args:
        out_dir: where dev/, test/, decontaminate.jsonl and heldout.json go
        bigbench_dir: the BIG-bench task folders (prepare_data/fetch_offline_assets.py)
        subjects: which tasks (default all of bbq_lite, logical_deduction, strategyqa, date_understanding, elementary_math_qa)
        n_dev: dev items per subject (HELM uses 5 in-context examples)
        n_test: test items per subject (default: 150, 100 for the small date_understanding)
        seed: seed of the per-subject shuffles
        train_shots: in-context examples before each training question (HELM's MMLU prompt has 5); 0 = one
            question per row
        train_passes: how many times each training item is asked, each time grouped with different items
    """
    build(bigbench_dir, out_dir, subjects, n_dev, n_test, seed, train_shots, train_passes)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
