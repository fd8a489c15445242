"""Issue 6's tables from the JSON lines that benchmarks/bench_vs_peers.sh collects (ours from benchmark_finetune.py, the
peers from peer_unsloth.py):

    python3 benchmarks/speed_table.py speed_mistral-2048.jsonl [more.jsonl ...]

(a) every row: system, model, micro-batch x seq, checkpointing, tokens/s, peak GiB (a failed or out-of-memory
configuration is listed with its error);
(b) the verdict per (model, seq) and per peak-memory cap: oneday's fastest row whose peak is at most the cap against
Unsloth's fastest such row, and PASS when ours is at least --target (1.25) times Unsloth's tokens/s.
A row without tokens_per_s never counts as anyone's best. Lines that are not JSON objects with a "system" key (logs,
probes, "built" lines) are skipped.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import short_names  # noqa: E402

OURS, PEER = "oneday", "unsloth"
# Checkpointing as each system spells it -> one word for the table. Unsloth's "unsloth" mode offloads the saved
# hidden states to CPU memory; HF/Unsloth's True recomputes everything like our "full".
CKPT_WORDS = {True: "on", False: "off", "true": "on", "false": "off", "full": "on", "none": "off",
              "unsloth": "offloaded", "offload": "offloaded", "offloaded": "offloaded"}


def ckpt_word(value) -> str:
    if value is None:
        return "?"
    if isinstance(value, bool) or value in (0, 1):
        return CKPT_WORDS[bool(value)]
    return CKPT_WORDS.get(str(value).lower(), str(value))


def model_name(label: str) -> str:
    """Our registered name for a peer's short label (mistral-7b -> Mistral-7B-v0.1), so rows group together."""
    return short_names.get(label.lower(), label)


def read_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (give the .jsonl that bench_vs_peers.sh wrote under $OUT)")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or "system" not in row:
                continue
            where = f"{path}:{n}"
            label = row.get("model", row.get("arch"))
            if label is None or "seq" not in row:
                raise SystemExit(f"{where}: a {row['system']} row needs 'model' (or 'arch') and 'seq'; "
                                 "re-run it through benchmarks/peer_unsloth.py or benchmark_finetune.py")
            if "tokens_per_s" in row and "peak_mem_gib" not in row:
                raise SystemExit(f"{where}: the row has tokens_per_s but no peak_mem_gib; a speed without its "
                                 "memory cannot be placed under a cap")
            row["model"] = model_name(str(label))
            row["where"] = where
            rows.append(row)
    return rows


def succeeded(row: dict) -> bool:
    return row.get("tokens_per_s") is not None and row.get("peak_mem_gib") is not None and "error" not in row


def best_under(rows: list[dict], system: str, model: str, seq: int, cap: float):
    fits = [r for r in rows if r["system"].lower().startswith(system) and r["model"] == model and r["seq"] == seq
            and succeeded(r) and float(r["peak_mem_gib"]) <= cap]
    return max(fits, key=lambda r: float(r["tokens_per_s"]), default=None)


def describe(row) -> str:
    if row is None:
        return "nothing under the cap"
    system = row["system"].lower()
    fp8 = "FP8 input-gradient matmuls, " if "fp8grad" in system else "FP8 base matmuls, " if "fp8" in system else ""
    fp8 += "norm and SwiGLU outputs kept, " if "+keep" in system else ""
    return (f"{float(row['tokens_per_s']):,.0f} ({row.get('mb', '?')} x {row['seq']}, {fp8}"
            f"{ckpt_word(row.get('grad_ckpt'))}, {float(row['peak_mem_gib']):.2f} GiB)")


def rows_table(rows: list[dict]) -> list[str]:
    out = ["| system | model | micro-batch x seq | checkpointing | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if succeeded(r):
            speed, peak = f"{float(r['tokens_per_s']):,.0f}", f"{float(r['peak_mem_gib']):.2f}"
        else:
            speed, peak = "—", f"error: {str(r.get('error', 'no tokens_per_s'))[:80]}"
        out.append(f"| {r['system']} | {r['model']} | {r.get('mb', '?')} x {r['seq']} | {ckpt_word(r.get('grad_ckpt'))} "
                   f"| {speed} | {peak} |")
    return out


def verdicts(rows: list[dict], caps, target: float) -> list[dict]:
    """One dict per (model, seq, cap): ours, peer (best rows or None), ratio (or None) and verdict."""
    out = []
    for model, seq in sorted({(r["model"], r["seq"]) for r in rows}):
        for cap in caps:
            ours, peer = best_under(rows, OURS, model, seq, cap), best_under(rows, PEER, model, seq, cap)
            ratio = float(ours["tokens_per_s"]) / float(peer["tokens_per_s"]) if ours and peer else None
            if ratio is not None:
                verdict = "PASS" if ratio >= target else "FAIL"
            elif peer is not None:
                verdict = "FAIL"  # Unsloth trains under this cap and we do not
            elif not any(succeeded(r) for r in rows if r["system"].lower().startswith(PEER) and r["model"] == model
                         and r["seq"] == seq):
                verdict = "NO UNSLOTH DATA"  # every Unsloth configuration failed or none ran: never a PASS
            else:
                # Unsloth ran, but none of its configurations fits: worth a look at its leanest row, not a PASS.
                verdict = "ONLY ONEDAY FITS" if ours is not None else "NEITHER FITS"
            out.append(dict(model=model, seq=seq, cap=cap, ours=ours, peer=peer, ratio=ratio, verdict=verdict))
    return out


def verdict_table(results: list[dict], target: float) -> list[str]:
    out = [f"| model | seq | cap GiB | oneday best: tokens/s (config, peak) | Unsloth best | ratio | >= {target:g}x |",
           "|---|---|---|---|---|---|---|"]
    for v in results:
        ratio = f"{v['ratio']:.2f}" if v["ratio"] is not None else "—"
        out.append(f"| {v['model']} | {v['seq']} | {v['cap']:g} | {describe(v['ours'])} | {describe(v['peer'])} "
                   f"| {ratio} | {v['verdict']} |")
    return out


def main(argv=None) -> int:
    # argparse rather than jsonargparse.CLI: the files are a variadic positional, which jsonargparse cannot express.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON-lines files (ours and the peers'), read in order")
    parser.add_argument("--caps", default="8,16,24", help="peak-memory caps in GiB, comma separated (peak <= cap)")
    parser.add_argument("--target", type=float, default=1.25, help="ours / Unsloth tokens/s needed for PASS")
    args = parser.parse_args(argv)
    try:
        caps = [float(c) for c in args.caps.split(",")]
    except ValueError:
        raise SystemExit(f"--caps {args.caps!r}: give GiB numbers separated by commas, e.g. 8,16,24")
    rows = read_rows(args.results)
    if not rows:
        raise SystemExit(f"{', '.join(args.results)}: no result rows (JSON lines with a 'system' key); did the run "
                         "print any? Look for errors above it")
    print("\n".join(rows_table(rows)))
    print()
    results = verdicts(rows, caps, args.target)
    print("\n".join(verdict_table(results, args.target)))
    passed = sum(v["verdict"] == "PASS" for v in results)
    print(f"\n{passed} of {len(results)} (model, seq, cap) cells PASS (oneday >= {args.target:g}x Unsloth's best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
