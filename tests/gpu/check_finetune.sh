#!/usr/bin/env bash
# QLoRA on the GPU machine: speed/memory table for Mistral-7B and Llama-2-13B shapes (random weights), a tiny NF4
# fine-tune end to end (train -> generate -> merge), and, when its files were carried along, a real NF4 fine-tune of
# SmolLM2-135M on data/demo. Run from the repository root:
#     bash tests/gpu/check_finetune.sh [all|bench|smoke|real|peers]      (default: all = bench smoke real)
# Needs python3 with torch (CUDA) and lightning; bitsandbytes and jsonargparse come from .anchors/site when present
# (bash ../shared/anchors/make_site.sh builds it). Results: $OUT (or /tmp/oneday-gpu-check)/finetune_*.jsonl + table.
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=${1:-all}
out=${OUT:-/tmp/oneday-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .anchors/site ] && export PYTHONPATH="$PWD/.anchors/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=python3
results="$out/finetune_bench.jsonl"
status=0

python3 - <<'EOF' || { echo "missing packages: carry .anchors/site (bash ../shared/anchors/make_site.sh)"; exit 2; }
import json, torch, lightning, bitsandbytes, jsonargparse
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
                  "lightning": lightning.__version__, "bitsandbytes": bitsandbytes.__version__,
                  "jsonargparse": jsonargparse.__version__}))
EOF

bench() {
  : > "$results"
  # Mistral-7B at 2048: checkpointing on/off and larger micro-batches; Llama-2-13B: the memory-lean settings that
  # must fit 24 GiB, plus the faster ones for bigger cards. Each model in its own process (clean memory).
  timeout 420 $py benchmarks/benchmark_finetune.py --model Mistral-7B-v0.1 --seq 2048 --configs 1x1,1x0,2x1,4x1 \
      | tee -a "$results" || status=1
  timeout 420 $py benchmarks/benchmark_finetune.py --model Llama-2-13b-hf --seq 2048 --configs 1x1,2x1,1x0 \
      | tee -a "$results" || status=1
  echo
  $py benchmarks/benchmark_finetune.py --table "$results"
  $py - "$results" <<'EOF' || status=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and "tokens_per_s" in l]
def best(model, cap=None):
    ok = [r for r in rows if r["model"] == model and (cap is None or r["peak_mem_gib"] <= cap)]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
m = [r for r in rows if r["model"] == "Mistral-7B-v0.1" and r["mb"] == 1 and r["grad_ckpt"]]
if m:
    r = m[0]
    print(f"Mistral-7B 1x2048 checkpointing: {r['tokens_per_s']:,.0f} tok/s at {r['peak_mem_gib']} GiB "
          f"= {r['tokens_per_s'] / 2499:.2f}x transformers+peft+bnb (2,499 tok/s at 8.4 GiB); bar: >= 2x at <= 8.4 GiB")
r = best("Mistral-7B-v0.1", 8.4)
print("Mistral-7B best at <= 8.4 GiB:", r and f"{r['tokens_per_s']:,.0f} tok/s ({r['mb']}x{r['seq']}, ckpt {r['grad_ckpt']})")
r = best("Llama-2-13b-hf", 24.0)
print("Llama-2-13B best at <= 24 GiB:", r and f"{r['tokens_per_s']:,.0f} tok/s at {r['peak_mem_gib']} GiB ({r['mb']}x{r['seq']}, ckpt {r['grad_ckpt']})"
      or "NOTHING FITS 24 GiB")
EOF
}

smoke() {
  # A tiny random GQA model + learnable data; NF4 QLoRA must learn, generate, and merge to a bf16 checkpoint whose
  # logits match the adapter on its NF4 base. Then fp4 and int8 for a few steps each.
  local d="$out/smoke"
  rm -rf "$d"; mkdir -p "$d"
  $py - "$d" <<'EOF' || { echo "SMOKE: could not build the tiny checkpoint"; status=1; return; }
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_checkpoint import make_tiny_checkpoint
from tiny_data import make_data_dir
d = Path(sys.argv[1])
ckpt = make_tiny_checkpoint(d / "ckpt", prompt_style="alpaca")
make_data_dir(d / "data", json.loads((ckpt / "model_config.json").read_text())["vocab_size"], n_train=512, n_val=64)
EOF
  timeout 300 $py finetune/lora.py --checkpoint_dir "$d/ckpt" --data_dir "$d/data" --out_dir "$d/nf4" \
      --quantize bnb.nf4-dq --train.max_steps 60 --train.batch_size 8 --train.micro_batch_size 4 \
      --train.learning_rate 1e-2 --train.save_interval 20 --train.log_interval 10 --train.neftune_alpha 5 \
      --eval.interval 20 --speed.activation_checkpointing true \
      || { echo "SMOKE FAILED: NF4 fine-tune"; status=1; return; }
  timeout 120 $py generate/lora.py --adapter "$d/nf4/adapter.safetensors" --prompt "Name a colour." \
      --temperature 0 --max_new_tokens 16 || { echo "SMOKE FAILED: generate/lora.py"; status=1; }
  timeout 120 $py scripts/merge_lora.py --adapter "$d/nf4/adapter.safetensors" --out_dir "$d/merged" \
      || { echo "SMOKE FAILED: merge"; status=1; }
  $py - "$d" <<'EOF' || status=1
import json, sys, torch
from pathlib import Path
from lora import load_adapter
from utils import load_model
d = Path(sys.argv[1])
state = torch.load(d / "nf4/state.ckpt", weights_only=True)
val = json.loads(state["state"])["history"]["val"]
print(f"SMOKE NF4 val loss {val[0][1]:.3f} -> {val[-1][1]:.3f}")
assert val[-1][1] < val[0][1] - 0.5, "QLoRA did not learn"
x = torch.randint(0, 300, (2, 24), device="cuda")
with torch.no_grad():
    qlora = load_model(d / "ckpt", device="cuda", dtype=torch.bfloat16, quantize="bnb.nf4-dq")
    load_adapter(qlora, d / "nf4/adapter.safetensors")
    a = qlora.eval()(x).float()
    b = load_model(d / "merged", device="cuda", dtype=torch.bfloat16)(x).float()
err = ((a - b).abs().mean() / a.abs().mean()).item()
print(f"SMOKE merged vs QLoRA logits: mean relative difference {err:.4f}")
assert err < 0.02, "merged checkpoint does not reproduce the QLoRA model"
print("SMOKE NF4 OK")
EOF
  for mode in bnb.fp4 bnb.int8; do
    timeout 200 $py finetune/lora.py --checkpoint_dir "$d/ckpt" --data_dir "$d/data" --out_dir "$d/${mode#bnb.}" \
        --quantize $mode --train.max_steps 10 --train.batch_size 8 --train.micro_batch_size 4 \
        --train.learning_rate 1e-2 --train.log_interval 5 --train.optimizer paged_adamw8bit \
        --eval.interval 10 --eval.sample_tokens 0 \
        && echo "SMOKE $mode OK" || { echo "SMOKE FAILED: $mode"; status=1; }
  done
}

real() {
  # A real 4-bit fine-tune: SmolLM2-135M-Instruct on data/demo (carry checkpoints/ and data/demo to run it).
  local ckpt=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
  if [ ! -f "$ckpt/oneday/weights.safetensors" ] || [ ! -f data/demo/train.safetensors ]; then
    echo "REAL: skipped ($ckpt or data/demo not carried)"; return
  fi
  timeout 500 $py finetune/lora.py --checkpoint_dir "$ckpt" --data_dir data/demo --out_dir "$out/real_nf4" \
      --quantize bnb.nf4 --train.max_steps 150 --train.batch_size 16 --train.micro_batch_size 8 \
      --train.save_interval 50 --train.log_interval 25 --train.learning_rate 3e-4 --eval.interval 50 \
      || { echo "REAL FAILED"; status=1; return; }
  $py -c "
import json, torch
v = json.loads(torch.load('$out/real_nf4/state.ckpt', weights_only=True)['state'])['history']['val']
print(f'REAL SmolLM2 NF4 val loss {v[0][1]:.4f} -> {v[-1][1]:.4f}', 'OK' if v[-1][1] < v[0][1] else 'DID NOT LEARN')"
}

peers() {
  # The peers of ../shared/anchors in the same run (slow: builds and saves a random 7B model first).
  if [ ! -f .anchors/anchor_hf_qlora.py ]; then echo "PEERS: skipped (.anchors not carried)"; return; fi
  # transformers+peft+bnb (it also writes the random model Unsloth reads), then Unsloth, then ours again, so every
  # row of the table comes from one machine at one time. About 10 minutes on an H100.
  HF_CONFIGS=2048x1x1,2048x1x0,2048x4x1 timeout 420 $py .anchors/anchor_hf_qlora.py | grep '^{"system' | tee -a "$results"
  for args in "2048 1 false" "2048 1 unsloth" "2048 4 unsloth"; do
    timeout 200 $py .anchors/anchor_unsloth_qlora.py $args | grep '^{"system' | tee -a "$results"
  done
  timeout 200 $py benchmarks/benchmark_finetune.py --model Mistral-7B-v0.1 --seq 2048 --configs 1x1,2x1,4x1,1x0 \
      | grep '^{"system' | tee -a "$results"
  $py benchmarks/benchmark_finetune.py --table "$results"
}

case "$stage" in
  all) bench; smoke; real ;;
  bench) bench ;;
  smoke) smoke ;;
  real) real ;;
  peers) : > "$results"; peers ;;
  *) echo "usage: $0 [all|bench|smoke|real|peers]"; exit 2 ;;
esac
[ $status -eq 0 ] && echo "gpu_check_finetune: OK" || echo "gpu_check_finetune: SOME CHECKS FAILED"
exit $status
