"""TruthfulQA-style data (Apache-2.0; TruthfulQA itself is in the challenge's evaluation, so decontamination against
it removes these rows unless disabled). Forms:
- TruthfulQA.csv: Type, Category, Question, Best Answer, Correct Answers ("; "-separated), Incorrect Answers, Source
- the hub parquet (truthfulqa/truthful_qa, generation): type, category, question, best_answer, correct_answers, ...
- BIG-bench truthful_qa/task_mc.json: {"examples": [{"input", "target_scores"}]}
mode "qa": question -> best answer;
mode "mc": lettered choices (order shuffled per question by choice_seed) -> letter."""
import random
import sys
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import (DataFile, Malformed, SourceRows, collect, instruction_row, multiple_choice,
                                     resolve_files, text_field)
from prepare_data.prepare_bigbench import load_tasks

REPO, FILES = "truthfulqa/truthful_qa", "generation/*.parquet"


def _answers(value) -> list:
    if isinstance(value, str):
        return [a.strip() for a in value.split(";") if a.strip()]
    return [str(a).strip() for a in value or [] if str(a).strip()]


def load(data_file: DataFile = None, mode: Literal["qa", "mc"] = "qa", choice_seed: int = 0) -> SourceRows:
    """
    Args:
        data_file: TruthfulQA.csv, the generation parquet/JSONL, or BIG-bench task_mc.json
        mode: "qa" (question -> best answer) or "mc" (multiple choice with the letter as answer)
        choice_seed: shuffles the choice order in "mc" mode (not named seed: that flag seeds the split)
    """
    paths = resolve_files(data_file, REPO, FILES)
    tasks = [p for p in paths if p.name.endswith(".json")]
    out = SourceRows(name="truthfulqa", files=[str(p) for p in paths])
    if tasks:
        out.merge(load_tasks("truthfulqa", tasks, with_prefix=False))

    def parse(r: dict):
        question, best = text_field(r, "question"), text_field(r, "best_answer")
        if mode == "qa":
            return instruction_row(question, best)
        wrong = _answers(r.get("incorrect_answers"))
        if not wrong:
            raise Malformed("no incorrect answers for a multiple-choice question")
        choices = [best] + wrong[:4]
        random.Random(f"{choice_seed}:{question}").shuffle(choices)
        return instruction_row(multiple_choice(question, choices), "ABCDE"[choices.index(best)])

    rest = [p for p in paths if p not in tasks]
    if rest:
        columns = lambda r: {k.lower().replace(" ", "_"): v for k, v in r.items()}  # CSV headers -> hub names
        out.merge(collect("truthfulqa", rest, parse, required=["question", "best_answer"], transform=columns))
    return out


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("truthfulqa", load)
