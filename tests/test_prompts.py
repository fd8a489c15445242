"""prompts.py: exact template strings, training segments == serving prompt, multi-turn targets, prompt_style.json."""
import json

import pytest

import prompts
from cli import InputError


def test_alpaca_exact_strings():
    assert prompts.render("alpaca", "Name a colour.") == "### Instruction:\nName a colour.\n\n### Response:\n"
    assert prompts.render("alpaca", "Sum.", input="1 2") == "### Instruction:\nSum.\n\n### Input:\n1 2\n\n### Response:\n"


@pytest.mark.parametrize("style,expected", [
    ("mistral", "[INST] Hi [/INST]"),
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("human_assistant", "Human: Hi\nAssistant:"),
    ("plain", "Hi"),
])
def test_other_styles(style, expected):
    assert prompts.render(style, "Hi") == expected


@pytest.mark.parametrize("style", sorted(prompts.STYLES))
def test_training_prompt_is_the_serving_prompt(style):
    segments = prompts.conversation_segments(style, [{"role": "user", "content": "Q?", "input": "ctx"},
                                                     {"role": "assistant", "content": "A."}])
    prompt = "".join(t for t, target in segments if not target)
    assert prompt == prompts.render(style, "Q?", input="ctx")
    assert [target for _, target in segments][-1] is True
    assert segments[-1][0].endswith("A.")  # no turn_end after the last reply: EOS follows it


def test_multi_turn_targets_and_turn_ends():
    msgs = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    segs = prompts.conversation_segments("chatml", msgs, system="Be brief.")
    assert [t for _, t in segs] == [False, False, True, False, False, True]
    assert segs[0][0] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n"
    assert segs[2][0] == "a1<|im_end|>\n" and segs[5][0] == "a2"
    assert "".join(t for t, _ in segs[:5]) == prompts.render_messages("chatml", msgs[:3], system="Be brief.")
    mistral = "".join(t for t, _ in prompts.conversation_segments("mistral", msgs))
    assert mistral == "[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2"


def test_system_message_first_only():
    with pytest.raises(ValueError, match="system"):
        prompts.conversation_segments("alpaca", [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


def test_save_load_roundtrip(tmp_path):
    custom = prompts.PromptStyle(name="mine", user="Q: {content}", header="\nA:", reply_prefix=" ", stop=("\nQ:",))
    prompts.save_style(tmp_path, custom)
    loaded = prompts.load_style(tmp_path)
    assert loaded == custom and prompts.render(loaded, "x") == "Q: x\nA:"
    (tmp_path / "prompt_style.json").write_text(json.dumps({"name": "alpaca"}))
    assert prompts.load_style(tmp_path) == prompts.STYLES["alpaca"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt style 'nope'"):
        prompts.get_style("nope")
    with pytest.raises(InputError, match="prompt_style.json"):
        prompts.load_style(tmp_path)
    assert prompts.load_style(tmp_path, default="plain").name == "plain"
    (tmp_path / "prompt_style.json").write_text('{"name": "x", "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        prompts.load_style(tmp_path)


@pytest.mark.parametrize("fields,message", [
    ({"user": "Q: {question}"},
     r"field 'user' = 'Q: \{question\}' is not a template of \{content\} \(KeyError: 'question'\)"),
    ({"user_with_input": "{content} {0}"}, r"field 'user_with_input' .* \(IndexError"),
    ({"system": "{"}, r"field 'system' .*Single '\{'"),
    ({"header": 5}, r"field 'header' must be a string, got 5"),
    ({"stop": "###"}, r"field 'stop' must be a list of strings, got '###'"),
    ({"stop": [1]}, r"field 'stop' must be a list of strings"),
])
def test_style_mistakes_fail_when_the_style_is_read(tmp_path, fields, message):
    """A recipe's or prompt_style.json's style is checked when read, not halfway through tokenizing a data set."""
    with pytest.raises(ValueError, match=message):
        prompts.get_style({"name": "mine", **fields})
    (tmp_path / "prompt_style.json").write_text(json.dumps({"name": "mine", **fields}))
    with pytest.raises(ValueError, match=r"prompt_style\.json: .*" + message):
        prompts.load_style(tmp_path)


@pytest.mark.parametrize("style", [5, ["alpaca"], {"user": "{content}"}])
def test_style_of_the_wrong_shape(style):
    with pytest.raises(ValueError, match="unknown prompt style|needs a 'name'"):
        prompts.get_style(style)
