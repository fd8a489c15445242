"""Any local (or hub) JSON / JSONL / CSV / TSV / Parquet file, with a field mapping. Either instruction/input/output
columns, or one column holding a conversation: a list of {"role", "content"} (OpenAI) or {"from", "value"}
(ShareGPT: human/gpt) messages."""
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError
from prepare_data.data_utils import (DataFile, Malformed, SourceRows, chat_row, collect, instruction_row, resolve_files,
                                     text_field)

_USER, _ASSISTANT = {"user", "human", "prompter"}, {"assistant", "gpt", "bot", "model"}


def load(data_file: DataFile = None, instruction_field: str = "instruction", input_field: Optional[str] = "input",
         output_field: str = "output", messages_field: Optional[str] = None, system_field: Optional[str] = None,
         hub_repo: Optional[str] = None, hub_files: List[str] = ["*.jsonl", "*.json", "*.parquet"],
         json_key: Optional[str] = None) -> SourceRows:
    """
    Args:
        data_file: local file(s), folder or glob
        instruction_field: column with the instruction
        input_field: column with the optional input/context (None: no input column)
        output_field: column with the response
        messages_field: column with a whole conversation instead of instruction/output
        system_field: column with a system prompt
        hub_repo: download from this hub dataset instead of data_file
        hub_files: file patterns to download from hub_repo
        json_key: in a JSON object file, the key that holds the list of records
    """
    if data_file is None and hub_repo is None:
        raise InputError("generic: give data_file (or hub_repo)")

    def parse(r: dict):
        system = text_field(r, system_field, required=False) if system_field else ""
        if messages_field:
            turns = []
            for m in r[messages_field] or []:
                role = str(m.get("role", m.get("from", ""))).lower()
                if role == "system":
                    system = str(m.get("content", m.get("value", "")))
                    continue
                if role not in _USER | _ASSISTANT or (role in _USER) != (len(turns) % 2 == 0):
                    raise Malformed(f"message roles must alternate user/assistant, got {role!r} at turn {len(turns)}")
                turns.append(m.get("content", m.get("value")))
            return chat_row(turns, system)
        extra = text_field(r, input_field, required=False) if input_field and input_field in r else ""
        return instruction_row(text_field(r, instruction_field), text_field(r, output_field), extra, system)

    required = [messages_field] if messages_field else [instruction_field, output_field]
    return collect("generic", resolve_files(data_file, hub_repo, hub_files), parse, required=required,
                   list_key=json_key)


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("generic", load)
