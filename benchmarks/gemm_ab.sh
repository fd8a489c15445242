#!/usr/bin/env bash
# The 4-bit kernel's products in two versions of the code in one GPU call, taking turns (A B, then B A), as
# serve_ab.sh does for the server: figures moved between H100s by up to a tenth on unchanged code, so a change is
# judged only against its base in the same call. The device machine has no git history: make the folder here, before
# the call.
#     git archive BRANCH | tar -x -C ab_gemm      # a whole tree; an untracked folder travels with the call
#     PYTHONPATH=.wheels/train_site bash benchmarks/gemm_ab.sh ab_gemm --rows 32 --adapter_rank 16 --sweep false
# A is the working tree, run in place, B the folder; each round runs benchmarks/gpu_nf4_gemm.py with the given
# arguments in both (ROUNDS, default 2). Unlike serve_ab.sh A is not copied: the products are timed on the GPU, in
# CUDA graphs, and in call 19 qkv's product without an adapter, the same code on both sides, came out even (B / A
# 1.002). JSON lines go to $OUT (default out/gemm_ab) as gemm_{a,b}_<round>.jsonl; last, per shape,
# row count and timing key (the defaults, as served, and without an adapter where there is one), ms side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: gemm_ab.sh FOLDER [gpu_nf4_gemm.py arguments]}
shift
[ -f "$base/benchmarks/gpu_nf4_gemm.py" ] || { echo "gemm_ab.sh: $base holds no tree of the code" >&2; exit 2; }
out=${OUT:-out/gemm_ab}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
base=$(cd "$base" && pwd)
# PYTHONPATH's folders made absolute for both sides, this tree left out: each gpu_nf4_gemm.py puts its own tree first
path=""
IFS=: read -ra entries <<<"${PYTHONPATH:-}"
for entry in "${entries[@]}"; do
  [ -n "$entry" ] && entry=$(cd "$entry" && pwd) && [ "$entry" != "$PWD" ] && path="$path${path:+:}$entry"
done
export PYTHONPATH=$path
side() {  # side a|b round
  local tree=$PWD
  if [ "$1" = b ]; then tree=$base; fi
  (cd "$tree" && "$python" benchmarks/gpu_nf4_gemm.py "${args[@]}") >"$out/gemm_$1_$2.jsonl" 2>"$out/gemm_$1_$2.log" ||
    echo "${1^^}, round $2: failed, see $out/gemm_$1_$2.log"
}
args=("$@")
for round in $(seq 1 "${ROUNDS:-2}"); do  # A first in odd rounds, B first in even ones
  if [ $((round % 2)) = 1 ]; then side a "$round"; side b "$round"; else side b "$round"; side a "$round"; fi
done
"$python" - "$out" <<'PY'
import glob, json, re, statistics, sys
ms = {}  # (shape, rows, key) -> {"a": [...], "b": [...]}
for path in sorted(glob.glob(f"{sys.argv[1]}/gemm_[ab]_*.jsonl")):
    side = re.search(r"gemm_([ab])_", path).group(1)
    for line in open(path):
        row = json.loads(line) if line.startswith("{") else {}
        for key in ("fused nf4 (defaults, as served)", "fused nf4 (defaults, no adapter)"):
            if "shape" in row and isinstance(row.get(key), float):
                ms.setdefault((row["shape"], row["rows"], key), {"a": [], "b": []})[side].append(row[key])
print("| shape | rows | timing | A ms | B ms | B / A (medians) |\n|---|---|---|---|---|---|")
for (shape, rows, key), t in ms.items():
    ratio = statistics.median(t["b"]) / statistics.median(t["a"]) if t["a"] and t["b"] else float("nan")
    print(f"| {shape} | {rows} | {key[11:-1]} | {', '.join(map(str, t['a']))} | {', '.join(map(str, t['b']))} "
          f"| {ratio:.3f} |")
PY
