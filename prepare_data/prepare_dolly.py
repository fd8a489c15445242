"""Dolly-15k (databricks/databricks-dolly-15k, CC BY-SA 3.0): 15k instruction/response pairs written by Databricks
employees. Record: {"instruction", "context", "response", "category"}; the context becomes the prompt's input."""
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import DataFile, SourceRows, collect, instruction_row, resolve_files, text_field

REPO, FILES = "databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl"


def load(data_file: DataFile = None, categories: Optional[List[str]] = None) -> SourceRows:
    """
    Args:
        data_file: local databricks-dolly-15k.jsonl (default: download it from the hub)
        categories: keep only these categories (open_qa, general_qa, classification, closed_qa, brainstorming,
            information_extraction, summarization, creative_writing)
    """
    def parse(r: dict):
        if categories and r.get("category") not in categories:
            return None
        return instruction_row(text_field(r, "instruction"), text_field(r, "response"), text_field(r, "context", False))

    return collect("dolly", resolve_files(data_file, REPO, FILES), parse, required=["instruction", "response"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("dolly", load)
