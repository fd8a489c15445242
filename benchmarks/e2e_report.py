"""The end-to-end table: base vs fine-tuned, scripts/evaluate.py vs HELM, on the held-out MMLU-format splits.

    python benchmarks/e2e_report.py --runs base=out/e2e/base,finetuned=out/e2e/finetuned --heldout data/e2e_heldout \
        --out out/e2e/results.md

Each run folder holds ours/predictions_mmlu_csv.jsonl (scripts/evaluate.py --tasks mmlu_csv) and
helm/benchmark_output/runs/<suite>/mmlu:subject=*/scenario_state.json (helm-run). HELM items are matched to ours by
their prompt (the same text when both evaluators read the same CSVs), so the table also says on how many items the
two predictions agree, and whether every HELM request succeeded. Exact match with 95% Wilson intervals.

Then the difference that matters, fine-tuned minus base on the SAME items (the first two runs, matched by item), per
subject and overall: the mean difference with a 95% paired-bootstrap interval (overall: resampled within each subject,
so every replicate keeps the subjects' sizes), how many items each model alone got right, and the exact McNemar
p-value on those discordant items. "Beats the base by more than the noise" means the interval's lower end is above 0.
"""
import glob
import json
import math
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import InputError  # noqa: E402
from scripts.eval_tasks import load_task, wilson_interval  # noqa: E402


def helm_items(run_dir: Path) -> Dict[str, dict]:
    """prompt -> {subject, prediction, success} for every HELM request of the run."""
    out = {}
    for path in sorted(glob.glob(str(run_dir / "helm/benchmark_output/runs/*/mmlu:subject=*/scenario_state.json"))):
        subject = Path(path).parent.name.split("subject=")[1].split(",")[0]
        for rs in json.loads(Path(path).read_text())["request_states"]:
            result = rs.get("result") or {}
            completions = result.get("completions") or [{"text": ""}]
            out[rs["request"]["prompt"]] = {"subject": subject, "prediction": completions[0]["text"],
                                             "success": bool(result.get("success")), "error": result.get("error")}
    return out


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test: under "no difference" each discordant item is a fair coin."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(before: Dict[str, Sequence[float]], after: Dict[str, Sequence[float]], n_boot: int = 10000,
                      seed: int = 0) -> dict:
    """Mean of after - before over paired items, grouped by subject ({subject: per-item scores}, same order in both),
    with a 95% percentile bootstrap interval that resamples items within each subject."""
    diffs: Dict[str, List[float]] = {}
    for subject, b in before.items():
        a = after[subject]
        if len(a) != len(b):
            raise ValueError(f"{subject}: {len(b)} items before, {len(a)} after; pair the same items")
        diffs[subject] = [x - y for x, y in zip(a, b)]
    flat = [d for ds in diffs.values() for d in ds]
    n = len(flat)
    if n == 0:
        return {"n": 0, "diff": 0.0, "lo": 0.0, "hi": 0.0, "wins": 0, "losses": 0, "p": 1.0}
    rng = random.Random(seed)
    groups = [ds for ds in diffs.values() if ds]
    means = sorted(sum(sum(rng.choices(ds, k=len(ds))) for ds in groups) / n for _ in range(n_boot))
    wins, losses = sum(d > 0 for d in flat), sum(d < 0 for d in flat)
    return {"n": n, "diff": sum(flat) / n, "lo": means[int(0.025 * n_boot)], "hi": means[int(0.975 * n_boot) - 1],
            "wins": wins, "losses": losses, "p": mcnemar_p(wins, losses)}


def paired_scores(base: Dict[str, Dict[str, float]], tuned: Dict[str, Dict[str, float]]) -> tuple:
    """({subject: [scores]}, {subject: [scores]}) over the items (keys) both runs scored, in the same order."""
    before, after = {}, {}
    for subject in sorted(set(base) & set(tuned)):
        keys = sorted(set(base[subject]) & set(tuned[subject]))
        before[subject] = [base[subject][k] for k in keys]
        after[subject] = [tuned[subject][k] for k in keys]
    return before, after


def paired_lines(before: Dict[str, List[float]], after: Dict[str, List[float]], what: str) -> tuple:
    """Markdown rows of paired_difference per subject and overall, and the overall result."""
    lines = [paired_row(f"{what}, {s}", paired_difference({s: before[s]}, {s: after[s]})) for s in sorted(before)]
    overall = paired_difference(before, after)
    lines.append(paired_row(f"**{what}, all**", overall, bold=True))
    return lines, overall


def paired_row(label: str, r: dict, bold: bool = False) -> str:
    verdict = "higher" if r["lo"] > 0 else "lower" if r["hi"] < 0 else "within noise"
    verdict = f"**{verdict}**" if bold else verdict
    return (f"| {label} | {r['n']} | {r['diff']:+.3f} ({r['lo']:+.3f} to {r['hi']:+.3f}) | {r['wins']} | {r['losses']} | "
            f"{r['p']:.2g} | {verdict} |")


def fmt(correct: float, total: int) -> str:
    if not total:
        return "–"
    lo, hi = wilson_interval(correct, total)
    return f"{correct / total:.3f} ({lo:.3f}–{hi:.3f}), n={total}"


def main(runs: str = "base=out/e2e/base,finetuned=out/e2e/finetuned", heldout: Path = Path("data/e2e_heldout"),
         out: Optional[Path] = None, note: str = "") -> str:
    """Compare the two evaluators per item and write the Markdown table.

    Args:
        runs: comma list of name=folder (each with ours/ and helm/ inside)
        heldout: the MMLU-format CSV folder both evaluators read
        out: write the Markdown here (also printed)
        note: a line under the title (date, GPU, adapter)
    """
    specs = [spec.split("=", 1) for spec in runs.split(",")]
    if not all(len(spec) == 2 for spec in specs):
        raise InputError(f"--runs {runs!r}: give name=folder pairs separated by commas, e.g. base=out/e2e/base")
    items, _ = load_task("mmlu_csv", "offline", heldout)
    lines = ["# End to end: SmolLM2-135M-Instruct, base vs fine-tuned, on the held-out splits of data/e2e_heldout", ""]
    if note:
        lines += [note, ""]
    lines += ["Exact match, 95% Wilson interval, n items. *ours (all)*: scripts/evaluate.py on every held-out item; "
              "*ours (HELM's items)* / *HELM*: the items HELM sampled (--max-eval-instances), same prompts; "
              "*agree*: items where both evaluators got the same answer text.", "",
              "| model | subject | ours (all) | ours (HELM's items) | HELM | agree | HELM failed requests |",
              "|---|---|---|---|---|---|---|"]
    summary = {}
    per_item: Dict[str, Dict[str, Dict[str, Dict]]] = {"ours": {}, "HELM": {}}  # evaluator -> run -> subject -> item -> score
    for name, folder in specs:
        folder = Path(folder)
        pred_path = folder / "ours" / "predictions_mmlu_csv.jsonl"
        if not pred_path.is_file():
            lines.append(f"| {name} | – | not run ({pred_path} missing) | | | | |")
            continue
        ours = [json.loads(line) for line in pred_path.read_text().splitlines() if line.strip()]
        by_prompt = {items[p["index"]].prompt: p for p in ours}
        helm = helm_items(folder)
        for p in ours:
            per_item["ours"].setdefault(name, {}).setdefault(p["group"], {})[items[p["index"]].prompt] = p["score"]
        for prompt, h in helm.items():
            if prompt in by_prompt:
                per_item["HELM"].setdefault(name, {}).setdefault(h["subject"], {})[prompt] = \
                    float(h["prediction"].strip() == by_prompt[prompt]["gold"])
        unmatched = [p for p in helm if p not in by_prompt]
        rows = {}
        for p in ours:
            r = rows.setdefault(p["group"], {"all": [0, 0], "sub": [0, 0], "helm": [0, 0], "agree": 0, "failed": 0})
            r["all"][0] += p["score"]
            r["all"][1] += 1
        for prompt, h in helm.items():
            r = rows.setdefault(h["subject"], {"all": [0, 0], "sub": [0, 0], "helm": [0, 0], "agree": 0, "failed": 0})
            r["failed"] += not h["success"]
            o = by_prompt.get(prompt)
            if o is None:
                continue
            helm_correct = float(h["prediction"].strip() == o["gold"])
            r["helm"][0] += helm_correct
            r["helm"][1] += 1
            r["sub"][0] += o["score"]
            r["sub"][1] += 1
            r["agree"] += h["prediction"].strip() == o["prediction"].strip()
        total = {"all": [0, 0], "sub": [0, 0], "helm": [0, 0], "agree": 0, "failed": 0}
        for subject in sorted(rows):
            r = rows[subject]
            for k in ("all", "sub", "helm"):
                total[k][0] += r[k][0]
                total[k][1] += r[k][1]
            total["agree"] += r["agree"]
            total["failed"] += r["failed"]
            lines.append(f"| {name} | {subject} | {fmt(*r['all'])} | {fmt(*r['sub'])} | {fmt(*r['helm'])} | "
                         f"{r['agree']}/{r['helm'][1]} | {r['failed']} |")
        lines.append(f"| **{name}** | **all** | **{fmt(*total['all'])}** | {fmt(*total['sub'])} | **{fmt(*total['helm'])}** | "
                     f"{total['agree']}/{total['helm'][1]} | {total['failed']} |")
        if unmatched:
            lines.append(f"| {name} | (HELM prompts not among ours: {len(unmatched)}) | | | | | |")
        summary[name] = total
    names = tuple(name for name, _ in specs)[:2]
    if len(names) == 2 and all(n in per_item["ours"] for n in names):
        lines += ["", f"## {names[1]} minus {names[0]}, paired on the same items", "",
                  "Difference in exact match with a 95% paired-bootstrap interval (10,000 resamples of the items, within "
                  f"each subject); *wins* / *losses*: items only {names[1]} / only {names[0]} got right; *p*: exact "
                  "McNemar test on those. *higher*: the interval's lower end is above 0.", "",
                  "| items | n | difference (95% interval) | wins | losses | p | verdict |", "|---|---|---|---|---|---|---|"]
        for evaluator, by_run in per_item.items():
            if all(by_run.get(n) for n in names):
                rows, overall = paired_lines(*paired_scores(by_run[names[0]], by_run[names[1]]), evaluator)
                lines += rows
                summary[f"{names[1]}_minus_{names[0]}_{evaluator}"] = overall
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
        (Path(out).with_suffix(".json")).write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    from cli import run

    run(main)
