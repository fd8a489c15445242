"""What every script's command line shares: flags from a typed signature (jsonargparse), and one line, not a
traceback, for a mistake in what the user gave.

    if __name__ == "__main__":
        from cli import run
        run(main)

Code that finds a bad file, row, field or flag raises `InputError` with a message that names it and says what to do;
`run` prints that message as one line and exits with status 2, as it does for a flag of the wrong type or range
(declare ranges with jsonargparse.typing: PositiveInt, NonNegativeFloat, ...). Any other exception is a bug and
keeps its traceback.
"""

import re
import sys


class InputError(ValueError):
    """A problem with the user's input: its message names the file, row, field or flag and says what to do."""


def run(fn, **kwargs):
    """jsonargparse.CLI(fn) with one-line errors (status 2) for bad flags and InputError."""
    from argparse import ArgumentError

    from jsonargparse import CLI

    kwargs.setdefault("as_positional", False)
    try:
        return CLI(fn, exit_on_error=False, **kwargs)
    except ArgumentError as e:
        fail(f"{flag_message(str(e))} (see --help)")
    except InputError as e:
        fail(str(e))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def flag_message(text: str) -> str:
    """jsonargparse's multi-line message about a flag, as one line that leads with the flag."""
    text = " ".join(text.split())
    key = re.match(r'Parser key "([^"]+)": (.*)', text)
    if not key:
        return text
    flag, detail = key.groups()
    choices = re.search(r"Expected a typing\.Literal\[(.*?)\]", detail)
    given = re.search(r"Given value: (.*)$", detail)
    if choices and given:  # an Optional[Literal] lists every Union member's error: say what is allowed instead
        return f"--{flag} {given.group(1)}: choose one of {choices.group(1)}"
    return f"--{flag}: {detail}"
