#!/usr/bin/env bash
# Issue 6 side by side: our QLoRA trainer (benchmarks/benchmark_finetune.py) and Unsloth (and optionally
# transformers+peft) timed one after another on the same GPU in one call, then the rows table and the per-cap verdict
# (benchmarks/speed_table.py). One stage per call, each built to finish inside the device tool's 10-minute limit:
#     PYTHONPATH=.anchors/site:$PWD bash benchmarks/bench_vs_peers.sh mistral-2048|mistral-4096|llama13b-2048
#     bash benchmarks/bench_vs_peers.sh qwen14b-2048   # first-generation Qwen-14B: ours only (no peer runs it natively)
# Needs .anchors/ (bash ../shared/anchors/make_site.sh) carried to the machine. Results: $OUT/speed_<stage>.jsonl
# (every JSON line, appended) and $OUT/speed_<stage>.md (the tables). Override per run:
#     OURS_CONFIGS=1x0,4x1   UNSLOTH_CONFIGS=4xoffload,1xnone   HF_CONFIGS=1xfull (the HF baseline; off by default)
#     BUDGET_S=550 (seconds from the start: a step that would pass it is cut or skipped and listed as such; the table
#     still prints), OURS_TIMEOUT_S=240 (our benchmark's limit, so the peers keep their turn)
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}

# Our configurations (benchmark_finetune.py --configs, MBxC as that script spells C today: 1 every block checkpointed,
# 0 none, pN the first N blocks): enough to have a candidate under each cap. Change these as the trainer gains modes.
# A trailing o offloads the checkpointed blocks' inputs to host memory (--speed.offload_checkpoints); +fp8 / +fp8grad
# after a configuration runs it with finetune/lora.py --speed.fp8 all / grad, +keep with --speed.recompute_inputs false. The defaults
# are the README table's runs (FP8 all); its bf16 table ran 1x0,2xp4o,3x0,1xp18o,1xp20o,4x1o,2x1o /
# 1x0,1xp4o,1xp6o,1x1o,2x1o,1xp26o,1xp28o / 1x1o,1x0,1xp6o,2x1o,4x1o,1xp4o.
OURS_mistral_2048="1x0+fp8,3x0+fp8,2x0+fp8+keep,1xp15o+fp8,1xp16o+fp8"
OURS_mistral_4096="1x0+fp8+keep,1xp3o+fp8,1xp4o+fp8,1xp24o+fp8,1xp26o+fp8"
OURS_llama13b_2048="1x1o+fp8,1x0+fp8+keep,1xp4o+fp8,1xp6o+fp8,1x0+fp8"
OURS_qwen14b_2048="1x1o,1x1o+fp8,1xp8o+fp8,1x0+fp8,1x0"
# Unsloth's likely best under each cap, most useful first (the budget may cut the tail). From the anchors' table:
# offloaded checkpointing ("offload") costs ~0.5 GiB per extra 2,048 tokens on a 7B (1x2048 5.0 GiB, 4x2048 6.6) and
# speeds up with micro-batch, so the largest one under 8 GiB is its 8-GiB best (6x2048 ~7.6 GiB is the guess, 8x2048
# ~8.7 the 16-GiB one); no checkpointing ("none") is faster per token but costs ~7.5 GiB per 2,048 tokens (1x2048 12.1
# GiB), so 1x/2x of it are the 16/24-GiB candidates. 1x offloaded is only its leanest row (a 13B may fit 8 GiB only so).
UNSLOTH_mistral_2048="4xoffload,6xoffload,1xnone,8xoffload,2xnone,1xoffload"
UNSLOTH_mistral_4096="2xoffload,3xoffload,1xnone,4xoffload,1xoffload"
UNSLOTH_llama13b_2048="1xoffload,8xoffload,1xnone,4xoffload"

case "$stage" in
  mistral-2048) arch=mistral-7b; model=Mistral-7B-v0.1; seq=2048; ours=$OURS_mistral_2048; peer=$UNSLOTH_mistral_2048 ;;
  mistral-4096) arch=mistral-7b; model=Mistral-7B-v0.1; seq=4096; ours=$OURS_mistral_4096; peer=$UNSLOTH_mistral_4096 ;;
  llama13b-2048) arch=llama-2-13b; model=Llama-2-13b-hf; seq=2048; ours=$OURS_llama13b_2048; peer=$UNSLOTH_llama13b_2048 ;;
  qwen14b-2048) arch=qwen-14b; model=Qwen-14B; seq=2048; ours=$OURS_qwen14b_2048; peer= ;;
  *) echo "usage: $0 mistral-2048|mistral-4096|llama13b-2048|qwen14b-2048   (one stage per call: each takes ~7-9 minutes)"
     exit 2 ;;
esac
ours=${OURS_CONFIGS:-$ours}
peer=${UNSLOTH_CONFIGS:-$peer}
hf=${HF_CONFIGS:-}
budget=${BUDGET_S:-550}
per_config_s=$([ "$arch" = llama-2-13b ] && echo 240 || echo 150)  # one peer process: import, load + quantize, 11 steps

out=${OUT:-/tmp/oneday-bench}
mkdir -p "$out"
results="$out/speed_$stage.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .anchors/site ] && export PYTHONPATH="$PWD/.anchors/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
status=0

step() { echo "[+${SECONDS} s of ${budget} s] $*"; }
left() { echo $((budget - SECONDS)); }
# Run a command, show all of its output, and append its JSON lines to the results (logs stay on the terminal).
collect() {
  "$@" | while IFS= read -r line; do
    printf '%s\n' "$line"
    [[ $line == "{"* ]] && printf '%s\n' "$line" >> "$results"
  done
  return "${PIPESTATUS[0]}"
}
# A step that died without printing its rows still leaves one line in the table.
error_row() {  # system message
  printf '{"system": "%s", "model": "%s", "seq": %s, "error": "%s"}\n' "$1" "$model" "$seq" "$2" | tee -a "$results"
}

step "stage $stage: $model seq $seq; ours $ours; unsloth $peer${hf:+; hf-peft $hf}; results $results"
collect python3 - <<'EOF' || { echo "torch with CUDA is missing"; exit 2; }
import json, torch
from importlib.metadata import version, PackageNotFoundError
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
print(json.dumps({"probe": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                            **{n: v(n) for n in ["unsloth", "transformers", "peft", "bitsandbytes", "triton"]}}}))
EOF
[ -f .anchors/anchor_unsloth_qlora.py ] || echo "WARNING: .anchors/ not here: the peers will fail (carry .anchors)"

built=0
if [ -z "$peer" ]; then
  step "no peer runs $model: ours take the whole budget"
else
  step "random Hugging Face $arch for the peers"
  if timeout -k 10 $(( $(left) > 300 ? 300 : $(left) )) python3 benchmarks/peer_models.py --arch "$arch"; then
    built=1
  else
    echo "could not write /tmp/$arch-random: the peers are skipped"; status=1
  fi
fi

t=$(( $(left) - 60 )); t=$(( t > ${OURS_TIMEOUT_S:-240} ? ${OURS_TIMEOUT_S:-240} : t ))  # leave the peers their turn
[ -z "$peer" ] && t=$(( $(left) - 30 ))
step "oneday: benchmark_finetune.py --configs $ours (up to $t s)"
if [ $t -gt 30 ]; then
  collect timeout -k 10 $t python3 benchmarks/benchmark_finetune.py --model "$model" --seq "$seq" --configs "$ours" --cuda_graph true --steps 6 --warmup 2
  rc=$?
  if [ $rc -ne 0 ]; then
    error_row oneday "benchmark_finetune.py $([ $rc -eq 124 ] && echo "timed out after $t s" || echo "exit code $rc"); rows printed before it are kept"
    status=1
  fi
else
  error_row oneday "skipped: time budget"; status=1
fi

if [ $built -eq 1 ]; then
  b=$(( $(left) - 20 ))
  step "unsloth: $peer (budget $b s, $per_config_s s per configuration)"
  collect timeout -k 10 $((b + 30)) python3 benchmarks/peer_unsloth.py --peer unsloth --arch "$arch" --seq "$seq" \
      --configs "$peer" --timeout_s "$per_config_s" --budget_s "$b" || status=1
  if [ -n "$hf" ]; then
    b=$(( $(left) - 20 ))
    step "transformers+peft: $hf (budget $b s)"
    collect timeout -k 10 $((b + 30)) python3 benchmarks/peer_unsloth.py --peer hf-peft --arch "$arch" --seq "$seq" \
        --configs "$hf" --timeout_s "$per_config_s" --budget_s "$b" || status=1
  fi
elif [ -n "$peer" ]; then
  error_row unsloth "no random checkpoint"
fi

step "tables"
python3 benchmarks/speed_table.py "$results" | tee "$out/speed_$stage.md" || status=1
step "done"
exit $status
