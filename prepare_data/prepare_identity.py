"""LLaMA-Factory's identity data (data/identity.json of its sdist, Apache-2.0; prepare_data/fetch_offline_assets.py
puts it in data/assets/llamafactory): 91 short "who are you?" exchanges written by its authors, with {{name}} and
{{author}} placeholders filled here. A few dozen steps teach a model its new name, which is why the quickstart uses
it: the change is plain to see."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import SourceRows, collect, instruction_row, resolve_files, text_field  # noqa: E402


def load(data_file: Path = Path("data/assets/llamafactory/identity.json"), model_name: str = "oneday",
         author: str = "the oneday project", english_only: bool = True) -> SourceRows:
    """
    Args:
        data_file: LLaMA-Factory's identity.json
        model_name: what the model answers when asked its name
        author: who the model says made it
        english_only: keep the English exchanges only (the file also has Chinese ones)
    """
    def parse(r: dict):
        instruction, output = text_field(r, "instruction"), text_field(r, "output")
        if english_only and not (instruction + output).isascii():
            return None
        fill = lambda text: text.replace("{{name}}", model_name).replace("{{author}}", author)  # noqa: E731
        return instruction_row(fill(instruction), fill(output), text_field(r, "input", required=False))

    return collect("identity", resolve_files(data_file, None, []), parse, required=["instruction", "output"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("identity", load)
