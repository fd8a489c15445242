"""CNN/DailyMail 3.0.0 (abisee/cnn_dailymail): news articles with bullet-point highlights as the summary.
Record: {"article", "highlights", "id"}. The HELM summarisation prompt asks for a 3-sentence summary."""
import sys
from pathlib import Path
from typing import Literal, Optional

from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare_data.data_utils import DataFile, SourceRows, collect, instruction_row, resolve_files, text_field

REPO = "abisee/cnn_dailymail"


def load(data_file: DataFile = None, split: Literal["train", "validation", "test"] = "train",
         max_article_words: Optional[PositiveInt] = 600,
         instruction: str = "Summarize the following article in 3 sentences.") -> SourceRows:
    """
    Args:
        data_file: local CNN/DailyMail file with article/highlights columns (default: hub parquet, needs pyarrow)
        split: hub split (train, validation, test)
        max_article_words: skip longer articles (they would be truncated anyway); None keeps all
        instruction: the instruction shown before the article
    """
    def parse(r: dict):
        article = text_field(r, "article")
        if max_article_words and len(article.split()) > max_article_words:
            return None
        return instruction_row(instruction, text_field(r, "highlights"), article)

    return collect("cnn_dailymail", resolve_files(data_file, REPO, f"3.0.0/{split}-*.parquet"), parse,
                   required=["article", "highlights"])


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("cnn_dailymail", load)
