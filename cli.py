"""What every script's command line shares: flags from a typed signature (jsonargparse), and one line, not a
traceback, for a mistake in what the user gave.

    if __name__ == "__main__":
        from cli import run
        run(main)

Code that finds a bad file, row, field or flag raises `InputError` with a message that names it and says what to do;
`run` prints that message as one line and exits with status 2, as it does for a flag of the wrong type or range
(declare ranges with jsonargparse.typing: PositiveInt, NonNegativeFloat, ...). Any other exception is a bug and
keeps its traceback.

Every script also takes `--config FILE.yaml` (the same flags as YAML; flags after it override it) and
`--print_config` (the YAML for the flags given). A dataclass parameter becomes a group of flags, `--train.batch_size`,
with each field's docstring as its help.
"""

import re
import sys


class InputError(ValueError):
    """A problem with the user's input: its message names the file, row, field or flag and says what to do."""


def one_line(e: BaseException) -> str:
    """An exception as one line of a warning or a table cell: its type and the first line of its message."""
    message = str(e)
    return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"


def run(fn, **kwargs):
    """jsonargparse.CLI(fn) with one-line errors (status 2) for bad flags and InputError."""
    from argparse import ArgumentError

    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # a dataclass field's docstring is its --help
    kwargs.setdefault("as_positional", False)
    try:
        return CLI(fn, exit_on_error=False, **kwargs)
    except ArgumentError as e:
        message = flag_message(str(e))
        if message.startswith("Problems parsing config"):  # jsonargparse does not say which file
            argv = list(kwargs.get("args") or sys.argv[1:])
            files = [v for k, v in zip(argv, argv[1:]) if k == "--config"]
            files += [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
            message = f"--config {' '.join(files)}: {message}" if files else message
        fail(f"{message} (see --help)")
    except InputError as e:
        fail(str(e))


def fail(message: str) -> None:
    message = " ".join(message.split())  # messages that quote another library's multi-line text stay one line
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def flag_message(text: str) -> str:
    """jsonargparse's multi-line message about a flag, as one line that leads with the flag and the value."""
    text = " ".join(text.split())
    key = re.match(r'Parser key "([^"]+)": (.*)', text)
    if not key:
        return text
    flag, detail = key.groups()
    given = re.search(r" Given value type: .*? Given value: (.*)$", detail)
    if not given:
        return f"--{flag}: {detail}"
    # An Optional[...] flag lists every member's error; the None member's says nothing about the value given.
    errors = [e for e in detail[:given.start()].partition(" Errors: - ")[2].split(" - ")
              if e and not e.startswith("Expected a <class 'NoneType'>")]
    choices = re.match(r"Expected a typing\.Literal\[(.*)\]$", errors[0]) if errors else None
    said = f"choose one of {choices.group(1)}" if choices else "; ".join(errors) or detail[:given.start()]
    return f"--{flag} {given.group(1)}: {said}"
