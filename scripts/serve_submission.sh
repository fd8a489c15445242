#!/usr/bin/env bash
# What Dockerfile.serve runs: the challenge server on port 80 (HELM reaches it with `docker run -p 8080:80`).
# Settings come from the environment so one image serves any checkpoint:
#   CHECKPOINT_DIR  merged or converted checkpoint folder       (default /workspace/checkpoint)
#   ADAPTER_DIR     optional LoRA adapter on top of it           (default none)
#   QUANTIZE        bnb.nf4 / bnb.nf4-dq / bnb.int8 base weights  (default none: bf16)
#   PORT            listening port                              (default 80)
#   SERVER_ARGS     any further generate/server.py flags, e.g. "--stop_at_blank_line true --dola_layers low"
# DRY_RUN=1 prints the command instead of running it (tests/test_docker.py checks it).
# python3, not python: the base image runs the system Python, where `python` need not exist.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=(python3 generate/server.py --checkpoint_dir "${CHECKPOINT_DIR:-/workspace/checkpoint}" --host 0.0.0.0
     --port "${PORT:-80}" --max_seq_length "${MAX_SEQ_LENGTH:-2048}")
[ -n "${ADAPTER_DIR:-}" ] && cmd+=(--adapter_dir "$ADAPTER_DIR")
[ -n "${QUANTIZE:-}" ] && cmd+=(--quantize "$QUANTIZE")
[ -n "${DEVICE:-}" ] && cmd+=(--device "$DEVICE")
# shellcheck disable=SC2206  # SERVER_ARGS is a list of flags on purpose
[ -n "${SERVER_ARGS:-}" ] && cmd+=($SERVER_ARGS)
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
