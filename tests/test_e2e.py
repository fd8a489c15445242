"""The e2e demo's data: held-out splits as HELM's MMLU scenario reads them, kept out of training by decontamination,
and in-context examples in HELM's order. Fake BIG-bench task files made here; no model, no tokenizer."""
import csv
import json
import random
from collections import defaultdict
from itertools import cycle
from pathlib import Path

import pytest

from prepare_data import dedup as dd
from prepare_data.data_utils import row_text
from prepare_data.e2e_heldout import LETTERS, SUBJECTS, build
from prepare_data.prepare_bbq import load as load_bbq
from prepare_data.prepare_bigbench import load as load_bigbench
from prepare_data.prepare_mix import DECONTAMINATE, eval_questions
from scripts.eval_tasks import MCExample, helm_shot_order, load_task

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def fake_bigbench(root: Path, n: int = 40) -> None:
    rng = random.Random(0)
    folders = {"bbq_lite": ["bbq_lite_json/age_ambig", "bbq_lite_json/ses_disambig"],
               "logical_deduction": ["logical_deduction/three_objects", "logical_deduction/seven_objects"],
               "strategyqa": ["strategyqa"], "date_understanding": ["date_understanding"],
               "elementary_math_qa": ["elementary_math_qa/question_only"]}
    for subject, dirs in folders.items():
        for d in dirs:
            examples = []
            for i in range(n):
                question = " ".join(rng.choice(WORDS) for _ in range(16)) + f" {d} {i}?"
                k = rng.choice([2, 3, 5, 7]) if subject != "strategyqa" else 2
                choices = [f"choice {c} of {d} {i}" for c in range(k)]
                correct = rng.randrange(k)
                ex = {"input": question, "target_scores": {c: int(j == correct) for j, c in enumerate(choices)}}
                if subject == "strategyqa":
                    ex["target"] = f"{'Yes' if correct == 0 else 'No'}. Because {rng.choice(WORDS)}."
                examples.append(ex)
            (root / d).mkdir(parents=True, exist_ok=True)
            (root / d / "task.json").write_text(json.dumps({"examples": examples}))


def helm_process_csv(path: Path) -> list:
    """HELM 0.5's MMLUScenario.process_csv, reduced to what it returns: (question, answers, correct answer text)."""
    out = []
    with open(path) as f:
        for row in csv.reader(f, delimiter=","):
            question, answers, correct_choice = row[0], row[1:-1], row[-1]
            answers_dict = dict(zip(["A", "B", "C", "D", "E"], answers))
            out.append((question, answers, answers_dict[correct_choice]))
    return out


def helm_sample_examples(train: list, k: int, seed: int) -> list:
    """HELM 0.5's InContextLearningAdapter.sample_examples on (question, correct text) pairs, as the reference."""
    random.seed(seed)
    n = min(len(train), k)
    examples = []
    label_to_instances = defaultdict(list)
    for inst in train:
        label_to_instances[inst[1]].append(inst)
    counts_to_labels = defaultdict(list)
    for label, instances in sorted(label_to_instances.items()):
        counts_to_labels[len(instances)].append(label)
    sorted_labels = []
    for count in sorted(counts_to_labels, reverse=True):
        labels = counts_to_labels[count]
        random.shuffle(labels)
        sorted_labels.extend(labels)
    labels_iterable = cycle(sorted_labels)
    while n > 0:
        instances = label_to_instances[next(labels_iterable)]
        if not instances:
            continue
        examples.append(instances.pop(random.randrange(len(instances))))
        n -= 1
    return examples


@pytest.fixture()
def heldout(tmp_path):
    fake_bigbench(tmp_path / "bb")
    summary = build(tmp_path / "bb", tmp_path / "heldout", n_dev=5, n_test=10, seed=7)
    return tmp_path, summary


def test_csvs_are_what_helm_reads(heldout):
    tmp, summary = heldout
    assert set(summary["subjects"]) == set(SUBJECTS)
    for subject in SUBJECTS:
        for split, n in (("dev", 5), ("test", 10)):
            rows = helm_process_csv(tmp / "heldout" / split / f"{subject}_{split}.csv")
            assert len(rows) == n
            for question, answers, correct in rows:
                assert 2 <= len(answers) <= 4 and correct in answers and question.endswith("?")
    test, _ = load_task("mmlu_csv", "offline", tmp / "heldout")
    assert len(test) == 10 * len(SUBJECTS)
    first = helm_process_csv(tmp / "heldout" / "test" / "bbq_lite_test.csv")[0]
    assert first[0] in test[0].prompt and test[0].prompt.endswith("Answer:")
    assert test[0].prompt.startswith("The following are multiple choice questions (with answers) about bbq lite.\n\n")
    # deterministic: the same seed writes the same files
    build(tmp / "bb", tmp / "again", n_dev=5, n_test=10, seed=7)
    for p in (tmp / "heldout").rglob("*.csv"):
        assert p.read_bytes() == (tmp / "again" / p.relative_to(tmp / "heldout")).read_bytes()


def test_training_rows_are_the_other_items_in_the_scored_format(heldout):
    tmp, _ = heldout
    heldout_questions = {r[0] for p in (tmp / "heldout").rglob("*.csv") for r in csv.reader(open(p, newline=""))}
    for subject in SUBJECTS:
        rows = [json.loads(line) for line in open(tmp / "heldout" / "train" / f"{subject}.jsonl")]
        n_examples = 40 * (2 if subject in ("bbq_lite", "logical_deduction") else 1)
        assert len(rows) == n_examples - 15  # every item not held out
        for r in rows:
            assert r["instruction"].endswith("\nAnswer:") and r["output"] in "ABCD"
            options = r["instruction"].split("\n")[3:-1]
            assert options[0].startswith("A. ") and options[LETTERS.index(r["output"])].startswith(f"{r['output']}. ")
            assert not any(q in r["instruction"] for q in heldout_questions)


def test_decontamination_removes_every_heldout_item(heldout):
    tmp, _ = heldout
    bb = tmp / "bb"
    rows = (load_bbq(sorted(bb.glob("bbq_lite_json/*/task.json"))).rows
            + load_bigbench(sorted(bb.glob("logical_deduction/*_objects/task.json"))).rows
            + load_bigbench(bb / "strategyqa").rows + load_bigbench(bb / "date_understanding").rows
            + load_bigbench(bb / "elementary_math_qa/question_only").rows)
    texts = [row_text(r) for r in rows]
    questions = eval_questions("e2e_heldout", str(tmp / "heldout" / "decontaminate.jsonl"), "data/assets")
    assert len(questions) == 15 * len(SUBJECTS)
    index = dd.EvalIndex([("e2e_heldout", q) for q in questions], DECONTAMINATE["ngram"], DECONTAMINATE["min_words"])
    hits = index.find(texts)
    heldout_questions = {r[0] for p in (tmp / "heldout").rglob("*.csv") for r in csv.reader(open(p, newline=""))}
    contaminated = {i for i, t in enumerate(texts) if any(q in t for q in heldout_questions)}
    assert len(contaminated) == 15 * len(SUBJECTS)
    assert contaminated == set(hits)  # all of them, and nothing else (the fake questions share no 13 words)


def test_shot_order_is_helms():
    rng = random.Random(3)
    for trial in range(30):
        n = rng.choice([5, 6, 9])
        dev = [MCExample(f"q{i}", ["Yes", "No", "Maybe"][: rng.choice([2, 3])], 0, "s") for i in range(n)]
        for ex in dev:
            ex.answer = rng.randrange(len(ex.choices))
        ours = [ex.question for ex in helm_shot_order(list(dev), k=5, seed=0)]
        ref = [q for q, _ in helm_sample_examples([(ex.question, ex.choices[ex.answer]) for ex in dev], 5, 0)]
        assert ours == ref
