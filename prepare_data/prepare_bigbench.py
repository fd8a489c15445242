"""BIG-bench JSON tasks (Apache-2.0; a local copy of github.com/google/BIG-bench's bigbench/benchmark_tasks/<task>,
e.g. in data/assets/bigbench/<task>: the bigbench PyPI sdist that shipped them is no longer served): a task.json with
{"task_prefix"?, "examples": [{"input", "target": str | [str]} or {"input", "target_scores": {choice: score}}]}.
Generative examples become input -> first target; multiple-choice ones become a lettered question -> best letter.
Several BIG-bench tasks are in the challenge's evaluation: decontamination removes them unless you turn it off."""
import sys
from pathlib import Path
from typing import List, Optional

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError
from prepare_data.data_utils import (DataFile, Malformed, SourceRows, bigbench_missing, instruction_row,
                                     multiple_choice, read_json, resolve_files)


def example_row(example: dict, task_prefix: str = "", answer_text: bool = False) -> dict:
    """One BIG-bench example -> row. Prefix becomes the instruction, the example input the prompt's input."""
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        raise Malformed("example has no text 'input'")
    question = example["input"].strip()
    target = example.get("target")
    if isinstance(target, list):
        target = next((t for t in target if isinstance(t, str) and t.strip()), None)
    if isinstance(target, str) and target.strip():
        answer = target.strip()
    elif isinstance(example.get("target_scores"), dict) and example["target_scores"]:
        choices = list(example["target_scores"])
        best = max(range(len(choices)), key=lambda i: example["target_scores"][choices[i]])
        question = multiple_choice(question, choices)
        answer = f"{'ABCDEFGHIJ'[best]}. {choices[best]}" if answer_text else "ABCDEFGHIJ"[best]
        if len(choices) > 10:
            raise Malformed("more than 10 choices")
    else:
        raise Malformed("example has neither 'target' nor 'target_scores'")
    if task_prefix.strip():
        return instruction_row(task_prefix.strip(), answer, question)
    return instruction_row(question, answer)


def load_tasks(name: str, paths: List[Path], max_per_task: Optional[int] = None, with_prefix: bool = True,
               answer_text: bool = False, keep=None) -> SourceRows:
    out = SourceRows(name=name, files=[str(p) for p in paths])
    for path in paths:
        task = read_json(path)
        if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
            raise InputError(f"{path}: column 'examples' not found; expected a BIG-bench task.json")
        prefix = (task.get("task_prefix") or task.get("description") or "") if with_prefix else ""
        kept = 0
        for i, example in enumerate(task["examples"], 1):
            out.read += 1
            if (max_per_task and kept >= max_per_task) or (keep and not keep(example)):
                out.drop("not selected by source options")
                continue
            try:
                out.rows.append(example_row(example, prefix, answer_text))
                kept += 1
            except Malformed as e:
                out.drop(f"malformed: {e}", f"{path}:example {i}")
    return out


def load(data_file: DataFile = None, max_per_task: Optional[PositiveInt] = None, with_prefix: bool = True,
         answer_text: bool = False) -> SourceRows:
    """
    Args:
        data_file: a task.json, a folder of tasks (all task.json files under it) or a glob
        max_per_task: keep at most this many examples of each task (the first ones)
        with_prefix: use the task's `task_prefix` (or description) as the instruction
        answer_text: multiple-choice answers as "B. text" instead of the letter alone
    """
    if not data_file:  # no maintained hub copy is in task.json form
        raise InputError("bigbench: give data_file, a task.json or a folder of tasks. "
                         + bigbench_missing("data/assets/bigbench/<task>", "<task>"))
    paths = [p for p in resolve_files(data_file, None, None) if p.suffix == ".json"]
    return load_tasks("bigbench", paths, max_per_task, with_prefix, answer_text)


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("bigbench", load)
