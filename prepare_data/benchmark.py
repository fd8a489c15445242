"""Measure how long preparing N rows takes (load -> dedup -> decontaminate -> tokenize -> write), on synthetic
instruction rows with realistic English-like lengths, through the same code prepare_mix.py runs.

    python prepare_data/benchmark.py --rows 1000000 --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
"""
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.prepare_mix import check_recipe, prepare


def main(checkpoint_dir: Path, rows: PositiveInt = 100_000, words_per_row: PositiveInt = 120,
         decontaminate_sets: List[str] = ["mmlu", "truthfulqa", "bbq"], seed: int = 0) -> None:
    """
    Args:
        checkpoint_dir: the tokenizer to use (a checkpoint folder or a short name such as smollm2-135m)
        rows: number of synthetic rows
        words_per_row: average words per row (instruction + response)
        decontaminate_sets: evaluation sets to decontaminate against ([] for none): offline assets
            (prepare_data/fetch_offline_assets.py), else the hub
        seed: seed of the synthetic text
    """
    words = Path(__file__).resolve().parent.parent.joinpath("prompts.py").read_text().split() * 3
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        with open(data, "w") as f:
            for i in range(rows):
                n = max(3, rng.randint(words_per_row // 2,
                                       words_per_row * 3 // 2))  # a third of it, the instruction, not empty
                text = rng.choices(words, k=n)
                f.write(json.dumps({"instruction": " ".join(text[: n // 3]), "input": "",
                                    "output": " ".join(text[n // 3:]) + f" {i}"}) + "\n")
        recipe = check_recipe({"name": "benchmark", "max_seq_length": 2048, "sources": [{"source": "generic", "data_file": str(data)}],
                               "decontaminate": {"sets": decontaminate_sets}}, "benchmark.py")
        t0 = time.perf_counter()
        report = prepare(recipe, checkpoint_dir, Path(tmp) / "out")
        seconds = time.perf_counter() - t0
    print(json.dumps({"rows": rows, "train_tokens": report["train_tokens"], "seconds": round(seconds, 1),
                      "rows_per_s": round(rows / seconds), "tokens_per_s": round(report["train_tokens"] / seconds)}))


if __name__ == "__main__":
    from cli import run

    run(main)
