"""Prompt templates: the single place shared by data preparation (training) and the server (inference).

A style turns a conversation into text segments. Training tokenizes the segments one by one and puts the loss on
the segments flagged as targets (the assistant's replies); serving renders the same user turn with `render` and lets
the model continue. Because both go through `conversation_segments`, the prompt a served model sees is exactly the
prompt it was trained on.

    >>> render("alpaca", "Name a colour.")
    '### Instruction:\\nName a colour.\\n\\n### Response:\\n'

Messages are dicts `{"role": "system" | "user" | "assistant", "content": str}`; a user message may carry an extra
`"input"` (the Alpaca "context" field) which styles that have an input section show separately.
The EOS token is not part of any style: data preparation appends the tokenizer's EOS id after the last reply, and
the server stops at EOS or at the style's `stop` strings.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from cli import InputError


@dataclass(frozen=True)
class PromptStyle:
    name: str
    system: str = ""             # format of a system message, "{content}"; "" = styles without a system slot put it before the first turn
    user: str = "{content}"      # format of a user turn; "{content}" is the instruction (with the input appended if no `user_with_input`)
    user_with_input: str = ""    # format when the user turn has an input; "" = content + "\n\n" + input
    header: str = ""             # text between the user turn and the reply; the prompt a served model sees ends here
    reply_prefix: str = ""       # starts the reply segment (e.g. " " after "Assistant:"), so it is learned, not prompted
    turn_end: str = "\n\n"       # after every reply but the last one (the last one is followed by EOS instead)
    turn_separator: str = ""     # between a reply's turn_end and the next user turn
    stop: Tuple[str, ...] = ()   # strings at which the server cuts a generation: the start of the next user turn
    default_system: str = ""     # system message used when a conversation has none

    def __post_init__(self) -> None:
        # styles come from recipes and prompt_style.json files: a wrong field fails here,
        # not in the middle of tokenizing
        for name, value in asdict(self).items():
            if name == "stop" and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                raise InputError(f"prompt style field 'stop' must be a list of strings, got {value!r}")
            if name != "stop" and not isinstance(value, str):
                raise InputError(f"prompt style field {name!r} must be a string, got {value!r}")
        for name, keys in (("system", ["content"]), ("user", ["content"]), ("user_with_input", ["content", "input"])):
            try:
                getattr(self, name).format(**dict.fromkeys(keys, ""))
            except (KeyError, IndexError, ValueError) as e:
                raise InputError(f"prompt style field {name!r} = {getattr(self, name)!r} is not a template of "
                                 f"{', '.join('{' + k + '}' for k in keys)} ({type(e).__name__}: {e}); "
                                 f"write a literal brace as {{{{ or }}}}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PromptStyle":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"prompt style has unknown field(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        if "name" not in d:
            raise InputError(f"a prompt style needs a 'name' (fields: {sorted(d)})")
        stop = d.get("stop", ())
        return cls(**{**d, "stop": tuple(stop) if isinstance(stop, list) else stop})


STYLES: Dict[str, PromptStyle] = {
    s.name: s
    for s in [
        # Stanford Alpaca / lit-gpt (no preamble: Upaya's 1st-place 4090 entry used exactly these three headers)
        PromptStyle(
            name="alpaca",
            system="{content}\n\n",
            user="### Instruction:\n{content}",
            user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}",
            header="\n\n### Response:\n",
            turn_end="\n\n",
            stop=("\n### Instruction:", "\n### Input:"),
        ),
        # Mistral-7B-Instruct: "<s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>"; BOS comes from the tokenizer
        PromptStyle(
            name="mistral",
            system="{content}\n\n",
            user="[INST] {content}",
            header=" [/INST]",
            reply_prefix=" ",
            turn_end="</s>",
            stop=("[INST]",),
        ),
        PromptStyle(
            name="chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            header="<|im_start|>assistant\n",
            turn_end="<|im_end|>\n",
            stop=("<|im_end|>", "<|im_start|>"),
        ),
        # Percent_bfd's 1st-place A100 entry (Qwen-14B)
        PromptStyle(
            name="human_assistant",
            system="{content}\n\n",
            user="Human: {content}",
            header="\nAssistant:",
            reply_prefix=" ",
            turn_end="\n\n",
            stop=("\nHuman:",),
        ),
        # No template at all: prompt and reply are concatenated (completion-style data, e.g. summarisation)
        PromptStyle(name="plain", system="{content}\n\n", header="", turn_end="\n\n"),
    ]
}

Segment = Tuple[str, bool]  # (text, is_target)


def get_style(style: Union[str, PromptStyle, dict]) -> PromptStyle:
    if isinstance(style, PromptStyle):
        return style
    if isinstance(style, dict):
        return PromptStyle.from_dict(style)
    if not isinstance(style, str) or style not in STYLES:
        raise InputError(f"unknown prompt style {style!r}; choose one of {sorted(STYLES)} or give a prompt_style.json")
    return STYLES[style]


def _user_text(style: PromptStyle, message: dict) -> str:
    content, extra = message["content"], message.get("input") or ""
    if not extra:
        return style.user.format(content=content)
    if style.user_with_input:
        return style.user_with_input.format(content=content, input=extra)
    return style.user.format(content=f"{content}\n\n{extra}")


def conversation_segments(style: Union[str, PromptStyle], messages: List[dict], system: Optional[str] = None) -> List[Segment]:
    """Split a conversation into (text, is_target) segments. Every assistant reply is a target; its turn_end too
    (except after the last reply, where the caller appends EOS). The user turn and the header are separate
    segments so truncation can shorten the user text and keep the header next to the reply."""
    style = get_style(style)
    segments: List[Segment] = []
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    system = system if system is not None else style.default_system
    prefix = style.system.format(content=system) if system else ""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            if segments and segments[-1][1]:
                prefix += style.turn_separator
            segments.append((prefix + _user_text(style, m), False))
            if style.header:
                segments.append((style.header, False))
            prefix = ""
        elif m["role"] == "assistant":
            end = "" if i == len(messages) - 1 else style.turn_end
            segments.append((style.reply_prefix + m["content"] + end, True))
        else:
            raise ValueError(f"message {i} has role {m['role']!r}; a system message may only come first")
    return segments


def render(style: Union[str, PromptStyle], prompt: str, input: str = "", system: Optional[str] = None) -> str:
    """The prompt a served model gets for one instruction (+ optional input): everything up to where the reply starts."""
    style = get_style(style)
    segments = conversation_segments(style, [{"role": "user", "content": prompt, "input": input}], system)
    return "".join(text for text, _ in segments)


def render_messages(style: Union[str, PromptStyle], messages: List[dict], system: Optional[str] = None) -> str:
    """The prompt for a multi-turn chat ending with a user turn (serving an OpenAI-style messages list)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's turn to render a prompt for generation")
    return "".join(text for text, _ in conversation_segments(style, messages, system))


def save_style(directory: Union[str, Path], style: Union[str, PromptStyle]) -> Path:
    """Write `prompt_style.json`: the full style, so a custom one is reproduced exactly by the server."""
    path = Path(directory) / "prompt_style.json"
    path.write_text(json.dumps(get_style(style).to_dict(), indent=2) + "\n")
    return path


def load_style(directory: Union[str, Path], default: Optional[str] = None) -> PromptStyle:
    """Read `prompt_style.json` from a data or checkpoint folder; `default` (a style name) if the file is absent."""
    path = Path(directory) / "prompt_style.json"
    if not path.is_file():
        if default is None:
            raise InputError(f"{path} not found: give the prompt style explicitly (one of {sorted(STYLES)})")
        return get_style(default)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); re-create it with prompts.save_style") from None
    if isinstance(data, dict) and list(data) == ["name"]:  # {"name": "alpaca"} or "alpaca" is enough
        data = data["name"]
    try:
        return get_style(data)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
