"""Natural Instructions (human-written task definitions and instances). Three file forms:
- the original task files: {"Definition": [str], "Instances": [{"input", "output": [str]}], ...} (taskNNN_*.json)
- the 61 tasks embedded in BIG-bench (natural_instructions/subtaskNNN_*/task.json, from a local copy of
  github.com/google/BIG-bench's bigbench/benchmark_tasks: the PyPI sdist that shipped them is no longer served)
- the hub's flattened JSONL (Muennighoff/natural-instructions): {"task_name", "definition", "inputs", "targets"}.
The definition is the instruction and the instance input the prompt's input."""
import fnmatch
import sys
from pathlib import Path
from typing import List, Optional

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError
from prepare_data.data_utils import (DataFile, Malformed, SourceRows, collect, instruction_row, read_json,
                                     resolve_files, text_field)
from prepare_data.prepare_bigbench import load_tasks

REPO, FILES = "Muennighoff/natural-instructions", ["train*.jsonl*", "*/train*.jsonl*"]


def _task_name(path: Path) -> str:
    return path.parent.name if path.name == "task.json" else path.name.split(".")[0]


def load(data_file: DataFile = None, tasks: Optional[List[str]] = None, max_per_task: Optional[PositiveInt] = None,
         with_definition: bool = True) -> SourceRows:
    """
    Args:
        data_file: task file(s) or a folder of them (original or BIG-bench form), or the flattened JSONL
        tasks: keep only tasks whose name matches one of these globs (e.g. "subtask04*", "task1*_answer*")
        max_per_task: keep at most this many instances of each task (the first ones)
        with_definition: put the task definition in the prompt (without it, only the instance input is shown)
    """
    paths = resolve_files(data_file, REPO, FILES)
    wanted = lambda name: not tasks or any(fnmatch.fnmatch(name, t) for t in tasks)
    out = SourceRows(name="natural_instructions", files=[str(p) for p in paths])
    jsonl = [p for p in paths if ".jsonl" in p.name]
    task_files = [p for p in paths if p not in jsonl and wanted(_task_name(p))]
    for path in task_files:
        task = read_json(path)
        if isinstance(task, dict) and "examples" in task:  # BIG-bench form
            part = load_tasks("natural_instructions", [path], max_per_task, with_definition)
        elif isinstance(task, dict) and isinstance(task.get("Instances"), list):
            definition = task.get("Definition") or [""]
            definition = " ".join(definition) if isinstance(definition, list) else str(definition)
            part = SourceRows(name="natural_instructions")
            for i, inst in enumerate(task["Instances"], 1):
                part.read += 1
                if max_per_task and len(part.rows) >= max_per_task:
                    part.drop("not selected by source options")
                    continue
                try:
                    outputs = inst.get("output") if isinstance(inst, dict) else None
                    output = outputs[0] if isinstance(outputs, list) and outputs else outputs
                    if not isinstance(output, str):
                        raise Malformed("instance has no text 'output'")
                    instruction = definition if with_definition else text_field(inst, "input")
                    part.rows.append(instruction_row(instruction, output, text_field(inst, "input") if with_definition else ""))
                except Malformed as e:
                    part.drop(f"malformed: {e}", f"{path}:instance {i}")
        else:
            raise InputError(f"{path}: column 'Instances' not found; expected a Natural Instructions task file")
        out.merge(part)
    if jsonl:
        per_task = {}

        def parse(r: dict):
            name = text_field(r, "task_name")
            if not wanted(name) or (max_per_task and per_task.get(name, 0) >= max_per_task):
                return None
            per_task[name] = per_task.get(name, 0) + 1
            targets = r.get("targets")
            target = targets[0] if isinstance(targets, list) and targets else targets
            definition = text_field(r, "definition", required=False) if with_definition else ""
            if definition:
                return instruction_row(definition, target if isinstance(target, str) else "", text_field(r, "inputs"))
            return instruction_row(text_field(r, "inputs"), target if isinstance(target, str) else "")

        part = collect("natural_instructions", jsonl, parse, required=["task_name", "inputs", "targets"])
        out.merge(part)
    if not task_files and not jsonl:
        raise InputError(f"natural_instructions: no task matches tasks {tasks} in {data_file}; check the task names")
    return out


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("natural_instructions", load)
