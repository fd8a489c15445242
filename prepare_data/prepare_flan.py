"""FLAN collection submixes (DataProvenanceInitiative/<submix>_submix_original: flan2021, t0, niv2, cot, dialog;
templates applied to human-written datasets). Record: {"inputs", "targets", "task_name", "task_source",
"template_type"} where template_type is zs_opt / zs_noopt / fs_opt / fs_noopt (zero/few-shot, with/without options)."""
import fnmatch
import sys
from pathlib import Path
from typing import List, Literal, Optional

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import DataFile, SourceRows, collect, instruction_row, resolve_files, text_field


def load(data_file: DataFile = None, submix: Literal["flan2021", "t0", "niv2", "cot", "dialog"] = "flan2021",
         tasks: Optional[List[str]] = None, template_types: Optional[List[str]] = None,
         max_per_task: Optional[PositiveInt] = None) -> SourceRows:
    """
    Args:
        data_file: local submix file(s) with inputs/targets columns (default: the hub's parquet, needs pyarrow)
        submix: which submix to download: flan2021, t0, niv2, cot or dialog
        tasks: keep only tasks whose task_name matches one of these globs
        template_types: keep only these template types (e.g. [zs_opt, zs_noopt] for zero-shot only)
        max_per_task: keep at most this many rows of each task (the first ones)
    """
    per_task = {}

    def parse(r: dict):
        name = str(r.get("task_name", ""))
        if tasks and not any(fnmatch.fnmatch(name, t) for t in tasks):
            return None
        if template_types and r.get("template_type") not in template_types:
            return None
        if max_per_task and per_task.get(name, 0) >= max_per_task:
            return None
        row = instruction_row(text_field(r, "inputs"), text_field(r, "targets"))
        per_task[name] = per_task.get(name, 0) + 1
        return row

    files = resolve_files(data_file, f"DataProvenanceInitiative/{submix}_submix_original", ["*.parquet", "*.jsonl*"])
    return collect("flan", files, parse, required=["inputs", "targets"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("flan", load)
