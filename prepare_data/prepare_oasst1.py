"""OpenAssistant oasst1 (OpenAssistant/oasst1, Apache-2.0): human-written conversation trees with ranked replies.
For each English tree, follow the best-ranked reply (rank 0) at every level from the root prompt down to a leaf:
one multi-turn conversation per tree. Reads the flat message files (`*.messages.jsonl.gz` or the parquet split:
one record per message with message_id, parent_id, role "prompter"/"assistant", text, lang, rank, deleted) or the
nested `*.trees.jsonl.gz` files ({"prompt": {..., "replies": [...]}})."""
import sys
from pathlib import Path
from typing import Dict, List, Optional

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError
from prepare_data.data_utils import DataFile, Malformed, SourceRows, chat_row, read_records, resolve_files

REPO, FILES = "OpenAssistant/oasst1", "2023-04-12_oasst_ready.messages.jsonl.gz"


def _flatten_tree(node: dict, parent_id, out: List[dict]) -> None:
    out.append({**{k: v for k, v in node.items() if k != "replies"}, "parent_id": parent_id})
    for reply in node.get("replies") or []:
        if isinstance(reply, dict):  # anything else is left out and its parent ends the conversation
            _flatten_tree(reply, node.get("message_id"), out)


def _rank(m: dict) -> float:
    return m["rank"] if isinstance(m.get("rank"), (int, float)) and m["rank"] == m["rank"] else float("inf")


def load(data_file: DataFile = None, lang: str = "en", max_turns: Optional[PositiveInt] = None) -> SourceRows:
    """
    Args:
        data_file: local oasst1 messages (.jsonl[.gz] / .parquet) or trees (.trees.jsonl[.gz]) file
        lang: language of the root prompt to keep ("" keeps all)
        max_turns: cut each conversation after this many user+assistant messages (rounded down to a reply)
    """
    out = SourceRows(name="oasst1")
    messages: Dict[str, dict] = {}
    children: Dict[str, List[dict]] = {}
    for path in resolve_files(data_file, REPO, FILES):
        out.files.append(str(path))
        for row_no, record in read_records(path):
            if isinstance(record, Malformed):
                out.drop(f"malformed: {record}", f"{path}:{row_no}")
                continue
            flat: List[dict] = []
            if "prompt" in record and isinstance(record["prompt"], dict):  # trees format
                _flatten_tree(record["prompt"], None, flat)
            else:
                flat = [record]
            if row_no == 1 and not {"message_id", "parent_id", "text", "role"} <= set(flat[0]):
                missing = sorted({"message_id", "parent_id", "text", "role"} - set(flat[0]))
                raise InputError(f"{path}: column {missing[0]!r} not found (columns: {sorted(flat[0])}); "
                                 f"expected oasst1 messages or trees")
            for m in flat:
                out.read += 1
                if not m.get("message_id") or not isinstance(m.get("text"), str) or m.get("role") not in ("prompter", "assistant"):
                    out.drop("malformed: message without id, text or a known role", f"{path}:{row_no}")
                    continue
                if m.get("deleted") or m.get("review_result") is False:
                    out.drop("deleted or failed review")
                    continue
                messages[m["message_id"]] = m
                if m.get("parent_id"):
                    children.setdefault(m["parent_id"], []).append(m)
    roots = [m for m in messages.values() if not m.get("parent_id") and m["role"] == "prompter"]
    for root in roots:
        if lang and root.get("lang") != lang:
            out.drop(f"root prompt not in language {lang!r}")
            continue
        path, node = [root], root
        while children.get(node["message_id"]):
            wanted = "assistant" if node["role"] == "prompter" else "prompter"
            options = [c for c in children[node["message_id"]] if c["role"] == wanted]
            if not options:
                break
            node = min(options, key=_rank)  # min is stable: ties keep file order
            path.append(node)
        turns = [m["text"] for m in path][: max_turns or None]
        try:
            out.rows.append(chat_row(turns))
        except Malformed as e:
            out.drop(f"malformed: {e}", f"tree {root['message_id']}")
    return out


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("oasst1", load)
