#!/usr/bin/env bash
# Serving figures of two versions of the code in one GPU call, taking turns (A B, B A): the 30-stream NF4 figure moved
# from 2,380 to 3,428 tokens/s between two H100s in one hour on unchanged code (docs/serving.md), so a change is judged
# only against its base in the same call.
#     git archive BASE generate | tar -x -C ab_base     # here, before the call: an untracked folder travels with it
#     PYTHONPATH=.wheels/train_site:.wheels/serve_site:$PWD bash benchmarks/serve_ab.sh ab_base --rows nf4,nf4+lora
# A is a copy of the working tree, B another with the folder's files laid over it; each round runs
# benchmarks/serve_table.py with the given arguments on both, A first in odd rounds, B first in even ones (ROUNDS,
# default 2). Tables and logs go to $OUT (default out/serve_ab) as serve_{a,b}_<round>.{md,log}; last, every row's
# tokens/s side by side, with B / A. PYTHON picks the interpreter (default python3). Each side compiles into caches of
# its own: torch.compile's cache keys a graph by its code, not by the custom operators it calls, so B once ran A's
# compiled step against its own operator (a signature mismatch; the step fell back to bitsandbytes' products) and
# measured that.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: serve_ab.sh FOLDER [serve_table.py arguments]}
base=${base%/}
shift
[ -d "$base" ] || { echo "serve_ab.sh: $base is not a folder of files to lay over the tree" >&2; exit 2; }
out=${OUT:-out/serve_ab}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # each side runs in its own copy's folder
# Both sides run from copies in the same kind of folder, and take turns going first (A B, then B A, ...): the first
# version ran A in place and always first, and B's one stream came out 7-8% slower in a call where its code was the same
a=$(mktemp -d)
b=$(mktemp -d)
caches=$(mktemp -d)
trap 'rm -rf "$a" "$b" "$caches"' EXIT
tar -c --exclude=./out --exclude="./$base" . | tar -x -C "$a"
(cd "$a" && tar -c .) | tar -x -C "$b"
cp -r "$base"/. "$b"/
side() {  # side a|b round
  local tree=$a
  if [ "$1" = b ]; then tree=$b; fi
  # PYTHONPATH's entries in or under the working tree moved to this tree, whole entries only (worked out before the
  # cd changes $PWD: the first version did it after, so B's PYTHONPATH kept naming A's tree)
  local path="" entry
  local -a entries
  IFS=: read -ra entries <<<"${PYTHONPATH:-}"
  for entry in "${entries[@]}"; do
    case $entry in "$PWD" | "$PWD"/*) entry=$tree${entry#"$PWD"} ;; esac
    path="$path${path:+:}$entry"
  done
  (cd "$tree" && TORCHINDUCTOR_CACHE_DIR="$caches/$1/inductor" TRITON_CACHE_DIR="$caches/$1/triton" \
    PYTHONPATH="$path" "$python" benchmarks/serve_table.py "${args[@]}" \
    --out "$out/serve_$1_$2.md") >"$out/serve_$1_$2.log" 2>&1 ||
    echo "${1^^}, round $2: failed, see $out/serve_$1_$2.log"
}
args=("$@")
for round in $(seq 1 "${ROUNDS:-2}"); do
  if [ $((round % 2)) = 1 ]; then side a "$round"; side b "$round"; else side b "$round"; side a "$round"; fi
done
grep -l "decoding without the 4-bit kernel\|--fused_4bit:" "$out"/serve_*.log |
  sed 's/^/fell back to bitsandbytes in: /' || true
"$python" - "$out" <<'EOF'
import glob, re, statistics, sys
rates = {}  # (system, streams) -> {"a": [...], "b": [...]}
for path in sorted(glob.glob(f"{sys.argv[1]}/serve_[ab]_*.md")):
    side = re.search(r"serve_([ab])_", path).group(1)
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0].startswith("oneday"):
            rate = float(cells[3].split()[0].replace(",", ""))
            rates.setdefault((cells[0], cells[2]), {"a": [], "b": []})[side].append(rate)
print("| system | streams | A tokens/s | B tokens/s | B / A (medians) |\n|---|---|---|---|---|")
for (system, streams), r in rates.items():
    ratio = statistics.median(r["b"]) / statistics.median(r["a"]) if r["a"] and r["b"] else float("nan")
    print(f"| {system} | {streams} | {', '.join(map(str, r['a']))} | {', '.join(map(str, r['b']))} | {ratio:.3f} |")
EOF
