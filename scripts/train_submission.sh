#!/usr/bin/env bash
# What Dockerfile.train runs: the whole submission from nothing, inside the 24-hour budget on one GPU:
# download the base model, prepare the data recipe, QLoRA fine-tune, merge the adapter into a bf16 checkpoint.
# Settings (environment):
#   BASE_REPO       hub repository of the base model     (default mistralai/Mistral-7B-v0.1)
#   RECIPE          prepare_data/recipes/<name>.yaml      (default prepare_data/recipes/upaya_4090.yaml)
#   OUT             where everything goes                 (default /workspace/out)
#   MAX_TIME        fine-tuning wall-clock budget HH:MM:SS (default 20:00:00: leaves time for download, data, merge)
#   FINETUNE_CONFIG finetune/lora.py --config file      (default finetune/configs/<recipe>.yaml when it exists: the
#                   winning team's hyperparameters for its data recipe; empty for finetune/lora.py's defaults)
#   FINETUNE_ARGS   further finetune/lora.py flags, e.g. "--lora.r 128 --lora.alpha 256 --train.learning_rate 2e-5"
#   KEEP_DOWNLOAD   true keeps the Hugging Face weights after conversion (default false: download, converted and
#                   merged copies at once would need about 43 GB for a 7B model, 85 GB for a 14B one)
# DRY_RUN=1 prints the commands instead of running them (tests/test_docker.py checks them).
# python3, not python: the base image runs the system Python, where `python` need not exist.
set -euo pipefail
cd "$(dirname "$0")/.."
base_repo=${BASE_REPO:-mistralai/Mistral-7B-v0.1}
recipe=${RECIPE:-prepare_data/recipes/upaya_4090.yaml}
out=${OUT:-/workspace/out}
max_time=${MAX_TIME:-20:00:00}
default_config=finetune/configs/$(basename "$recipe")
[ -f "$default_config" ] || default_config=
config=${FINETUNE_CONFIG-$default_config}
ckpt=$out/checkpoints/$base_repo
data=$out/data/$(basename "$recipe" .yaml)
run=$out/lora
run() {
  echo "+ $*" >&2
  if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}
# shellcheck disable=SC2206
extra=(${FINETUNE_ARGS:-})
run python3 scripts/download.py --repo_id "$base_repo" --checkpoint_dir "$out/checkpoints"
drop=true; [ "${KEEP_DOWNLOAD:-false}" = true ] && drop=false
run python3 scripts/convert_hf_checkpoint.py --checkpoint_dir "$ckpt" --drop_source "$drop"
run python3 prepare_data/prepare_mix.py --recipe "$recipe" --checkpoint_dir "$ckpt" --out_dir "$data"
# The config comes first, so the paths here override its own; --speed.cuda_graph: the fast path (README, Measured);
# FINETUNE_ARGS come last, so "--speed.cuda_graph false" there wins
# exit status 75: stopped by --max_time (or a signal) with everything saved; merge what it has
run python3 finetune/lora.py ${config:+--config "$config"} --checkpoint_dir "$ckpt" --data_dir "$data" \
  --out_dir "$run" --quantize bnb.nf4-dq --speed.cuda_graph true --max_time "$max_time" "${extra[@]}" || [ $? -eq 75 ]
adapter=$run/adapter_best.safetensors  # best validation loss; the latest one when no validation ran
[ -f "$adapter" ] || [ -n "${DRY_RUN:-}" ] || adapter=$run/adapter.safetensors
run python3 scripts/merge_lora.py --adapter "$adapter" --out_dir "$out/final"
echo "merged checkpoint: $out/final (to serve it: checkpoints/final, then docker build -f Dockerfile.serve .)" >&2
