"""Bad input to the data preparation: one line naming the file, row, field or flag and saying what to do; nothing
half-written. Every case here went through as a traceback or a wrong result before."""
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli import InputError
from prepare_data import prepare_bigbench, prepare_dolly, prepare_mix, prepare_oasst1
from prepare_data.prepare_mix import Weights, prepare, read_recipe
from tests.data_fixtures import dolly_file, small_recipe, tiny_tokenizer_dir, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
ROW = {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def run_script(script: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_data" / script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


# ------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("name,data,line", [
    ("latin1.jsonl", (json.dumps(ROW) + "\n").encode()
     + '{"instruction": "café", "response": "x"}\n'.encode("latin-1"), 2),
    ("utf16.jsonl", (json.dumps(ROW) + "\n").encode("utf-16"), 1),
    ("latin1.csv", "instruction,response\nok,fine\ncafé,x\n".encode("latin-1"), 3),
    ("utf16.json", json.dumps([ROW]).encode("utf-16"), 1),
])
def test_file_not_utf8_names_file_and_line(tmp_path, name, data, line):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=rf"{name}: line {line} \(byte \d+\) is not UTF-8 text; "
                                         r"re-save the file as UTF-8"):
        prepare_dolly.load(tmp_path / name)


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
                                       ("header.csv", "instruction,response\n"),
                                       ("empty.json", "[]"), ("empty_data.json", '{"data": []}')])
def test_file_without_records_is_named(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=rf"{name}: no records in this file"):
        prepare_dolly.load(tmp_path / name)


@pytest.mark.parametrize("name,data,message", [
    ("x.jsonl.gz", b'{"instruction": "a"}\n', r"x\.jsonl\.gz: not a readable gzip file"),
    ("cut.jsonl.gz", gzip.compress(json.dumps(ROW).encode() * 50)[:30], r"cut\.jsonl\.gz: not a readable gzip file"),
    ("packed.jsonl", gzip.compress(json.dumps(ROW).encode()),
     r"packed\.jsonl: .* gzip-compressed: name it packed\.jsonl\.gz"),
    ("x.parquet", b"not parquet at all", r"x\.parquet: not a readable Parquet file"),
    ("number.json", b"5", r"number\.json: holds a JSON int, not a list of records"),
    ("syntax.json", b'[{"a": 1,}]', r"syntax\.json:1:10: not valid JSON"),
    ("notes.txt", b"hello", r"notes\.txt: unsupported file type"),
])
def test_broken_file_is_named(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=message):
        prepare_dolly.load(tmp_path / name)


def test_folder_glob_and_path_that_hold_no_data(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder/readme.md").write_text("no data here")
    with pytest.raises(InputError, match=r"folder: no \.jsonl/.* file there"):
        prepare_dolly.load(tmp_path / "folder")
    with pytest.raises(InputError, match=r"\*\.jsonl: the pattern matches nothing"):
        prepare_dolly.load(tmp_path / "folder/*.jsonl")
    with pytest.raises(InputError, match=r"missing\.jsonl not found"):
        prepare_dolly.load(tmp_path / "missing.jsonl")


def test_gaps_and_wrong_types_are_skipped_not_read_as_text(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": NaN, "response": "a"}\n'
                 '{"instruction": "q", "response": [1]}\n' + json.dumps(ROW) + "\n")
    out = prepare_dolly.load(f)
    assert [r["messages"][0]["content"] for r in out.rows] == ["Who wrote Hamlet?"]
    assert out.dropped == {"malformed: empty 'instruction'": 1, "malformed: field 'response' is list, expected text": 1}


def test_oasst1_tree_with_a_reply_that_is_not_a_message(tmp_path):
    def node(id_, role, text, replies=()):
        return {"message_id": id_, "role": role, "text": text, "lang": "en", "rank": 0, "replies": list(replies)}

    tree = {"message_tree_id": "t",
            "prompt": node("r", "prompter", "Hi?", [node("a", "assistant", "Hello.", ["broken"])])}
    f = write_jsonl(tmp_path / "oasst.trees.jsonl", [tree])
    assert [m["content"] for m in prepare_oasst1.load(f).rows[0]["messages"]] == ["Hi?", "Hello."]


def test_csv_byte_order_mark_and_extra_fields(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("instruction,response\nq1,a1\nq2,a2,stray\n".encode("utf-8-sig"))
    out = prepare_dolly.load(f)
    assert [r["messages"][1]["content"] for r in out.rows] == ["a1"]
    assert out.dropped == {"malformed: more fields than the header has": 1}


def test_source_without_usable_rows_names_source_and_reasons(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "d.jsonl", [{**ROW, "instruction": " "}] * 3)
    with pytest.raises(InputError, match=r"recipe: dolly: source 'dolly' produced no rows from 3 records "
                                         r"\(malformed: empty 'instruction': 3 \(e\.g\. .*d\.jsonl:1\)\)"):
        prepare(small_recipe([{"source": "dolly", "data_file": str(f)}]), tok_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("text,message", [
    ("max_seq_length: abc", r"max_seq_length: Input should be a valid integer.* \(got 'abc'\)"),
    ("max_seq_length: 0", r"max_seq_length: Input should be greater than 0 \(got 0\)"),
    ("val_size: -1", r"val_size: give a fraction of the rows .* \(got -1\)"),
    ("val_size: 2.5", r"val_size: give a fraction of the rows .* \(got 2\.5\)"),
    ("seed: x", r"seed: Input should be a valid integer.* \(got 'x'\)"),
    ("filters: {min_words: -3}", r"filters\.min_words: Input should be greater than or equal to 0 \(got -3\)"),
    ("dedup: {threshold: 7}", r"dedup\.threshold: Input should be less than or equal to 1 \(got 7\)"),
    ("dedup: {bands: 64}", r"dedup\.bands: bands cannot exceed num_perm \(32\) \(got 64\)"),
    ("decontaminate: {sets: [mmlu, mmmu]}", r"decontaminate\.sets: unknown evaluation set 'mmmu'"),
    ("prompt_style: alpacca", r"prompt_style: unknown prompt style 'alpacca'"),
    ("prompt_style: {name: x, user: 'Q: {question}'}",
     r"prompt_style: prompt style field 'user' .*\(KeyError: 'question'\)"),
    ("overlong: cut", r"overlong: Input should be 'truncate' or 'drop' \(got 'cut'\)"),
    ("sources: dolly", r"sources: Input should be a valid list \(got 'dolly'\)"),
    ("sources: []", r"sources: List should have at least 1 item"),
    ("sources: [{data_file: d.jsonl}]", r"sources\[0\]: needs a 'source' key"),
    ("sources: [{source: dolly}, {source: dolly, name: b, copies: two}]",
     r"sources\[1\]\.copies: Input should be a valid number"),
    ("sources: [{source: dolly, copies: .inf}]", r"sources\[0\]\.copies: Input should be a finite number"),
    ("sources: [{source: dolly, fraction: 0}]", r"sources\[0\]\.fraction: Input should be greater than 0 \(got 0\)"),
    ("sources: [{source: dolly, max_rows: 1.5}]", r"sources\[0\]\.max_rows: .*fractional part \(got 1\.5\)"),
    ("sources: [{source: dolly, categories: open_qa}]",
     r"sources\[0\]\.categories: Input should be a valid list \(got 'open_qa'\)"),
    ("sources: [{source: flan, submix: t5}]", r"sources\[0\]\.submix: Input should be 'flan2021', 't0'.* \(got 't5'\)"),
    ("sources: [{source: natural_instructions, max_per_task: 0}]",
     r"sources\[0\]\.max_per_task: 0 does not conform to restriction v>0"),
    ("sources: [{source: dolly, data_file: 5}]", r"sources\[0\]\.data_file: Input is not a valid path"),
    ("sources: [{source: dolly}, {source: dolly}]", r"sources\[1\]\.name: 'dolly' is also the name of sources\[0\]"),
])
def test_recipe_values_are_checked(tmp_path, text, message):
    p = tmp_path / "r.yaml"
    p.write_text(text if text.startswith("sources") else text + "\nsources: [{source: dolly}]\n")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'r.yaml'}: {message}"):
        read_recipe(p)


@pytest.mark.parametrize("name,text,where", [
    ("r.yaml", "sources:\n  - source: dolly\n  max_seq_length: 5\n", r"r\.yaml:3:3: not valid YAML"),
    ("r.yaml", "name: [unclosed\n", r"r\.yaml:2:1: not valid YAML"),
    ("r.json", '{"sources": [{"source": "dolly",}]}', r"r\.json:1:33: not valid JSON"),
    ("r.yaml", "- a\n- b\n", r"r\.yaml: a recipe is a mapping of keys"),
    ("missing.yaml", None, r"missing\.yaml: file not found"),
])
def test_recipe_syntax_errors_name_file_line_and_column(tmp_path, name, text, where):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=where):
        read_recipe(tmp_path / name)


# ---------------------------------------------------------------------------------- the prepared folder
def test_failed_run_leaves_the_previous_folder_as_it_was(tmp_path, tok_dir, monkeypatch):
    f = dolly_file(tmp_path / "d.jsonl", 20)
    out = tmp_path / "out"
    prepare(small_recipe([{"source": "dolly", "data_file": str(f)}], val_size=2), tok_dir, out, progress=False)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_mix, "_histogram", full_disk)  # fails after the splits are written
    with pytest.raises(OSError):
        prepare(small_recipe([{"source": "dolly", "data_file": str(f)}], val_size=2, seed=7), tok_dir, out,
                progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before


def test_empty_val_is_reported_and_empty_train_refused(tmp_path, tok_dir):
    f = dolly_file(tmp_path / "d.jsonl", 5)
    report = prepare(small_recipe([{"source": "dolly", "data_file": str(f)}], val_size=0), tok_dir, tmp_path / "a",
                     progress=False)
    assert report["val_rows"] == json.loads((tmp_path / "a/meta.json").read_text())["n_val"] == 0
    assert "**Val**: empty (val_size 0" in (tmp_path / "a/report.md").read_text()
    with pytest.raises(InputError, match=r"recipe: no training rows left .*raise copies"):
        prepare(small_recipe([{"source": "dolly", "data_file": str(f), "copies": 0}]), tok_dir, tmp_path / "b",
                progress=False)
    assert not (tmp_path / "b").exists()


def test_meta_records_the_tokenizer_fingerprint(tmp_path, tok_dir):
    from tokenizer import Tokenizer

    f = dolly_file(tmp_path / "d.jsonl", 5)
    prepare(small_recipe([{"source": "dolly", "data_file": str(f)}]), tok_dir, tmp_path / "out", progress=False)
    other = tiny_tokenizer_dir(tmp_path / "other", bos=False)
    fingerprint = json.loads((tmp_path / "out/meta.json").read_text())["tokenizer_fingerprint"]
    assert fingerprint == Tokenizer(tok_dir).fingerprint() != Tokenizer(other).fingerprint()


def test_checkpoint_short_name_resolves_or_fails_in_one_line(tmp_path, tok_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = dolly_file(tmp_path / "d.jsonl", 5)
    with pytest.raises(InputError, match=r"--checkpoint_dir smollm2-135m: .*SmolLM2-135M-Instruct: "
                                         r"checkpoint .* not found; get it"):
        prepare(small_recipe([{"source": "dolly", "data_file": str(f)}]), "smollm2-135m", tmp_path / "out",
                progress=False)
    with pytest.raises(InputError, match=r"--checkpoint_dir smollm3: smollm3: "
                                         r"neither a checkpoint folder nor a registered"):
        prepare(small_recipe([{"source": "dolly", "data_file": str(f)}]), "smollm3", tmp_path / "out", progress=False)
    folder = tiny_tokenizer_dir(tmp_path / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    (folder / "model_config.json").write_text("{}")
    prepare(small_recipe([{"source": "dolly", "data_file": str(f)}]), "smollm2-135m", tmp_path / "out", progress=False)
    assert (json.loads((tmp_path / "out/meta.json").read_text())["tokenizer_dir"]
            == "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")


# --------------------------------------------------------------------------- evaluation sets and BIG-bench
def test_missing_evaluation_set_names_set_and_recipe_key(tmp_path, tok_dir, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    f = dolly_file(tmp_path / "d.jsonl", 5)
    r = small_recipe([{"source": "dolly", "data_file": str(f)}],
                     decontaminate={"sets": ["truthfulqa"], "assets_dir": str(tmp_path)})
    with pytest.raises(InputError, match=r"decontaminate: no test questions for 'truthfulqa': BIG-bench task files "
                                         r"truthful_qa/task_mc\.json not found .*PyPI package .*no longer served; copy "
                                         r"github\.com/google/BIG-bench's bigbench/benchmark_tasks/"
                                         r"truthful_qa/task_mc\.json"
                                         r".*no network.*Remove 'truthfulqa' from decontaminate\.sets"):
        prepare(r, tok_dir, tmp_path / "out", progress=False)
    r = small_recipe([{"source": "dolly", "data_file": str(f)}],
                     decontaminate={"sets": ["mine"], "files": {"mine": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(InputError, match=r"decontaminate\.files\.mine: data file .*nope\.jsonl not found"):
        prepare(r, tok_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_bigbench_tasks_say_where_to_get_them(tmp_path):
    with pytest.raises(InputError, match=r"bigbench: give data_file.*github\.com/google/BIG-bench's "
                                         r"bigbench/benchmark_tasks"):
        prepare_bigbench.load()
    task = tmp_path / "data/assets/bigbench/date_understanding"
    with pytest.raises(InputError, match=rf"BIG-bench task files date_understanding not found at {task}: "
                                         r"the bigbench PyPI "
                                         rf"package .* copy .*benchmark_tasks/date_understanding to {task}$"):
        prepare_bigbench.load(task)


# -------------------------------------------------------------------------------------------- commands
SCRIPTS = sorted(p.name for p in (ROOT / "prepare_data").glob("prepare_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_for_every_script(script):
    result = run_script(script, "--help")
    assert result.returncode == 0 and "--checkpoint_dir" in result.stdout, result.stderr[-2000:]


def test_loader_options_can_all_be_set_from_a_recipe():
    """A loader parameter named like a recipe key of every source (name, copies...) would never reach the loader."""
    import inspect

    shadowed = {script: sorted(set(inspect.signature(prepare_mix.source_loader(script[8:-3])).parameters)
                               & set(Weights.model_fields))
                for script in SCRIPTS if script != "prepare_mix.py"}
    assert {k: v for k, v in shadowed.items() if v} == {}


@pytest.mark.parametrize("script,args,message", [
    ("prepare_mix.py", ["--epochs", "0"], r"--epochs: .*0 does not conform to restriction v>0"),
    ("prepare_mix.py", ["--tokens_per_s", "-5"], r"--tokens_per_s -5: .*restriction v>0"),
    ("prepare_mix.py", ["--checkpoint_dir", "smollm3"],
     r"--checkpoint_dir smollm3: smollm3: neither a checkpoint folder"),
    ("prepare_mix.py", ["--recipe", "nope.yaml"], r"nope\.yaml: file not found"),
    ("prepare_dolly.py", ["--max_seq_length", "0"], r"--max_seq_length: .*restriction v>0"),
    ("prepare_dolly.py", ["--val_size", "2.5"], r"prepare_dolly\.py: val_size: give a fraction of the rows"),
    ("prepare_dolly.py", ["--prompt_style", "alpacca"], r"--prompt_style: .*'alpaca', 'mistral'"),
    ("prepare_dolly.py", ["--decontaminate_sets", "[mmmu]"], r"decontaminate\.sets: unknown evaluation set 'mmmu'"),
    ("prepare_dolly.py", ["--out_dir", "{data}"], r"--out_dir .*d\.jsonl: is a file"),
    ("prepare_flan.py", ["--max_per_task", "0"], r"--max_per_task 0: .*restriction v>0"),
    ("prepare_truthfulqa.py", ["--mode", "both"], r"--mode: .*'qa', 'mc'"),
])
def test_bad_flags_give_one_line_and_status_2(tmp_path, tok_dir, script, args, message):
    data = dolly_file(tmp_path / "d.jsonl", 5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"decontaminate: false\nsources: [{{source: dolly, data_file: {data}}}]\n")
    base = ["--recipe", recipe] if script == "prepare_mix.py" else ["--data_file", data, "--decontaminate", "false"]
    flags = dict(zip(base[::2], base[1::2]), **{"--checkpoint_dir": tok_dir, "--out_dir": tmp_path / "out"})
    flags.update({k: v.format(data=data) for k, v in zip(args[::2], args[1::2])})
    result = run_script(script, *[x for kv in flags.items() for x in kv], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
