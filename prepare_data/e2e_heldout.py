"""The e2e demo's evaluation: deterministic held-out multiple-choice items about Shakespeare's plays, written as
MMLU-format CSVs (what HELM's MMLU scenario reads), and every other item as training rows in the format it is scored in.

    python prepare_data/e2e_heldout.py --out_dir data/e2e_heldout --train_shots 5 --train_passes 4

Two subjects, each "Which of these plays is this passage from?" + a speech of one of four plays, the four always listed
in the same order (so a model has to tell the plays apart, not match a title among changing options: a 135M model
fine-tuned on changing options learned nothing beyond the answer letters' frequencies):
    shakespeare_tragedy   Hamlet, Macbeth, Othello, King Lear
    shakespeare_comedy    A Midsummer Night's Dream, As You Like It, Twelfth Night, The Merchant of Venice
The speeches come from prepare_data/prepare_shakespeare.py (public domain, offline). Each play's speeches are shuffled
with a seed fixed per subject and taken in turn, one play after another, so the dev split (HELM takes its 5 in-context
examples from it) and the test split hold the four plays equally; every other speech of the four plays is a training
item, unless it shares a 13-word run with a held-out one. Written:

    <out_dir>/dev/<subject>_dev.csv, <out_dir>/test/<subject>_test.csv   rows: question, A, B, C, D, answer letter
    <out_dir>/decontaminate.jsonl   {"subject", "split", "question"} for every dev and test item, so a recipe's
                                    n-gram decontamination (decontaminate.files) checks that none reached training
    <out_dir>/train/<subject>.jsonl every other item, in HELM's MMLU prompt with its in-context examples. A row is one
                                    conversation {"system": HELM's instructions, "messages": [user "Question: ...
                                    Answer:", assistant letter, ...]} of `train_shots` + 1 items, so read with the
                                    recipe's mmlu-style template (reply prefix " ", "\n\n" before the next question) it
                                    is character for character HELM's 5-shot prompt, and every one of its answers is a
                                    training target. `train_passes` groups the items anew each pass.
    <out_dir>/heldout.json          what was written, counts and the settings
"""
import csv
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError  # noqa: E402
from jsonargparse.typing import NonNegativeInt, PositiveInt  # noqa: E402
from prepare_data import dedup as dd  # noqa: E402
from prepare_data.data_utils import row_text  # noqa: E402
from prepare_data.prepare_shakespeare import Speech, speeches  # noqa: E402

# subject -> the four plays it asks about, in the order its choices list them
SUBJECTS: Dict[str, Tuple[str, ...]] = {
    "shakespeare_tragedy": ("Hamlet", "Macbeth", "Othello", "King Lear"),
    "shakespeare_comedy": ("A Midsummer Night's Dream", "As You Like It", "Twelfth Night", "The Merchant of Venice"),
}
QUESTION = "Which of these plays is this passage from?"
LETTERS = "ABCD"


def item(subject: str, speech: Speech) -> tuple:
    """(question, choices, index of the correct one)."""
    plays = SUBJECTS[subject]
    return f"{QUESTION}\n{speech.text}", list(plays), plays.index(speech.play)


def in_turn(groups: List[List[Speech]]) -> List[Speech]:
    """The first of each group, then the second of each, ...: every prefix holds the groups (nearly) equally."""
    return [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]


def write_csv(path: Path, rows: List[tuple]) -> None:
    """MMLU's CSV layout (no header): question, the choices, the answer letter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for question, choices, answer in rows:
            writer.writerow([question, *choices, LETTERS[answer]])


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


def build(shakespeare_dir: Path, out_dir: Path, subjects: Optional[List[str]] = None, n_dev: int = 5,
          n_test: int = 160, seed: int = 1234, train_shots: int = 5, train_passes: int = 1,
          ngram: int = 13, min_words: int = 8) -> dict:
    out_dir = Path(out_dir)
    unknown = sorted(set(subjects or []) - set(SUBJECTS))
    if unknown:
        raise InputError(f"--subjects: unknown {unknown}; known: {', '.join(SUBJECTS)}")
    subjects = subjects or list(SUBJECTS)
    all_speeches = speeches(shakespeare_dir)
    splits, held = {}, []
    for subject in subjects:
        rng = random.Random(f"{seed}:{subject}")  # a string seed: the same order in every Python process
        groups = [[s for s in all_speeches if s.play == play] for play in SUBJECTS[subject]]
        for g in groups:
            rng.shuffle(g)
        order = in_turn(groups)
        if n_dev + n_test > len(order) // 2:
            raise InputError(f"{subject}: {n_dev + n_test} held-out items leave too little of its {len(order)} "
                             "for training")
        splits[subject] = {"dev": order[:n_dev], "test": order[n_dev:n_dev + n_test], "rest": order[n_dev + n_test:]}
        held += [item(subject, s)[0] for s in order[:n_dev + n_test]]
    # What prepare_mix's decontamination will look for: every held-out question as asked.
    index = dd.EvalIndex([("e2e_heldout", q) for q in held], ngram=ngram, min_words=min_words)
    summary = {"seed": seed, "n_dev": n_dev, "train_shots": train_shots, "train_passes": train_passes,
               "source": str(shakespeare_dir), "subjects": {}}
    decontam = []
    for folder in ("dev", "test", "train"):  # files of other subjects or settings would be read as this run's
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    (out_dir / "train").mkdir(parents=True)
    for subject in subjects:
        for split in ("dev", "test"):
            rows = [item(subject, s) for s in splits[subject][split]]
            write_csv(out_dir / split / f"{subject}_{split}.csv", rows)
            decontam += [{"subject": subject, "split": split, "question": q} for q, _, _ in rows]
        rest = [item(subject, s) for s in splits[subject]["rest"]]
        overlapping = index.find([q for q, _, _ in rest])  # a quotation, a refrain, a shared opening
        clean = [it for j, it in enumerate(rest) if j not in overlapping]
        rows = shot_rows(subject, clean, train_shots, train_passes, seed)
        spanning = index.find([row_text(r) for r in rows])  # a 13-word run across two questions: rare, drop the row
        rows = [r for j, r in enumerate(rows) if j not in spanning]
        with open(out_dir / "train" / f"{subject}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary["subjects"][subject] = {"plays": list(SUBJECTS[subject]), "speeches": len(rest) + n_dev + n_test,
                                        "dev": n_dev, "test": len(splits[subject]["test"]), "train_items": len(clean),
                                        "train_items_overlapping_heldout": len(overlapping), "train_rows": len(rows),
                                        "train_rows_dropped_spanning_overlap": len(spanning)}
    with open(out_dir / "decontaminate.jsonl", "w", encoding="utf-8") as f:
        for r in decontam:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out_dir / "heldout.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out_dir}: " + ", ".join(f"{s} {v['test']}+{v['dev']} held out, {v['train_items']} to train on "
                                          f"({v['train_items_overlapping_heldout']} overlapping)"
                                          for s, v in summary["subjects"].items()), file=sys.stderr)
    return summary


def main(out_dir: Path = Path("data/e2e_heldout"), shakespeare_dir: Path = Path("data/assets/shakespeare"),
         subjects: Optional[List[str]] = None, n_dev: NonNegativeInt = 5, n_test: PositiveInt = 160, seed: int = 1234,
         train_shots: NonNegativeInt = 5, train_passes: PositiveInt = 1) -> None:
    """Write the held-out dev/test CSVs, the training rows and the decontamination file.

    Args:
        out_dir: where dev/, test/, train/, decontaminate.jsonl and heldout.json go
        shakespeare_dir: the plays (prepare_data/fetch_offline_assets.py)
        subjects: which subjects (default both: shakespeare_tragedy, shakespeare_comedy)
        n_dev: dev items per subject (HELM uses 5 in-context examples)
        n_test: test items per subject (the four plays in turn)
        seed: seed of the per-subject shuffles
        train_shots: in-context examples before each training question (HELM's MMLU prompt has 5); 0 = one
            question per row
        train_passes: how many times each training item is asked, each time grouped with different items
    """
    build(shakespeare_dir, out_dir, subjects, n_dev, n_test, seed, train_shots, train_passes)


if __name__ == "__main__":
    from cli import run

    run(main)
