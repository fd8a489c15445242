"""LIMA (GAIR/lima, gated: accept its terms on the hub and log in): 1,030 curated conversations.
Record: {"conversations": [user, assistant, user, assistant, ...], "source": "stackexchange" | "wikihow" | ...}."""
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import DataFile, Malformed, SourceRows, chat_row, collect, resolve_files

REPO, FILES = "GAIR/lima", "train.jsonl"


def load(data_file: DataFile = None, multi_turn: bool = True, sources: Optional[List[str]] = None) -> SourceRows:
    """
    Args:
        data_file: local LIMA train.jsonl (default: download it from the hub)
        multi_turn: keep whole multi-turn conversations (loss on every reply); False keeps the first exchange only
        sources: keep only rows whose `source` is one of these
    """
    def parse(r: dict):
        if sources and r.get("source") not in sources:
            return None
        turns = r["conversations"]
        if not isinstance(turns, list):
            raise Malformed("'conversations' is not a list")
        return chat_row(turns if multi_turn else turns[:2])

    return collect("lima", resolve_files(data_file, REPO, FILES), parse, required=["conversations"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("lima", load)
