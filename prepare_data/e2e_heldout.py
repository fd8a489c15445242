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
    <out_dir>/train/<subject>.jsonl every other item as a training row in the scored format (instruction = HELM's
                                    MMLU prompt for that one question, output = the answer letter)
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


def build(bigbench_dir: Path, out_dir: Path, subjects: Optional[List[str]] = None, n_dev: int = 5,
          n_test: Optional[int] = None, seed: int = 1234) -> dict:
    root, out_dir = Path(bigbench_dir), Path(out_dir)
    summary = {"seed": seed, "n_dev": n_dev, "subjects": {}}
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
        for split, ids in splits.items():
            rows = [to_four(examples[i], rng) for i in ids]
            write_csv(out_dir / split / f"{subject}_{split}.csv", rows)
            for i in ids:
                decontam.append({"subject": subject, "split": split, "question": row_text(example_row(examples[i]))})
        # Every other item becomes a training row in the format the held-out items are scored in (HELM's MMLU
        # prompt, zero-shot, answered by the letter), so the fine-tune learns the tasks and the answer format.
        with open(out_dir / "train" / f"{subject}.jsonl", "w", encoding="utf-8") as f:
            for i in order[wanted:]:
                try:
                    question, choices, answer = to_four(examples[i], rng)
                except Malformed:
                    continue
                options = "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(choices))
                header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
                row = {"instruction": f"{header}\n\n{question}{options}\nAnswer:", "output": LETTERS[answer]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary["subjects"][subject] = {"files": sorted(map(str, sorted(p for g in globs for p in root.glob(g)))),
                                        "examples": len(examples), "dev": n_dev, "test": len(splits["test"])}
    with open(out_dir / "decontaminate.jsonl", "w", encoding="utf-8") as f:
        for r in decontam:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out_dir / "heldout.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out_dir}: " + ", ".join(f"{s} {v['test']}+{v['dev']}" for s, v in summary["subjects"].items()),
          file=sys.stderr)
    return summary


def main(out_dir: Path = Path("data/e2e_heldout"), bigbench_dir: Path = Path("data/assets/bigbench"),
         subjects: Optional[List[str]] = None, n_dev: int = 5, n_test: Optional[int] = None, seed: int = 1234) -> None:
    """Write the held-out dev/test CSVs and the decontamination file.

    Args:
        out_dir: where dev/, test/, decontaminate.jsonl and heldout.json go
        bigbench_dir: the BIG-bench task folders (prepare_data/fetch_offline_assets.py)
        subjects: which tasks (default all of bbq_lite, logical_deduction, strategyqa, date_understanding, elementary_math_qa)
        n_dev: dev items per subject (HELM uses 5 in-context examples)
        n_test: test items per subject (default: 150, 100 for the small date_understanding)
        seed: seed of the per-subject shuffles
    """
    build(bigbench_dir, out_dir, subjects, n_dev, n_test, seed)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
