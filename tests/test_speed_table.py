"""Issue 6's side-by-side harness on CPU: the per-cap verdict of benchmarks/speed_table.py on synthetic rows, the peer
runner's child processes (relabelling, out-of-memory, time limit, budget) with a stand-in anchor, and the random
Hugging Face checkpoint writer on a tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peer_models, speed_table

ROOT = Path(__file__).resolve().parent.parent


def row(system, tps, peak, mb=1, ckpt="none", seq=2048, model="Mistral-7B-v0.1", **extra):
    r = {"system": system, "model": model, "seq": seq, "mb": mb, "grad_ckpt": ckpt, **extra}
    if tps is not None:
        r |= {"tokens_per_s": tps, "peak_mem_gib": peak}
    return r


def write_jsonl(path, rows, noise=True):
    lines = ['{"probe": {"gpu": "H100"}}', "Unsloth: patching ..."] if noise else []
    path.write_text("\n".join(lines + [json.dumps(r) for r in rows]) + "\n")
    return path


def cells(results):
    return {(v["model"], v["seq"], v["cap"]): v for v in results}


def test_verdict_per_cap(tmp_path, capsys):
    ours = [row("oneday", 14_000, 7.9, mb=2, ckpt="full"),
            row("oneday", 14_500, 12.0, mb=4, ckpt="full"),
            row("oneday", 99_999, 9.0, mb=8, ckpt="none", error="out of memory"),  # listed, never best
            row("oneday", 30_000, 30.0, mb=2, ckpt="none")]  # over every cap
    peers = [{"system": "unsloth-2026.10.9", "arch": "mistral-7b", "seq": 2048, "mb": 4, "grad_ckpt": "unsloth",
              "tokens_per_s": 10_838, "peak_mem_gib": 6.6},  # the anchor's own label: arch only
             row("unsloth-2026.10.9", 12_000, 8.01, mb=8, ckpt="unsloth"),  # just over 8 GiB: counts from 16 on
             row("unsloth", None, None, mb=2, ckpt=False, error="timed out after 150 s"),
             row("hf-peft-bnb", 50_000, 5.0, ckpt=1)]  # not a side of the verdict
    path = write_jsonl(tmp_path / "speed.jsonl", ours + peers)
    rows = speed_table.read_rows([path])
    assert len(rows) == len(ours) + len(peers)
    got = cells(speed_table.verdicts(rows, [8, 16, 24], 1.25))
    m = "Mistral-7B-v0.1"
    assert got[(m, 2048, 8)]["peer"]["tokens_per_s"] == 10_838  # the 8.01 GiB row does not count under 8
    assert got[(m, 2048, 8)]["verdict"] == "PASS" and got[(m, 2048, 8)]["ratio"] == pytest.approx(14_000 / 10_838)
    assert got[(m, 2048, 16)]["peer"]["tokens_per_s"] == 12_000
    assert got[(m, 2048, 16)]["ours"]["tokens_per_s"] == 14_500  # the 99,999 error row is not best
    assert got[(m, 2048, 16)]["verdict"] == "FAIL"  # 1.21x
    assert got[(m, 2048, 24)]["verdict"] == "FAIL"

    assert speed_table.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| oneday | Mistral-7B-v0.1 | 8 x 2048 | off | — | error: out of memory |" in out
    assert "| unsloth-2026.10.9 | Mistral-7B-v0.1 | 4 x 2048 | offloaded | 10,838 | 6.60 |" in out
    assert "| Mistral-7B-v0.1 | 2048 | 8 | 14,000 (2 x 2048, on, 7.90 GiB) | 10,838 (4 x 2048, offloaded, 6.60 GiB) " \
           "| 1.29 | PASS |" in out
    assert "1 of 3 (model, seq, cap) cells PASS" in out


def test_fp8_rows_say_so_in_the_verdict():
    fp8 = row("oneday (fused+graph+fp8)", 14_000, 7.9, mb=1, ckpt="none")
    assert speed_table.describe(fp8) == "14,000 (1 x 2048, FP8 base matmuls, off, 7.90 GiB)"
    assert "FP8 input-gradient" in speed_table.describe(row("oneday (fused+graph+fp8grad)", 14_000, 7.9, mb=1, ckpt="none"))
    kept = row("oneday (fused+graph+fp8+keep)", 18_000, 21.8, mb=1, ckpt="none")
    assert speed_table.describe(kept) == ("18,000 (1 x 2048, FP8 base matmuls, norm and SwiGLU outputs kept, off, "
                                          "21.80 GiB)")
    assert "FP8" not in speed_table.describe(row("oneday (fused+graph)", 14_000, 7.9, mb=1, ckpt="none"))


def test_cap_edges_and_missing_sides():
    rows = [row("oneday", 5_000, 8.0), row("unsloth-x", 4_000, 8.0),  # exactly at the cap counts
            row("oneday", 3_000, 20.0, seq=4096), row("unsloth-x", 9_000, 10.0, seq=4096),
            row("oneday", 2_000, 10.0, model="Llama-2-13b-hf")]
    got = cells(speed_table.verdicts(rows, [8, 16, 24], 1.25))
    assert got[("Mistral-7B-v0.1", 2048, 8)]["verdict"] == "PASS"  # 1.25 exactly
    assert got[("Mistral-7B-v0.1", 4096, 8)]["verdict"] == "NEITHER FITS"
    assert got[("Mistral-7B-v0.1", 4096, 16)]["verdict"] == "FAIL"  # Unsloth fits 16 GiB, we do not
    assert got[("Mistral-7B-v0.1", 4096, 24)]["verdict"] == "FAIL"  # 0.33x
    assert got[("Llama-2-13b-hf", 2048, 16)]["verdict"] == "NO UNSLOTH DATA"  # never a PASS without the peer
    rows.append(row("unsloth-x", 1_000, 30.0, model="Llama-2-13b-hf"))
    got = cells(speed_table.verdicts(rows, [16, 32], 1.25))
    assert got[("Llama-2-13b-hf", 2048, 16)]["verdict"] == "ONLY ONEDAY FITS"
    assert got[("Llama-2-13b-hf", 2048, 32)]["verdict"] == "PASS"


def test_bad_rows_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [row("oneday", 1_000, 5.0), {"system": "oneday", "model": "m",
                                                                           "seq": 2048, "tokens_per_s": 10}])
    with pytest.raises(SystemExit, match=r"bad.jsonl:4: .*no peak_mem_gib"):
        speed_table.read_rows([path])
    with pytest.raises(SystemExit, match="no result rows"):
        speed_table.main([str(write_jsonl(tmp_path / "empty.jsonl", []))])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        speed_table.read_rows([tmp_path / "missing.jsonl"])


FAKE_UNSLOTH = '''
import json, time
def bench(path, seq, mb, ckpt="unsloth", steps=8, warm=3):
    print("Unsloth banner", flush=True)
    if mb == 2:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if mb == 3:
        time.sleep(60)
    print(json.dumps({"system": "unsloth-fake", "arch": "mistral-7b", "seq": seq, "mb": mb, "grad_ckpt": ckpt,
                      "tokens_per_s": 1000.0 * mb, "peak_mem_gib": 5.0, "path": path}), flush=True)
'''


def run_peer(tmp_path, *args):
    anchors = tmp_path / "anchors"
    anchors.mkdir(exist_ok=True)
    (anchors / "anchor_unsloth_qlora.py").write_text(FAKE_UNSLOTH)
    model_dir = tmp_path / "hf"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text("{}")
    env = dict(os.environ, ANCHORS_DIR=str(anchors), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/peer_unsloth.py"), "--arch", "llama-2-13b",
                           "--model_dir", str(model_dir), *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def test_peer_runner_relabels_and_survives_failures(tmp_path):
    rows, log = run_peer(tmp_path, "--configs", "1xoffload,2xnone,3xfull,4xunsloth", "--timeout_s", "4")
    assert [r["mb"] for r in rows] == [1, 2, 3, 4]
    ok, oom, slow, last = rows
    assert ok["model"] == "Llama-2-13b-hf" and ok["arch"] == "llama-2-13b"  # not the anchor's hard-coded mistral-7b
    assert ok["grad_ckpt"] == "unsloth" and ok["tokens_per_s"] == 1000.0 and ok["path"] == str(tmp_path / "hf")
    assert "error" not in ok and "error" not in last
    assert oom["error"].startswith("out of memory: exit code 1: RuntimeError: CUDA out of memory")
    assert oom["grad_ckpt"] is False and oom["model"] == "Llama-2-13b-hf"
    assert slow["error"] == "timed out after 4 s" and slow["grad_ckpt"] is True
    assert "Unsloth banner" in log and "done in" in log  # the children's logs and the progress go to stderr

    path = write_jsonl(tmp_path / "peers.jsonl", rows)
    got = cells(speed_table.verdicts(speed_table.read_rows([path]), [8], 1.25))
    assert got[("Llama-2-13b-hf", 2048, 8)]["peer"]["mb"] == 4  # the failed rows are never the best


def test_peer_runner_budget_and_bad_config(tmp_path):
    rows, _ = run_peer(tmp_path, "--configs", "1xoffload,4xoffload", "--budget_s", "0")
    assert [r["error"].startswith("skipped") for r in rows] == [True, True]
    with pytest.raises(AssertionError, match="--configs '2xoffload'"):
        run_peer(tmp_path, "--peer", "hf-peft", "--configs", "2xoffload")


def test_random_llama_checkpoint_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    tiny = dict(peer_models.LLAMA_2_13B, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4)
    path = tmp_path / "llama"
    peer_models.write_llama(tiny, path, "cpu")
    assert peer_models.is_complete(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 32000 and model.config.num_hidden_layers == 2
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("t5 t31999")["input_ids"] == [5, 31999] and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    # A complete folder is not rewritten.
    assert peer_models.main(arch="llama-2-13b", out_dir=path, device="cpu") == path
