"""finetune/lora.py: the loss (packing, masking, chunking), the training loop end to end, resume, DDP, bad inputs,
--config (the shipped configs and a run's own train_config.yaml)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli import InputError
from finetune import lora as ft
from lora import LoRAConfig, inject_lora
from model import GPT, Config
from tiny_checkpoint import make_tiny_checkpoint
from tiny_data import make_data_dir, make_samples, write_split

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(name="tiny", block_size=64, vocab_size=61, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
              intermediate_size=48)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), prompt_style="alpaca")


@pytest.fixture(scope="module")
def data(tmp_path_factory, ckpt):
    vocab = json.loads((ckpt / "model_config.json").read_text())["vocab_size"]
    return make_data_dir(tmp_path_factory.mktemp("data"), vocab)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(Config(**CONFIG))
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def examples(tmp_path, n=12, seed=0):
    write_split(tmp_path / "s.safetensors", make_samples(n, CONFIG["vocab_size"], seed=seed))
    return ft.make_examples(ft.load_split(tmp_path / "s.safetensors"), max_seq_length=64)


def reference_loss(model, split, i):
    """Plain full-logits cross-entropy of sample i alone, over its target tokens."""
    s, e = int(split.offsets[i]), int(split.offsets[i + 1])
    tokens, mask = split.tokens[s:e], split.loss_mask[s:e]
    logits = model(tokens[None, :-1])[0]
    keep = mask[1:].bool()
    return torch.nn.functional.cross_entropy(logits[keep], tokens[1:][keep], reduction="sum"), int(keep.sum())


def test_packed_loss_equals_per_sample_loss(tmp_path):
    model, ex = tiny_model(), examples(tmp_path)
    rows = ft.pack(ex.lengths.tolist(), capacity=40)
    assert any(len(r) > 2 for r in rows) and sorted(i for r in rows for i in r) == list(range(ex.n))
    assert all(sum(int(ex.lengths[i]) for i in r) <= 40 for r in rows)
    batch = ft.collate(ex, rows, packed=True, device="cpu")
    assert "segments" in batch
    with torch.no_grad():
        packed_sum, packed_n = ft.training_loss(model, batch)
        refs = [reference_loss(model, ex.split, i) for i in range(ex.n)]
    assert packed_n == sum(n for _, n in refs)
    torch.testing.assert_close(packed_sum, sum(l for l, _ in refs), rtol=1e-5, atol=1e-4)


def test_padding_and_masked_tokens_do_not_move_the_loss(tmp_path):
    model, ex = tiny_model(), examples(tmp_path)
    by_length = sorted(range(ex.n), key=lambda i: int(ex.lengths[i]))
    short, long = by_length[0], by_length[-1]
    with torch.no_grad():
        alone, n_alone = ft.training_loss(model, ft.collate(ex, [[short]], packed=False, device="cpu"))
        batch = ft.collate(ex, [[short], [long]], packed=False, device="cpu")  # the short row gets right padding
        assert "segments" not in batch  # unpacked: no mask, SDPA's causal path
        both, n_both = ft.training_loss(model, batch)
        other, n_other = ft.training_loss(model, ft.collate(ex, [[long]], packed=False, device="cpu"))
        ref, n_ref = reference_loss(model, ex.split, short)
    torch.testing.assert_close(both, alone + other, rtol=1e-5, atol=1e-4)
    assert n_both == n_alone + n_other
    # Only loss_mask=1 tokens count: the reference drops prompt positions explicitly.
    assert n_ref == n_alone < int(ex.lengths[short])
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-4)
    # Masked targets move neither the loss nor the gradient: change the token ids at masked positions.
    hidden = torch.randn(1, 6, 32, requires_grad=True)
    targets = torch.tensor([[ft.IGNORE, 3, ft.IGNORE, 4, 5, ft.IGNORE]])
    loss, n = ft.chunked_cross_entropy(model.lm_head, hidden, targets)
    loss.backward()
    assert n == 3 and torch.all(hidden.grad[0, [0, 2, 5]] == 0) and torch.all(hidden.grad[0, [1, 3, 4]].abs().sum(-1) > 0)
    # and at the data level: rewriting the prompt-only targets in a sample's loss_mask=0 region leaves the loss as is
    split = ex.split
    s = int(split.offsets[short])
    masked_positions = (split.loss_mask[s + 1:s + 1 + int(ex.lengths[short])] == 0).nonzero().view(-1)
    assert len(masked_positions) > 0
    batch = ft.collate(ex, [[short]], packed=False, device="cpu")
    assert torch.all(batch["targets"][0, masked_positions] == ft.IGNORE)


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 40, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 40))
    targets[0, :7] = ft.IGNORE
    loss, n = ft.chunked_cross_entropy(head, hidden, targets, chunk_bytes=4 * 50 * 128)  # several chunks of 128
    loss.backward()
    g_chunked, gw_chunked = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    ref = torch.nn.functional.cross_entropy(head(hidden).view(-1, 50), targets.view(-1), ignore_index=ft.IGNORE,
                                            reduction="sum")
    ref.backward()
    assert n == 3 * 40 - 7
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_chunked, hidden.grad)
    torch.testing.assert_close(gw_chunked, head.weight.grad)


def test_activation_checkpointing_same_loss_and_grads(tmp_path):
    ex = examples(tmp_path)
    batch = ft.collate(ex, ft.pack(ex.lengths.tolist(), 40)[:2], packed=True, device="cpu")
    grads = []
    for ckpt_on in (False, True):
        model = tiny_model().train()
        if ckpt_on:
            ft.enable_activation_checkpointing(model)
        loss, _ = ft.training_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_epoch_batches_are_deterministic_and_bucketed(tmp_path):
    ex = examples(tmp_path, n=40)
    a = ft.epoch_batches(ex, None, 4, seed=1, epoch=0)
    assert a == ft.epoch_batches(ex, None, 4, seed=1, epoch=0) != ft.epoch_batches(ex, None, 4, seed=1, epoch=1)
    assert sorted(r[0] for b in a for r in b) == list(range(40))
    lengths = ex.lengths.tolist()
    padded = sum(max(lengths[r[0]] for r in b) * len(b) for b in a)
    assert padded < 1.3 * sum(lengths)  # bucketing keeps padding small


def test_lr_schedule():
    lrs = [ft.lr_lambda(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0 and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# The whole script


RUN = dict(max_steps=6, batch_size=4, micro_batch_size=2, eval_interval=3, save_interval=3, learning_rate=1e-2,
           lora_r=4, seed=3, max_time=None, sample_tokens=4, accelerator="cpu")
GROUPS = {"lora": ft.LoRAArgs, "train": ft.TrainArgs, "speed": ft.SpeedArgs, "eval": ft.EvalArgs}


def flag(name: str) -> str:
    """A short test name -> its flag: lora_r -> lora.r, eval_interval -> eval.interval, fp8 -> speed.fp8."""
    for group, cls in GROUPS.items():
        field = name.removeprefix(group + "_")
        if field in cls.__dataclass_fields__:
            return f"{group}.{field}"
    return name


def grouped(**kw) -> dict:
    """setup()'s keyword arguments: the group dataclasses built from the flat names."""
    out, groups = {}, {g: {} for g in GROUPS}
    for name, value in kw.items():
        group, _, field = flag(name).rpartition(".")
        (groups[group] if group else out)[field] = value
    return {**out, **{g: GROUPS[g](**fields) for g, fields in groups.items()}}


def run(ckpt, data, out, **kw) -> str:
    return ft.setup(**grouped(**{**RUN, "checkpoint_dir": str(ckpt), "data_dir": data, "out_dir": out, **kw}))


def script(ckpt, data, out, **kw) -> list:
    """The command line of run(...): python finetune/lora.py as a user runs it."""
    args = {**RUN, "checkpoint_dir": ckpt, "data_dir": data, "out_dir": out, **kw}
    flags = [f"--{flag(k)}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
             for k, v in args.items()]
    return [sys.executable, "finetune/lora.py", *flags]


def run_script(ckpt, data, out, *extra, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(script(ckpt, data, out, **kw) + list(extra), cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def status(out) -> dict:
    return json.loads((Path(out) / "status.json").read_text())


def history(out) -> dict:
    return json.loads(torch.load(Path(out) / "state.ckpt", weights_only=True)["state"])["history"]


def adapter(out):
    return load_file(str(Path(out) / "adapter.safetensors"))


def test_end_to_end_run_learns_and_writes_everything(ckpt, data, tmp_path, capsys):
    out = tmp_path / "run"
    run(ckpt, data, out, max_steps=12, eval_interval=6, neftune_alpha=5.0)
    text = capsys.readouterr().out
    assert "sample |" in text and "tok/s" in text and "ETA" in text
    for f in ("adapter.safetensors", "adapter_best.safetensors", "state.ckpt", "train_config.yaml", "prompt_style.json",
              "loss.png", "adapters/step-000006.safetensors", "adapters/step-000012.safetensors"):
        assert (out / f).is_file(), f
    assert (out / "prompt_style.json").read_text() == (data / "prompt_style.json").read_text()
    assert list((out / "logs").rglob("metrics.csv"))
    state = torch.load(out / "state.ckpt", weights_only=True)
    val = json.loads(state["state"])["history"]["val"]
    assert [s for s, _ in val] == [0, 6, 12] and val[-1][1] < val[0][1] - 0.3, val
    assert not list(out.rglob("*.tmp"))

    # generate/lora.py: no flags repeated (base, style, LoRA settings come from the adapter); merged == on the fly
    from generate import lora as gen

    texts = []
    for merge in (True, False):
        gen.main(prompt="Name a colour.", adapter=out / "adapter.safetensors", temperature=0, max_new_tokens=8,
                 merge=merge)
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_resume_after_a_crash_matches_an_uninterrupted_run(ckpt, data, tmp_path, monkeypatch):
    kw = dict(lora_dropout=0.2, neftune_alpha=5.0, sample_tokens=0)
    run(ckpt, data, tmp_path / "straight", **kw)

    calls = {"n": 0}
    real = ft.training_loss

    def crashing(model, batch):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 9:  # step 5's first micro-batch: after the step-3 checkpoint, before the step-6 one
                raise RuntimeError("simulated kill")
        return real(model, batch)

    monkeypatch.setattr(ft, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(ckpt, data, tmp_path / "resumed", **kw)
    monkeypatch.setattr(ft, "training_loss", real)
    assert json.loads(torch.load(tmp_path / "resumed/state.ckpt", weights_only=True)["state"])["step"] == 3
    run(ckpt, data, tmp_path / "resumed", resume=True, **kw)

    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_offloaded_checkpointing_trains_like_no_checkpointing(ckpt, data, tmp_path):
    kw = dict(lora_dropout=0.0, sample_tokens=0)
    run(ckpt, data, tmp_path / "plain", **kw)
    run(ckpt, data, tmp_path / "offloaded", activation_checkpointing=True, offload_checkpoints=True, **kw)
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "offloaded")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["grad", "all"])
def test_fp8_base_matmuls_train_like_bf16(ckpt, data, tmp_path, capsys, mode):
    kw = dict(lora_dropout=0.0, sample_tokens=0)
    run(ckpt, data, tmp_path / "plain", **kw)
    run(ckpt, data, tmp_path / "fp8", fp8=mode, **kw)
    out = capsys.readouterr().out
    assert f"FP8 base matmuls ({mode}) in 15 of 15 LoRA layers" in out, [l for l in out.splitlines() if "FP8" in l]
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "fp8")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # FP8 ran
    (_, start), *_, (_, plain) = json.loads(torch.load(tmp_path / "plain/state.ckpt", weights_only=True)["state"])["history"]["val"]
    (_, start_fp8), *_, (_, fp8) = json.loads(torch.load(tmp_path / "fp8/state.ckpt", weights_only=True)["state"])["history"]["val"]
    # Validation runs without FP8 (inference), so both start equal. This tiny random model (std 0.3 weights) is far
    # more sensitive than a real one: its LoRA gradients already move 5-10% between fp32 and bf16, and e4m3 has 4
    # fewer mantissa bits than bf16. So the check is that FP8 training learns, not that it matches closely; the
    # real-data comparison is benchmarks/e2e_gpu.sh compare.
    assert start_fp8 == start and start - fp8 > 0.5 * (start - plain) > 0, (start, plain, fp8)


def test_two_process_ddp_matches_one_process(ckpt, data, tmp_path):
    """2 CPU processes (gloo) with 1 micro-batch each == 1 process accumulating the same 2 micro-batches."""
    common = ["--checkpoint_dir", str(ckpt), "--data_dir", str(data), "--train.max_steps", "3", "--train.batch_size",
              "2", "--train.micro_batch_size", "1", "--eval.interval", "3", "--train.save_interval", "3",
              "--train.learning_rate", "1e-2", "--lora.r", "4", "--lora.dropout", "0", "--seed", "3", "--max_time",
              "null", "--eval.sample_tokens", "0", "--accelerator", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "finetune/lora.py", *common, "--devices", "2",
                           "--out_dir", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step 3/3" in proc.stdout
    run(ckpt, data, tmp_path / "single", max_steps=3, batch_size=2, micro_batch_size=1, lora_dropout=0.0,
        sample_tokens=0)
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_max_time_stops_cleanly_with_a_resumable_save(ckpt, data, tmp_path, capsys):
    assert run(ckpt, data, tmp_path / "budget", max_steps=50, max_time="00:00:01") == "stopped"
    assert "Stopping at step 0" in capsys.readouterr().out
    assert (tmp_path / "budget/state.ckpt").is_file() and (tmp_path / "budget/adapter.safetensors").is_file()


def test_a_stopped_run_and_a_finished_one_differ_in_exit_status_and_status_json(ckpt, data, tmp_path):
    out = tmp_path / "run"
    stopped = run_script(ckpt, data, out, max_time=5)  # less than the stopper keeps in reserve: it stops at step 0
    assert stopped.returncode == ft.EXIT_STOPPED == 75, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "Stopping at step 0" in stopped.stdout and "Continue with --resume true" in stopped.stdout
    assert status(out)["status"] == "stopped" and "--max_time" in status(out)["reason"] and status(out)["step"] == 0
    finished = run_script(ckpt, data, out, resume=True)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert status(out) == {"status": "finished", "reason": "", "step": 6, "total_steps": 6}


def test_sigterm_stops_with_a_resumable_save_and_exit_status_75(ckpt, data, tmp_path):
    out = tmp_path / "run"
    # 2,000 steps: should the signal be lost, the run ends (exit status 0, a failure here) instead of hanging the test
    proc = subprocess.Popen(script(ckpt, data, out, max_steps=2_000, eval_interval=10_000, save_interval=10_000),
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, "".join(lines[-30:])
    assert status(out)["status"] == "stopped" and status(out)["reason"] == "asked to stop (SIGTERM)"
    saved = json.loads(torch.load(out / "state.ckpt", weights_only=True)["state"])["step"]
    assert 2 <= saved == status(out)["step"] < 2_000


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process start time from Linux's /proc")
def test_the_time_budget_counts_from_process_start():
    # Longer than the import's CPU time (about 1.3 s), which a fallback that counts only CPU time would measure instead
    code = "import time; time.sleep(3); from finetune import lora; print(time.monotonic() - lora.START)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) >= 3.0  # the sleep before the import counts


def test_4bit_training_goes_on_as_if_no_validation_ran(data, tmp_path, monkeypatch):
    """bitsandbytes 0.50 repacks 4-bit weights for its CPU inference kernel at the first eval-mode forward without grad
    (on CPUs with AVX512-BF16; claimed here for every CPU), which made QLoRA on the CPU silently wrong after the
    step-0 validation."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    wide = make_tiny_checkpoint(tmp_path / "wide", n_embd=64, intermediate_size=128)  # whole 64-weight blocks
    run(wide, data, tmp_path / "validated", quantize="bnb.nf4", sample_tokens=0, max_steps=12, eval_interval=6)
    monkeypatch.setattr(ft, "validate", lambda *args: 9.0)  # validation that runs nothing
    run(wide, data, tmp_path / "unvalidated", quantize="bnb.nf4", sample_tokens=0, max_steps=12, eval_interval=6)
    validated, unvalidated = (history(tmp_path / name) for name in ("validated", "unvalidated"))
    assert validated["train"] == unvalidated["train"]
    (_, start), *_, (_, end) = validated["val"]
    assert end < start - 0.3 and max(loss for _, loss in validated["train"]) < start + 1.0, validated


def test_resume_trains_with_the_new_learning_rate_and_says_so(ckpt, data, tmp_path, monkeypatch, capsys):
    used = []  # (lr, weight_decay) of every optimizer step
    make_optimizer = ft.make_optimizer

    def recording(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        step = optimizer.step

        def step_and_record(*a, **k):
            used.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]))
            return step(*a, **k)

        optimizer.step = step_and_record
        return optimizer

    monkeypatch.setattr(ft, "make_optimizer", recording)
    out = tmp_path / "run"
    run(ckpt, data, out, max_steps=3, sample_tokens=0)
    run(ckpt, data, out, max_steps=6, learning_rate=1e-3, weight_decay=0.1, resume=True, sample_tokens=0)
    assert [lr for lr, _ in used[3:]] == pytest.approx([1e-3 * ft.lr_lambda(s, 0, 6, 0.0) for s in (3, 4, 5)])
    assert [decay for _, decay in used] == [0.0] * 3 + [0.1] * 3
    assert ("Resuming with --train.learning_rate 0.001 (was 0.01) and --train.weight_decay 0.1 (was 0)"
            in capsys.readouterr().out)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())["train"]
    assert (saved["learning_rate"], saved["weight_decay"]) == (1e-3, 0.1)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_fail_early_with_one_line(ckpt, data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(InputError) as e:
        run(ckpt, bad, tmp_path / "o1")
    assert "train.safetensors: not found" in one_line_error(e)

    (bad / "train.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError) as e:
        run(ckpt, bad, tmp_path / "o2")
    assert "not a readable safetensors file" in one_line_error(e)

    save_file({"tokens": torch.arange(10, dtype=torch.int32), "loss_mask": torch.ones(10, dtype=torch.uint8),
               "offsets": torch.tensor([0, 4, 9])}, str(bad / "train.safetensors"))
    with pytest.raises(InputError) as e:
        run(ckpt, bad, tmp_path / "o3")
    assert "running from 0 to len(tokens)=10" in one_line_error(e)

    save_file({"tokens": torch.arange(10, dtype=torch.int32), "offsets": torch.tensor([0, 10])}, str(bad / "train.safetensors"))
    with pytest.raises(InputError) as e:
        run(ckpt, bad, tmp_path / "o4")
    assert "missing tensor(s) ['loss_mask']" in one_line_error(e)

    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "o5", max_seq_length=100_000)
    assert "exceeds the context of tiny (256 tokens" in one_line_error(e)

    big_vocab = tmp_path / "vocab"
    big_vocab.mkdir()
    write_split(big_vocab / "train.safetensors", make_samples(4, 100_000, seed=0))
    write_split(big_vocab / "val.safetensors", make_samples(4, 50, seed=0))
    with pytest.raises(InputError) as e:  # prepare_data moves meta.json in last: a folder without it is unfinished
        run(ckpt, big_vocab, tmp_path / "o6")
    assert "meta.json: not found, so" in one_line_error(e)
    shutil.copy(data / "meta.json", big_vocab / "meta.json")
    with pytest.raises(InputError) as e:
        run(ckpt, big_vocab, tmp_path / "o6")
    assert "is outside the vocabulary" in one_line_error(e)

    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "o7", batch_size=5, micro_batch_size=2)
    assert "--train.batch_size 5 is not a multiple" in one_line_error(e)

    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "nothing", resume=True)
    assert "nothing to resume" in one_line_error(e)

    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "o8", offload_checkpoints=True)
    assert "add --speed.activation_checkpointing" in one_line_error(e)
    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "o9", activation_checkpointing=True, offload_checkpoints=True, compile=True)
    assert "with --speed.compile true is not supported" in one_line_error(e)
    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "o10", fp8="grad", fused=False)
    assert ("--speed.fp8 grad runs inside the fused LoRA matmul: set --speed.fused true and --lora.dropout 0"
            in one_line_error(e))
    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "o11", recompute_inputs=False, lora_dropout=0.1)
    assert "--speed.recompute_inputs false applies to the fused LoRA matmul" in one_line_error(e)


def test_resume_refuses_changed_settings_and_foreign_adapters(ckpt, data, tmp_path):
    out = tmp_path / "run"
    run(ckpt, data, out, max_steps=3, sample_tokens=0)
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=3)
    assert "already holds a run; pass --resume true" in one_line_error(e)
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=6, resume=True, lora_r=8)
    assert "--lora.r was 4, now 8" in one_line_error(e)
    other = make_tiny_checkpoint(tmp_path / "other", n_embd=48)
    with pytest.raises(InputError) as e:
        run(other, data, out, max_steps=6, resume=True)
    assert "--checkpoint_dir was" in one_line_error(e)
    # A setting that was null is a setting too: the run trained on full-precision weights and untruncated rows.
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=6, resume=True, quantize="bnb.nf4")
    assert "--quantize was None, now 'bnb.nf4'" in one_line_error(e)
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=6, resume=True, max_seq_length=16)
    assert "--train.max_seq_length was None, now 16" in one_line_error(e)


def test_a_run_of_the_flat_flag_trainer_is_refused_in_one_line(ckpt, data, tmp_path):
    """Before the flags were grouped a run wrote train_config.json and a state.ckpt of another shape: resuming it
    must say so, not trace back after the model has loaded."""
    out = tmp_path / "run"
    run(ckpt, data, out, max_steps=2, sample_tokens=0)
    (out / "train_config.yaml").rename(out / "train_config.json")
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=4, resume=True)
    assert "before its flags were grouped (train_config.json)" in one_line_error(e)
    (out / "train_config.json").rename(out / "train_config.yaml")
    state = torch.load(out / "state.ckpt", weights_only=False)
    del state["hparams"]
    torch.save(state, out / "state.ckpt")
    with pytest.raises(InputError) as e:
        run(ckpt, data, out, max_steps=4, resume=True)
    assert "state.ckpt: not a state this trainer wrote" in one_line_error(e)


def test_a_runs_train_config_yaml_repeats_the_run(ckpt, data, tmp_path):
    """train_config.yaml holds every flag in --config's shape: given back, it trains the same adapter."""
    first = run_script(ckpt, data, tmp_path / "first", lora_dropout=0.1, neftune_alpha=5.0, sample_tokens=0)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "first/train_config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["lora"]["dropout"] == 0.1 and saved["train"]["neftune_alpha"] == 5.0
    assert set(saved) >= {"checkpoint_dir", "data_dir", "out_dir", "lora", "train", "speed", "eval", "seed"}
    assert "resume" not in saved  # repeating a run starts it afresh; continuing one is --resume true, said aloud
    again = subprocess.run([sys.executable, "finetune/lora.py", "--config", str(tmp_path / "first/train_config.yaml"),
                            "--out_dir", str(tmp_path / "again")], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    a, b = adapter(tmp_path / "first"), adapter(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(tmp_path / "first") == history(tmp_path / "again")


CONFIGS = sorted((ROOT / "finetune/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    """Every shipped config goes through the parser: a renamed or removed flag breaks this, not a user's run."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(ft.setup)
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(["--config", str(path)])
    text = path.read_text()
    assert text.startswith("#") and "python finetune/lora.py --config" in text  # says what it is and how to run it
    assert cfg.lora.r > 0 and cfg.train.batch_size % cfg.train.micro_batch_size == 0
    recipes = {p.stem for p in (ROOT / "prepare_data/recipes").glob("*.yaml")}
    assert Path(cfg.data_dir).name in recipes | {"demo"}, cfg.data_dir


def test_configs_cover_the_quickstart_and_every_winning_recipe():
    names = {p.stem for p in CONFIGS}
    assert "smollm2_demo" in names
    for recipe in ("upaya_4090", "percent_bfd_a100", "tvergho_5th"):
        assert recipe in names, recipe
