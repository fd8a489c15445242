"""The end-to-end table: base vs fine-tuned, scripts/evaluate.py vs HELM, on the held-out MMLU-format splits.

    python scripts/e2e_report.py --runs base=out/e2e/base,finetuned=out/e2e/finetuned --heldout data/e2e_heldout \
        --out out/e2e/results.md

Each run folder holds ours/predictions_mmlu_csv.jsonl (scripts/evaluate.py --tasks mmlu_csv) and
helm/benchmark_output/runs/<suite>/mmlu:subject=*/scenario_state.json (helm-run). HELM items are matched to ours by
their prompt (the same text when both evaluators read the same CSVs), so the table also says on how many items the
two predictions agree, and whether every HELM request succeeded. Exact match with 95% Wilson intervals.
"""
import glob
import json
import sys
from pathlib import Path
from typing import Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    items, _ = load_task("mmlu_csv", "offline", heldout)
    lines = ["# End to end: SmolLM2-135M-Instruct, base vs fine-tuned, held-out BIG-bench splits", ""]
    if note:
        lines += [note, ""]
    lines += ["Exact match, 95% Wilson interval, n items. *ours (all)*: scripts/evaluate.py on every held-out item; "
              "*ours (HELM's items)* / *HELM*: the items HELM sampled (--max-eval-instances), same prompts; "
              "*agree*: items where both evaluators got the same answer text.", "",
              "| model | subject | ours (all) | ours (HELM's items) | HELM | agree | HELM failed requests |",
              "|---|---|---|---|---|---|---|"]
    summary = {}
    for spec in runs.split(","):
        name, folder = spec.split("=", 1)
        folder = Path(folder)
        pred_path = folder / "ours" / "predictions_mmlu_csv.jsonl"
        if not pred_path.is_file():
            lines.append(f"| {name} | – | not run ({pred_path} missing) | | | | |")
            continue
        ours = [json.loads(line) for line in pred_path.read_text().splitlines() if line.strip()]
        by_prompt = {items[p["index"]].prompt: p for p in ours}
        helm = helm_items(folder)
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
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
        (Path(out).with_suffix(".json")).write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
