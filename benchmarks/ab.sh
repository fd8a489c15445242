#!/usr/bin/env bash
# Two versions of the code measured in one GPU call, taking turns (A B, then B A): the 30-stream NF4 figure moved from
# 2,380 to 3,428 tokens/s between two H100s in one hour on unchanged code (docs/serving.md), so a change is judged only
# against its base in the same call. The device machine has no git history: make the folder here, before the call.
#     mkdir ab_base && git archive BASE generate lora.py | tar -x -C ab_base   # the files that differ, or a whole tree
#     PYTHONPATH=.wheels/train_site:.wheels/serve_site:$PWD bash benchmarks/ab.sh ab_base \
#         benchmarks/serve_table.py --rows nf4,nf4+lora
#     PYTHONPATH=.wheels/train_site bash benchmarks/ab.sh ab_base benchmarks/gpu_nf4_gemm.py --rows 32 --sweep false
# FOLDER, SCRIPT and OUT are paths from where the command runs; SCRIPT must be a file of the tree (each side runs its
# own copy of it), and an untracked FOLDER inside the tree travels with a device call.
# A is a copy of the working tree, B another with the folder's files laid over it; each round runs the script with the
# given arguments on both, A first in odd rounds, B first in even ones (ROUNDS, default 2). Each side's output goes to
# $OUT (default out/ab in the tree; earlier sides' files there are removed) as {a,b}_<round>.out (stdout) and .log
# (stderr). Last, the figures both sides printed as JSON lines, side by side with B / A of the medians:
# serve_table.py's tokens/s per system and streams, gpu_nf4_gemm.py's milliseconds per shape and rows (the kernel's
# defaults as served, and without the adapter where there is one).
# PYTHON picks the interpreter (default python3).
# Both sides run from copies in the same kind of folder, with PYTHONPATH naming their own copy, and take turns going
# first: an earlier version ran A in place and always first, left B's PYTHONPATH naming A's tree, and in a call where
# both sides ran the same code B's one stream came out 7-8% slower. Each side compiles into caches of its own:
# torch.compile's cache keys a graph by its code, not by the custom operators it calls, so B once ran A's compiled step
# against its own operator (a signature mismatch; the step fell back to bitsandbytes' products) and measured that.
set -euo pipefail
usage="usage: ab.sh FOLDER SCRIPT [SCRIPT's arguments]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
base=$(realpath -m "$1")  # from where the command runs, before the cd below
script=$(realpath -m "$2")
out=${OUT:+$(realpath -m "$OUT")}
shift 2
cd "$(dirname "$0")/.."
[ -d "$base" ] || { echo "ab.sh: $base is not a folder of files to lay over the tree" >&2; exit 2; }
script=$(realpath --relative-to=. "$script")
# each side runs its own copy of the script, which puts its own tree first on sys.path: one outside the tree would
# run the same code on both sides
case $script in ../* | /*) echo "ab.sh: $script is not in this tree, $PWD" >&2; exit 2 ;; esac
[ -f "$script" ] || { echo "ab.sh: $script is not a file of this tree" >&2; exit 2; }
out=${out:-$PWD/out/ab}
python=${PYTHON:-python3}
mkdir -p "$out"
rm -f "$out"/[ab]_*.out "$out"/[ab]_*.log  # the summary reads every side's file there
exclude=$(realpath --relative-to=. "$base")  # the folder, where it lies inside the tree, is B's alone
[ "$exclude" != . ] || { echo "ab.sh: the folder is the tree itself; give one with B's files" >&2; exit 2; }
a=$(mktemp -d)
b=$(mktemp -d)
caches=$(mktemp -d)
trap 'rm -rf "$a" "$b" "$caches"' EXIT
tar -c --exclude=./out --exclude="./$exclude" . | tar -x -C "$a"
(cd "$a" && tar -c .) | tar -x -C "$b"
cp -r "$base"/. "$b"/
side() {  # side a|b round
  local tree=$a
  if [ "$1" = b ]; then tree=$b; fi
  # PYTHONPATH's entries in or under the working tree moved to this tree, whole entries only (worked out before the
  # cd changes $PWD)
  local path="" entry
  local -a entries
  IFS=: read -ra entries <<<"${PYTHONPATH:-}"
  for entry in "${entries[@]}"; do
    case $entry in "$PWD" | "$PWD"/*) entry=$tree${entry#"$PWD"} ;; esac
    path="$path${path:+:}$entry"
  done
  (cd "$tree" && TORCHINDUCTOR_CACHE_DIR="$caches/$1/inductor" TRITON_CACHE_DIR="$caches/$1/triton" \
    PYTHONPATH="$path" "$python" "$script" "${args[@]}") >"$out/$1_$2.out" 2>"$out/$1_$2.log" ||
    echo "${1^^}, round $2: failed, see $out/$1_$2.log"
}
args=("$@")
for round in $(seq 1 "${ROUNDS:-2}"); do
  if [ $((round % 2)) = 1 ]; then side a "$round"; side b "$round"; else side b "$round"; side a "$round"; fi
done
grep -l "decoding without the 4-bit kernel\|--fused_4bit:" "$out"/[ab]_*.log |
  sed 's/^/fell back to bitsandbytes in: /' || true
"$python" - "$out" <<'EOF'
import glob, json, re, statistics, sys
figures = {}  # (what, case, unit) -> {"a": [...], "b": [...]}
for path in sorted(glob.glob(f"{sys.argv[1]}/[ab]_*.out")):
    name = re.search(r"/([ab])_\d+\.out$", path)
    if name is None:
        continue
    for line in open(path):
        try:
            row = json.loads(line) if line.startswith("{") else {}
        except ValueError:  # a line that only starts like JSON
            continue
        found = []
        if "system" in row and isinstance(row.get("tokens_per_s"), (int, float)):  # serve_table.py
            found.append((row["system"], f"{row['streams']} streams", "tokens/s", row["tokens_per_s"]))
        for key in ("fused nf4 (defaults, as served)", "fused nf4 (defaults, no adapter)"):  # gpu_nf4_gemm.py
            if "shape" in row and isinstance(row.get(key), float):
                found.append((row["shape"], f"{row['rows']} rows, {key[11:-1]}", "ms", row[key]))
        for what, case, unit, value in found:
            figures.setdefault((what, case, unit), {"a": [], "b": []})[name.group(1)].append(value)
print("| measurement | case | unit | A | B | B / A (medians) |\n|---|---|---|---|---|---|")
for (what, case, unit), f in figures.items():
    ratio = statistics.median(f["b"]) / statistics.median(f["a"]) if f["a"] and f["b"] else float("nan")
    print(f"| {what} | {case} | {unit} | {', '.join(map(str, f['a']))} | {', '.join(map(str, f['b']))} "
          f"| {ratio:.3f} |")
if not figures:
    print("no figures of serve_table.py or gpu_nf4_gemm.py in the outputs")
EOF
