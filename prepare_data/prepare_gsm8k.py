"""GSM8K (openai/gsm8k, MIT): grade-school maths word problems with worked solutions ending in "#### <answer>".
Record: {"question", "answer"}. By default the calculator annotations (<<48/2=24>>) are removed and the final line
becomes "The answer is 24." as in HELM's GSM8K prompts, so the model learns the format the scorer parses."""
import re
import sys
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import DataFile, Malformed, SourceRows, collect, instruction_row, resolve_files, text_field

REPO = "openai/gsm8k"
_CALC = re.compile(r"<<[^>]*>>")


def solution(answer: str, helm_format: bool = True) -> str:
    if "####" not in answer:
        raise Malformed("answer has no '#### <final answer>' line")
    steps, final = answer.rsplit("####", 1)
    if not helm_format:
        return answer
    return f"{_CALC.sub('', steps).strip()}\nThe answer is {final.strip().replace(',', '')}."


def load(data_file: DataFile = None, split: Literal["train", "test"] = "train", helm_format: bool = True) -> SourceRows:
    """
    Args:
        data_file: local GSM8K JSONL (train.jsonl of the original repository) or parquet
        split: hub split (train or test; never train on test: it is the challenge's evaluation)
        helm_format: strip calculator annotations and end with "The answer is N."
    """
    def parse(r: dict):
        return instruction_row(text_field(r, "question"), solution(text_field(r, "answer"), helm_format))

    return collect("gsm8k", resolve_files(data_file, REPO, f"main/{split}-*.parquet"), parse, required=["question", "answer"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("gsm8k", load)
