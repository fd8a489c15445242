"""MMLU auxiliary_train (cais/mmlu, MIT): 100k multiple-choice questions from ARC, OBQA, RACE and MCTest in MMLU's
format: {"question", "choices": [4 texts], "answer": 0-3, "subject"} (some hub revisions nest it under "train").
Rows are HELM-style lettered questions ending in "Answer:" with the letter as the response."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import (DataFile, Malformed, SourceRows, collect, instruction_row, multiple_choice,
                                     resolve_files, text_field)

REPO, FILES = "cais/mmlu", "auxiliary_train/*.parquet"
LETTERS = "ABCDEFGHIJ"


def load(data_file: DataFile = None, answer_text: bool = False) -> SourceRows:
    """
    Args:
        data_file: local auxiliary_train file (parquet needs pyarrow; JSONL with the same fields also works)
        answer_text: answer "B. text" instead of the letter alone
    """
    def parse(r: dict):
        choices = r["choices"]
        if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS):
            raise Malformed("'choices' is not a list of 2-10 answers")
        answer = r["answer"]
        answer = LETTERS.index(answer) if isinstance(answer, str) and answer in LETTERS else answer
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise Malformed(f"answer {answer!r} is not an index into choices")
        letter = LETTERS[answer]
        return instruction_row(multiple_choice(text_field(r, "question"), choices),
                               f"{letter}. {str(choices[answer]).strip()}" if answer_text else letter)

    unnest = lambda r: r["train"] if isinstance(r.get("train"), dict) else r
    return collect("mmlu_aux", resolve_files(data_file, REPO, FILES), parse, required=["question", "choices", "answer"],
                   transform=unnest)


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("mmlu_aux", load)
