"""finetune/plan.py (--memory_budget): budget strings, the memory model against what autograd keeps and against the
peaks measured on an H100 (docs/speed/), the planner's choice under a fake probe (the fastest that fits, never over
the cap, never slower for a larger budget, stepping down when the probe says over), and the trainer with
--memory_budget on the CPU."""

import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from cli import InputError
from finetune import lora as ft
from finetune import plan
from finetune.plan import GiB, Choice, Job, Pins
from lora import LoRAConfig, inject_lora
from model import GPT, Config
from test_finetune import adapter, ckpt, data, one_line_error, run, run_script, status  # noqa: F401 (fixtures)
from test_fused import backend, fast_model, saved_bytes_per_token_and_block  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def mistral(**kw) -> Job:
    """Mistral-7B QLoRA as in docs/training-speed.md: NF4-dq, LoRA r16 on every linear, 2048-token rows."""
    settings = {"quantize": "bnb.nf4-dq", "cuda_graph": True, **kw}
    return Job(Config.from_name("Mistral-7B-v0.1"), LoRAConfig(r=16, alpha=32), settings.pop("seq", 2048),
               settings.pop("batch_size", 12), **settings)


# ---------------------------------------------------------------------------------------------------------------------
# Budget strings


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("40GB", 40 * 10**9), ("22.5GiB", 22.5 * 2**30),
                                            (" 8 gib", 8 * 2**30), ("8000MiB", 8000 * 2**20), (".5GB", 5 * 10**8)])
def test_budget_strings(text, expected):
    assert plan.parse_budget(text) == int(expected)


@pytest.mark.parametrize("text", ["24", "24 GiBs", "24TB", "abc", "-3GiB", "0GiB", "", "1e3GB", "24GiB 4"])
def test_a_bad_budget_string_is_one_line_naming_the_flag(text):
    with pytest.raises(InputError) as e:
        plan.parse_budget(text)
    assert one_line_error(e).startswith(f"--memory_budget {text!r}: give a size with its unit, e.g. 24GiB")


def test_a_budget_larger_than_the_gpu_is_one_line_and_a_budget_is_enforced(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=25_757_220_864))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *args: calls.append(args))
    with pytest.raises(InputError) as e:
        plan.check_device(plan.parse_budget("24GiB"), "24GiB", torch.device("cuda"))
    assert one_line_error(e).startswith("--memory_budget 24GiB: more than NVIDIA GeForce RTX 4090 has (23.99 GiB); "
                                        "give at most that")
    plan.check_device(plan.parse_budget("22.5GiB"), "22.5GiB", torch.device("cuda"))
    plan.enforce(plan.parse_budget("22.5GiB"), torch.device("cuda"))
    assert calls == [(22.5 * 2**30 / 25_757_220_864, torch.device("cuda"))]


# ---------------------------------------------------------------------------------------------------------------------
# The memory model


TINY = dict(name="tiny", block_size=64, vocab_size=61, n_layer=3, n_head=4, n_query_groups=2, n_embd=32,
            intermediate_size=48)


def kept_per_token(cfg: dict, backend, fused=True, **settings) -> float:
    """What autograd keeps per token and block in this model (tests/test_fused.py's measure)."""
    torch.manual_seed(0)
    model = GPT(Config(**cfg))
    inject_lora(model, LoRAConfig(r=4, dropout=settings.pop("dropout", 0.0), targets=settings.pop("targets", "all")))
    model = model.to(torch.bfloat16).train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if fused:
        fast_model(model, backend, **settings)
    return saved_bytes_per_token_and_block(model, torch.randint(0, cfg["vocab_size"], (2, 24)))


@pytest.mark.parametrize("cfg", [TINY, dict(TINY, intermediate_size=96), dict(TINY, n_embd=64, intermediate_size=80)])
def test_the_model_counts_what_autograd_keeps(cfg, backend):
    c = Config(**cfg)
    job = lambda **kw: Job(c, LoRAConfig(r=4, dropout=kw.pop("dropout", 0.0)), 24, 2, **kw)  # noqa: E731
    assert plan.block_bytes_per_token(job(), False) == kept_per_token(cfg, backend)
    # Kept inputs: exactly that in every block but the first, whose input needs no gradient and is not kept besides
    kept = kept_per_token(cfg, backend, recompute_inputs=False)
    assert 0 <= plan.block_bytes_per_token(job(), True) - kept == pytest.approx(2 * c.n_embd / c.n_layer)
    # The plain path and LoRA dropout keep more; the model's bounds hold
    assert kept_per_token(cfg, backend, fused=False) <= plan.block_bytes_per_token(job(fused=False), False)
    assert kept_per_token(cfg, backend, dropout=0.1) <= plan.block_bytes_per_token(job(dropout=0.1), False)
    # So do adapters on fewer layers (the winning recipes' targets), inputs kept or not
    for targets in ("q,k,v,o,down", "q,k,v,o,head", "gate,up"):
        for keep in (False, True):
            assert kept_per_token(cfg, backend, targets=targets, recompute_inputs=not keep) \
                <= plan.block_bytes_per_token(job(), keep), (targets, keep)


def test_the_model_counts_parameters_and_quantized_bytes():
    job = mistral()
    # one A per part of the fused q|k|v (3 x r x 4096) and B over its rows; o, gate, up, down
    assert job.lora_params == 32 * 16 * (3 * 4096 + 6144 + 2 * 4096 + 2 * (4096 + 14336) + 14336 + 4096)
    block_linears = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    others = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embedding, head, norms
    assert job.weight_bytes == pytest.approx(block_linears * plan.QUANTIZED_BYTES["bnb.nf4-dq"] + 2 * others
                                             + 4 * job.lora_params)
    # the weights the benchmark reports after loading (docs/speed/h100_2026-12-06_arch/old_vs_new.jsonl: 4.03 GiB)
    assert job.weight_bytes / GiB == pytest.approx(4.03, abs=0.05)


def measured_rows():
    """benchmark_finetune.py's rows in the bf16 table (docs/speed/speed_*.jsonl), report f and the 2026-12-06 one.
    Reports c, d and e's first call are left out: there some configurations ran after others of another shape and
    recompiled for dynamic shapes, with up to 4 GiB more (docs/training-speed.md, "The benchmark resets")."""
    files = [*(ROOT / "docs/speed").glob("speed_*.jsonl"), *(ROOT / "docs/speed/h100_2026-11-24_f").glob("*.jsonl"),
             *(ROOT / "docs/speed/h100_2026-12-06_arch").glob("*.jsonl"),
             *(ROOT / "docs/speed").glob("h100_2026-12-06_*-[0-9][0-9][0-9][0-9].jsonl")]  # the stages of that day
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.startswith("{") else {}
            if row.get("system", "").startswith("oneday") and "peak_mem_gib" in row:
                yield path.name, row


def benchmark_choice(row, n_layer: int) -> Choice:
    """The table's checkpointing column (benchmark_finetune.ckpt_label) as a Choice."""
    label = row["grad_ckpt"]
    offload = isinstance(label, str) and label.endswith("offloaded")
    words = str(label).split()
    blocks = n_layer if label is True or label == "offloaded" else int(words[1]) if words[0] == "first" else 0
    return Choice(row["mb"], blocks, offload, "keep" in row["system"])


def test_the_model_predicts_the_measured_peaks():
    """Every peak the benchmark measured on an H100 (Mistral-7B and Llama-2-13B, 2048 and 4096 tokens, micro-batches
    1-4, no, some and all blocks checkpointed, offloaded, kept inputs) within 0.4 GiB, 0.15 on average."""
    errors = []
    for name, row in measured_rows():
        config = Config.from_name(row["model"])
        job = Job(config, LoRAConfig(r=row["lora_r"]), row["seq"], row["mb"], quantize=row["quantize"],
                  cuda_graph=True, dense_mask=row.get("docs_per_row", 1) > 1)
        predicted = plan.peak_bytes(job, benchmark_choice(row, config.n_layer), validation=False) / GiB
        errors.append((predicted - row["peak_mem_gib"], name, row))
    assert len(errors) >= 40
    worst = max(errors, key=lambda e: abs(e[0]))
    assert abs(worst[0]) <= 0.4, worst
    assert sum(abs(e) for e, *_ in errors) / len(errors) <= 0.15


# ---------------------------------------------------------------------------------------------------------------------
# The speed model


def misranked(job: Job, measured, noise: float = 0.0) -> list:
    """The pairs of (Choice, measured tokens/s) more than `noise` apart that relative_speed orders the other way."""
    speed = lambda c: plan.relative_speed(job, c)  # noqa: E731
    return [(a, b) for a, b in itertools.combinations(measured, 2)
            if abs(a[1] / b[1] - 1) > noise and (a[1] > b[1]) != (speed(a[0]) > speed(b[0]))]


def spec_choice(spec: str, n_layer: int) -> Choice:
    """benchmark_finetune.py's name of a configuration ("2xp31o+fp8+keep") as a Choice."""
    mb, blocks, offload, extras = re.fullmatch(r"(\d+)x(0|1|p\d+)(o?)((?:\+\w+)*)", spec).groups()
    blocks = 0 if blocks == "0" else n_layer if blocks == "1" else int(blocks[1:])
    return Choice(int(mb), blocks, offload == "o", "+keep" in extras)


# tests/gpu/check_plan.py's call on an H100, 2026-12-06 (Mistral-7B, 2048 tokens, NF4-dq, LoRA r16, FP8, CUDA graph):
# the benchmark's unpacked random rows, printed by that call; its packed rows are in h100_2026-12-06_check_plan.json
CHECK_PLAN_UNPACKED = {"2x0+fp8": 19_820, "2xp4+fp8": 18_975, "1x0+fp8+keep": 18_233, "1x0+fp8": 18_008,
                       "1xp17o+fp8": 14_905, "2xp31o+fp8+keep": 14_701}


def check_plan_measurements():
    packed = json.loads((ROOT / "docs/speed/h100_2026-12-06_check_plan.json").read_text())["benchmark"]
    for name, rows in (("unpacked", CHECK_PLAN_UNPACKED),
                       ("packed", {spec: row["tokens_per_s"] for spec, row in packed.items()})):
        yield name, [(spec_choice(spec, 32), tokens_per_s) for spec, tokens_per_s in rows.items()]


def test_the_speed_model_ranks_the_check_plan_configurations_in_their_measured_order():
    """Every configuration the GPU check measured, exactly in its order: two rows with 4 blocks checkpointed before
    one row without, kept inputs a little (1.2%) before recomputed ones, 17 of 32 blocks offloaded at one row before
    31 at two (1.5%)."""
    job = mistral(fp8="all", batch_size=6)
    for name, measured in check_plan_measurements():
        assert len(measured) >= 5
        ranked = sorted(measured, key=lambda m: plan.relative_speed(job, m[0]), reverse=True)
        assert ranked == sorted(measured, key=lambda m: m[1], reverse=True), name


@pytest.mark.parametrize("wrong", [dict(KEEP_SPEEDUP=1.06), dict(RECOMPUTE=0.3), dict(FIXED_TOKENS={"all": 200}),
                                   dict(FIXED_TOKENS={"all": 900})])
def test_a_speed_model_with_other_constants_fails_that_ranking(monkeypatch, wrong):
    """The check above can fail: kept inputs worth 6%, cheaper recomputation, a smaller or larger fixed cost per
    micro-step each put some measured pair in the wrong order."""
    for name, value in wrong.items():
        monkeypatch.setattr(plan, name, value)
    job = mistral(fp8="all", batch_size=6)
    assert any(misranked(job, measured) for _, measured in check_plan_measurements())


# Calls whose configurations recompiled for dynamic shapes after others of another shape (up to 17% slower:
# docs/training-speed.md, "The benchmark resets")
RECOMPILED = ("h100_2026-11-24_c/", "h100_2026-11-24_d/speed_mistral-2048_first", "h100_2026-11-24_e/first_call/")


def benchmark_calls() -> dict:
    """{(report file, model, seq, system): [(Choice, tokens/s)]}: the configurations of one job in one call of
    benchmark_finetune.py, every such call in docs/speed/ (bf16 and FP8 base matmuls) but the RECOMPILED ones."""
    calls = {}
    for path in sorted((ROOT / "docs/speed").rglob("*.jsonl")):
        name = str(path.relative_to(ROOT / "docs/speed"))
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.startswith("{") else {}
            if not row.get("system", "").startswith("oneday") or "tokens_per_s" not in row or \
                    any(r in name for r in RECOMPILED):
                continue
            key = (name, row["model"], row["seq"], row["system"].replace("+keep", ""))
            choice = benchmark_choice(row, Config.from_name(row["model"]).n_layer)
            calls.setdefault(key, []).append((choice, row["tokens_per_s"]))
    return calls


def test_the_speed_model_ranks_every_benchmark_call():
    """The speed tables of docs/speed/ (Mistral-7B at 2048 and 4096 tokens, Llama-2-13B, bf16 and FP8 base matmuls,
    micro-batches 1-4, none to all blocks checkpointed, offloaded, kept inputs): within each call, every two
    configurations more than 1% apart (a benchmark's call-to-call spread) in their measured order."""
    pairs, wrong = 0, []
    for (name, model, seq, system), measured in benchmark_calls().items():
        job = Job(Config.from_name(model), LoRAConfig(r=16), seq, 12, quantize="bnb.nf4-dq", cuda_graph=True,
                  fp8="all" if "+fp8" in system else None)
        pairs += sum(abs(a[1] / b[1] - 1) > 0.01 for a, b in itertools.combinations(measured, 2))
        wrong += [(name, a, b) for a, b in misranked(job, measured, noise=0.01)]
    assert pairs >= 150 and not wrong, wrong


# ---------------------------------------------------------------------------------------------------------------------
# The reserved margin


def check_plan_job() -> Job:
    """tests/gpu/check_plan.py's trainer runs: Mistral-7B NF4-dq, LoRA r16 on every linear, FP8, CUDA graph."""
    return Job(Config.from_name("Mistral-7B-v0.1"), LoRAConfig(r=16, alpha=16), 2048, 6, quantize="bnb.nf4-dq",
               fp8="all", cuda_graph=True)


# Every probe of those runs on an H100 (2026-12-06, the trainers' --memory_budget lines): budget GiB, the configuration,
# its probed reserved peak in GiB (None: out of memory under the cap)
CHECK_PLAN_PROBES = [
    (8, Choice(3, 30, True, True), None), (8, Choice(3, 31, True, True), 7.95), (8, Choice(3, 31, True, False), 7.91),
    (8, Choice(2, 31, True, True), 7.32),
    (16, Choice(2, 4, False, False), None), (16, Choice(2, 5, False, False), None),
    (16, Choice(2, 6, False, False), None), (16, Choice(1, 0, False, True), 15.33),
    (24, Choice(3, 0, False, False), None), (24, Choice(2, 0, False, True), None),
    (24, Choice(2, 0, False, False), 19.04),
]
# and the allocated peaks the trainers' lines printed for their choices (the model then, which the fit is against)
CHECK_PLAN_PREDICTED = {Choice(2, 31, True, True): 6.00, Choice(1, 0, False, True): 13.48,
                        Choice(2, 0, False, False): 16.91}


def test_the_reserved_margin_matches_the_h100_probes():
    """reserved_bytes against what the trainer's probes reserved: each measured one within 0.3 GiB (the fit: 0.15),
    each out-of-memory one predicted over its cap. The allocated model alone was 1.3-2.1 GiB under."""
    job, errors = check_plan_job(), []
    for choice, logged in CHECK_PLAN_PREDICTED.items():
        assert plan.peak_bytes(job, choice) / GiB == pytest.approx(logged, abs=0.006)
    for budget, choice, probed in CHECK_PLAN_PROBES:
        reserved = plan.reserved_bytes(job, choice) / GiB
        if probed is None:
            assert reserved > budget, (budget, choice, reserved)
        else:
            assert probed - plan.peak_bytes(job, choice) / GiB > 1.2  # what the margin is for
            errors.append(reserved - probed)
    assert len(errors) == 5 and max(map(abs, errors)) < 0.3, errors


def test_with_the_margin_the_first_probe_fits():
    """The planner under 8, 16 and 24 GiB with the probes above (others: the model's own prediction): one probe at
    16 and 24 GiB, where the trainers needed four and three, two at 8 GiB, where they needed four."""
    job = check_plan_job()
    measured = {choice: probed for _, choice, probed in CHECK_PLAN_PROBES}
    for budget, choice, probes in [(8, Choice(2, 31, True, True), 2), (16, Choice(1, 0, False, True), 1),
                                   (24, Choice(2, 0, False, False), 1)]:
        log = []

        def probe(c):
            log.append(c)
            found = measured.get(c, plan.reserved_bytes(job, c) / GiB)
            return None if found is None else int(found * GiB)

        chosen = plan.choose(job, budget * GiB, probe, budget_text=f"{budget}GiB")
        assert chosen.choice == choice and len(log) == probes, (budget, log)
        line = chosen.line(job, f"{budget}GiB", budget * GiB)
        assert f"reserved peak predicted {chosen.predicted / GiB:.2f} GiB (allocated {chosen.allocated / GiB:.2f}), " \
               f"probed {measured[choice]:.2f} GiB" in line


# ---------------------------------------------------------------------------------------------------------------------
# The planner


def fake_probe(job: Job, factor: float = 1.0, log: list = None):
    """A probe whose reserved peak is the model's with `factor` times its activations: a consistent model error."""

    def probe(choice):
        if log is not None:
            log.append(choice)
        return plan.reserved_bytes(job, choice, factor)

    return probe


def fastest_that_fits(job, budget, factor=1.0, pins=Pins()) -> Choice:
    peak = fake_probe(job, factor)
    fits = [c for c in plan.candidates(job, pins) if peak(c) <= budget * (1 - plan.HEADROOM)]
    return max(fits, key=lambda c: plan.relative_speed(job, c))


BUDGETS = [6.5, 7, 8, 10, 12, 16, 20, 24, 32, 40, 80]


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.15, 1.4])
@pytest.mark.parametrize("job", [mistral(), mistral(seq=4096, batch_size=8), mistral(dense_mask=True),
                                 mistral(cuda_graph=False, optimizer="adamw8bit")],
                         ids=["2048", "4096", "dense", "eager"])
def test_the_fastest_configuration_that_the_probe_fits_never_over_never_slower_for_more(job, factor):
    speeds = []
    for gib in BUDGETS:
        budget = int(gib * GiB)
        try:
            chosen = plan.choose(job, budget, fake_probe(job, factor), budget_text=f"{gib}GiB")
        except InputError:
            assert not speeds, f"nothing fits {gib} GiB, though a smaller budget did"
            continue
        assert chosen.probed <= budget * (1 - plan.HEADROOM) and chosen.probed == fake_probe(job, factor)(chosen.choice)
        if factor <= 1:  # a model that overestimates is only too careful: its first choice fits, and is the choice
            assert not chosen.rejected
        assert chosen.choice == fastest_that_fits(job, budget, max(factor, 1.0)), gib
        speeds.append(plan.relative_speed(job, chosen.choice))
    assert speeds == sorted(speeds) and len(speeds) >= len(BUDGETS) - 2


def test_the_choices_for_the_speed_tables_caps():
    """Mistral-7B at 2048 tokens: under 24 GiB not the speed table's best (3 rows, no checkpointing: 22.3 GiB
    allocated there, without validation), which the trainer's probe found out of memory under 24 GiB (validation
    beside the CUDA graph, and what the allocator reserves beyond that), but 2 rows; under 8 GiB most blocks
    offloaded, as every configuration that fits."""
    job = mistral()
    assert plan.choose(job, 24 * GiB).choice == Choice(2, 0, False, False)
    eight = plan.choose(job, 8 * GiB).choice
    assert eight.offload and eight.checkpointed >= 15


def test_the_planner_steps_down_when_the_probe_says_over_or_out_of_memory():
    job, budget, probed = mistral(), 24 * GiB, []
    first = plan.choose(job, budget).choice

    def probe(choice):
        probed.append(choice)
        return None if choice == first else fake_probe(job)(choice)  # out of memory under the cap

    chosen = plan.choose(job, budget, probe)
    assert probed[0] == first and chosen.choice == probed[-1] != first and chosen.rejected == [(first, None)]
    assert plan.relative_speed(job, chosen.choice) <= plan.relative_speed(job, first)
    assert "over the cap: micro-batch 2, no checkpointing, inputs recomputed (out of memory)" in \
        chosen.line(job, "24GiB", budget)

    # A probe that finds 40% more than predicted each time: a few probes, then the fastest that truly fits
    log = []
    chosen = plan.choose(job, budget, fake_probe(job, 1.4, log))
    assert 2 <= len(log) <= plan.MAX_PROBES and chosen.choice == fastest_that_fits(job, budget, 1.4)


def test_nothing_fits_is_one_line_before_any_probe():
    calls = []
    with pytest.raises(InputError) as e:
        plan.choose(mistral(), 3 * GiB, probe=calls.append, budget_text="3GiB")
    message = one_line_error(e)
    assert message.startswith("--memory_budget 3GiB: nothing fits; even micro-batch 1, the first 31 blocks "
                              "checkpointed and offloaded, inputs recomputed would reserve about 6.4 GiB (the weights "
                              "alone 4.0), so the smallest budget that fits is about 6.6GiB; give that or more, or a "
                              "shorter")  # as lean as all 32, and faster
    assert not calls
    # Llama-2-13B NF4 under 8 GiB (fits by allocated memory in docs/training-speed.md's benchmark, 7.8 GiB without
    # validation, not by what the cap limits): the smallest budget it names fits, a tenth of a GiB less does not
    job = Job(Config.from_name("Llama-2-13b-hf"), LoRAConfig(r=16), 2048, 6, quantize="bnb.nf4", fp8="all",
              cuda_graph=True)
    with pytest.raises(InputError) as e:
        plan.choose(job, 8 * GiB, budget_text="8GiB")
    smallest = float(re.search(r"the smallest budget that fits is about ([\d.]+)GiB", one_line_error(e)).group(1))
    assert one_line_error(e).startswith("--memory_budget 8GiB: nothing fits; even micro-batch 1") and 9 < smallest < 12
    assert plan.choose(job, int(smallest * GiB)).choice.offload
    with pytest.raises(InputError):
        plan.choose(job, int((smallest - 0.1) * GiB))
    with pytest.raises(InputError) as e:  # every probe over
        plan.choose(mistral(), 24 * GiB, probe=lambda c: None, budget_text="24GiB")
    assert f"{plan.MAX_PROBES} configurations probed, none fit" in one_line_error(e)


def test_pinned_flags_win_and_the_candidates_respect_what_cannot_work():
    job = mistral()
    assert plan.choose(job, 24 * GiB, pins=Pins(micro_batch_size=2)).choice.micro_batch_size == 2
    chosen = plan.choose(job, 12 * GiB, pins=Pins(offload=True, keep_inputs=True)).choice
    assert chosen.offload and chosen.keep_inputs and chosen.checkpointed >= 2
    assert plan.choose(job, 80 * GiB, pins=Pins(checkpointed=32)).choice.checkpointed == 32
    assert {c.micro_batch_size for c in plan.candidates(job)} == {1, 2, 3, 4, 6, 12}
    assert 1 not in {c.checkpointed for c in plan.candidates(job)}  # the flag's 1 means every block
    graph_dropout = Job(job.config, LoRAConfig(r=16, dropout=0.1), 2048, 12, quantize="bnb.nf4-dq", cuda_graph=True)
    assert {(c.checkpointed, c.keep_inputs) for c in plan.candidates(graph_dropout)} == {(0, False)}
    assert not any(c.offload for c in plan.candidates(mistral(compile=True)))
    def pins(mb, ckpt, offload, recompute_inputs, packing):
        flags = SimpleNamespace(train=SimpleNamespace(micro_batch_size=mb, packing=packing),
                                speed=SimpleNamespace(activation_checkpointing=ckpt, offload_checkpoints=offload,
                                                      recompute_inputs=recompute_inputs))
        return plan.memory_pins(flags, 32)

    assert pins(2, 12, True, False, packing=True) == Pins(2, 12, True, True)
    assert pins(1, False, False, True, packing=True) == Pins()
    assert pins(1, True, False, True, packing=False) == Pins(micro_batch_size=1, checkpointed=32)
    assert pins(1, 1, False, True, packing=True) == Pins(checkpointed=32)  # the flag's 1 means every block
    assert pins(1, 40, False, True, packing=True) == Pins(checkpointed=32)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer with --memory_budget on the CPU


def chosen_flags(out) -> dict:
    memory = status(out)["memory"]
    return dict(micro_batch_size=memory["micro_batch_size"], activation_checkpointing=memory["checkpointed"] or False,
                offload_checkpoints=memory["offload"], recompute_inputs=not memory["keep_inputs"])


def same_adapter(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_trainer_plans_prints_and_trains_as_the_chosen_flags_would(ckpt, data, tmp_path, capsys):
    out = tmp_path / "planned"
    # 2 GiB: the allocator's margin (plan.RESERVED_FIXED) alone takes 1.2, even for a tiny model
    run(ckpt, data, out, memory_budget="2GiB", micro_batch_size=1, lora_dropout=0.0, sample_tokens=0)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("--memory_budget"))
    assert line.startswith("--memory_budget 2GiB (2.00 GiB): micro-batch 4, no checkpointing, inputs kept")
    assert "not probed (CPU)" in line
    memory = status(out)["memory"]
    assert memory["budget_gib"] == 2.0 and memory["probed_gib"] is None and memory["probes"] == 0
    assert 0 < memory["predicted_allocated_gib"] < 1 < memory["predicted_gib"] < 2
    config = (out / "train_config.yaml").read_text()
    assert config.startswith(f"# {line}\n")
    saved = yaml.safe_load(config)  # the flags as given: --config plans again
    assert saved["memory_budget"] == "2GiB" and saved["train"]["micro_batch_size"] == 1
    run(ckpt, data, tmp_path / "by_hand", lora_dropout=0.0, sample_tokens=0, **chosen_flags(out))
    assert same_adapter(adapter(out), adapter(tmp_path / "by_hand"))
    run(ckpt, data, out, memory_budget="2GiB", micro_batch_size=1, resume=True, max_steps=8, lora_dropout=0.0,
        sample_tokens=0)
    assert status(out)["step"] == 8


def test_a_probe_that_says_over_steps_down_and_leaves_the_run_untouched(ckpt, data, tmp_path, monkeypatch, capsys):
    """The real probe step on the CPU (eager micro-steps, an optimizer step, a validation forward) with made-up
    peaks: over the cap for the first choice. The run then trains what those flags by hand train: the probe left
    the LoRA weights and the optimizer as they were."""
    seen = []

    def cpu_probe(fabric, gpt, a, examples, rows, max_seq_length, apply_speed, training_loss, make_optimizer):
        assert (apply_speed, training_loss, make_optimizer) == (ft.apply_speed, ft.training_loss, ft.make_optimizer)

        def probe(choice):
            plan.use_choice(a, choice, gpt.config.n_layer)
            apply_speed(gpt, a)
            plan.probe_step(gpt, a, plan.probe_batch(examples, rows, choice.micro_batch_size, max_seq_length, "cpu"),
                            training_loss, make_optimizer)
            seen.append(choice)
            return 3 * GiB if len(seen) == 1 else GiB // 2
        return probe

    monkeypatch.setattr(plan, "memory_probe", cpu_probe)
    out = tmp_path / "probed"
    run(ckpt, data, out, memory_budget="2GiB", micro_batch_size=1, lora_dropout=0.0, neftune_alpha=5.0,
        sample_tokens=0)
    assert len(seen) == 2 and seen[1] != seen[0]
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("--memory_budget"))
    assert "probed 0.50 GiB; over the cap: micro-batch 4, no checkpointing, inputs kept (3.00 GiB)" in line
    assert status(out)["memory"]["micro_batch_size"] == seen[1].micro_batch_size
    run(ckpt, data, tmp_path / "by_hand", lora_dropout=0.0, neftune_alpha=5.0, sample_tokens=0,
        **chosen_flags(out))
    assert same_adapter(adapter(out), adapter(tmp_path / "by_hand"))


def test_pinned_flags_and_bad_budgets_in_the_trainer(ckpt, data, tmp_path):
    out = tmp_path / "pinned"
    run(ckpt, data, out, memory_budget="2GiB", micro_batch_size=2, offload_checkpoints=True, sample_tokens=0,
        max_steps=2)
    memory = status(out)["memory"]
    assert memory["micro_batch_size"] == 2 and memory["offload"] and memory["checkpointed"] >= 2
    for bad in ("lots", "24"):
        with pytest.raises(InputError) as e:
            run(ckpt, data, tmp_path / "bad", memory_budget=bad)
        assert one_line_error(e).startswith(f"--memory_budget {bad!r}: give a size with its unit")
    with pytest.raises(InputError) as e:
        run(ckpt, data, tmp_path / "small", memory_budget="1MiB", micro_batch_size=1)
    assert one_line_error(e).startswith("--memory_budget 1MiB: nothing fits; even micro-batch 1, ")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "small").exists()
    proc = run_script(ckpt, data, tmp_path / "script", memory_budget="24 gigs")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: --memory_budget '24 gigs': give a size with its unit")
