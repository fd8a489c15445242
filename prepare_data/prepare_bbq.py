"""BBQ, the Bias Benchmark for QA (CC BY 4.0; part of the challenge's evaluation, so decontamination against BBQ
removes these rows unless you disable it for this mix). Two forms:
- the original JSONL (data/<Category>.jsonl): {"context", "question", "ans0", "ans1", "ans2", "label", "category"}
- BIG-bench bbq_lite_json/*/task.json: {"examples": [{"input": context + question, "target_scores"}]}.
Rows are lettered multiple-choice questions answered with the letter (HELM's format)."""
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import (DataFile, Malformed, SourceRows, collect, instruction_row, multiple_choice,
                                     resolve_files, text_field)
from prepare_data.prepare_bigbench import load_tasks

REPO, FILES = "heegyu/bbq", ["data/*.jsonl", "*.jsonl"]


def load(data_file: DataFile = None, categories: Optional[List[str]] = None, answer_text: bool = False) -> SourceRows:
    """
    Args:
        data_file: BBQ JSONL file(s) or BIG-bench bbq_lite_json task folder(s)
        categories: keep only these categories (JSONL `category`, e.g. Age, Gender_identity; or task folder names)
        answer_text: answer "B. text" instead of the letter alone
    """
    paths = resolve_files(data_file, REPO, FILES)
    tasks = [p for p in paths if p.name.endswith(".json")]
    lines = [p for p in paths if p not in tasks]
    out = SourceRows(name="bbq", files=[str(p) for p in paths])
    if tasks:
        chosen = [p for p in tasks if not categories or any(c.lower() in p.parent.name.lower() for c in categories)]
        out.merge(load_tasks("bbq", chosen, with_prefix=False, answer_text=answer_text))

    def parse(r: dict):
        if categories and r.get("category") not in categories:
            return None
        choices = [text_field(r, f"ans{i}") for i in range(3)]
        label = r["label"]
        if not isinstance(label, int) or not 0 <= label < 3:
            raise Malformed(f"label {label!r} is not 0, 1 or 2")
        question = multiple_choice(f"{text_field(r, 'context')} {text_field(r, 'question')}", choices)
        return instruction_row(question, f"{'ABC'[label]}. {choices[label]}" if answer_text else "ABC"[label])

    if lines:
        out.merge(collect("bbq", lines, parse, required=["context", "question", "ans0", "ans1", "ans2", "label"]))
    return out


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("bbq", load)
