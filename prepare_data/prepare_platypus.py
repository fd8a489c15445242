"""Open-Platypus (garage-bAInd/Open-Platypus): 25k STEM/logic questions merged from 11 datasets; pick the subsets by
the `data_source` field. Several subsets were written by GPT-4 (airoboros, PRM800K solutions...), which the
challenge forbids: HUMAN_WRITTEN are the ones the 5th-place entry used. Record: {"instruction", "input", "output",
"data_source"}."""
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import DataFile, SourceRows, collect, instruction_row, resolve_files, text_field

REPO, FILES = "garage-bAInd/Open-Platypus", ["*.parquet", "*.jsonl", "*.json"]
HUMAN_WRITTEN = ["scienceqa", "scibench", "reclor", "theoremqa", "ARB", "guanaco"]


def load(data_file: DataFile = None, data_sources: Optional[List[str]] = None,
         exclude_sources: Optional[List[str]] = None) -> SourceRows:
    """
    Args:
        data_file: local Open-Platypus file (default: the hub's parquet; needs pyarrow)
        data_sources: keep only these `data_source` values (case-insensitive); "human" means HUMAN_WRITTEN
        exclude_sources: drop these `data_source` values
    """
    wanted = {s.lower() for s in (data_sources or []) for s in (HUMAN_WRITTEN if s == "human" else [s])}
    unwanted = {s.lower() for s in exclude_sources or []}

    def parse(r: dict):
        source = text_field(r, "data_source", required=False).lower()
        if (wanted and source not in wanted) or source in unwanted:
            return None
        return instruction_row(text_field(r, "instruction"), text_field(r, "output"), text_field(r, "input", False))

    return collect("platypus", resolve_files(data_file, REPO, FILES), parse, required=["instruction", "output", "data_source"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("platypus", load)
