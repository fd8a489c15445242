"""The flags of finetune/lora.py, in groups: `--lora.r 16`, `--train.learning_rate 2e-4`, `--speed.fp8 all`,
`--eval.interval 100` (jsonargparse makes a flag of every field, with its docstring as help). A YAML file of the same
shape goes to --config; finetune/configs/ holds some, and every run writes its own as out_dir/train_config.yaml.
"""

import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from jsonargparse.typing import (ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                                 restricted_number_type)

from cli import InputError

Dropout = restricted_number_type("Dropout", float, [(">=", 0), ("<", 1)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<", 2**32)])  # Lightning replaces any other seed by 0


@dataclass
class LoRAArgs:
    r: PositiveInt = 16
    """LoRA rank."""
    alpha: PositiveFloat = 32.0
    """the update is scaled by alpha / r."""
    dropout: Dropout = 0.0
    """dropout on the LoRA branch input. 0 lets every adapted layer run as one fused LoRA matmul (--speed.fused)."""
    targets: str = "all"
    """presets all | attn | mlp | qv, or a comma list of q,k,v,o,gate,up,down,head."""


@dataclass
class TrainArgs:
    learning_rate: PositiveFloat = 2e-4
    """peak learning rate after warm-up."""
    min_lr_ratio: ClosedUnitInterval = 0.0
    """the cosine decays to learning_rate * min_lr_ratio."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_steps: Optional[NonNegativeInt] = None
    """linear warm-up steps; default warmup_ratio of all steps."""
    warmup_ratio: ClosedUnitInterval = 0.03
    """warm-up as a fraction of all steps when warmup_steps is not given."""
    grad_clip: Optional[PositiveFloat] = 1.0
    """clip the global gradient norm to this; null disables."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    """adamw (torch, fused on GPU) or bitsandbytes adamw8bit / paged_adamw / paged_adamw8bit."""
    batch_size: PositiveInt = 16
    """sequences (packed rows) per optimizer step, over all devices."""
    micro_batch_size: PositiveInt = 1
    """sequences per forward/backward pass on one device; the rest of batch_size is gradient accumulation.
    --memory_budget chooses it (unless given at another value than 1)."""
    epochs: PositiveInt = 1
    """passes over the training data (when max_steps is not given)."""
    max_steps: Optional[PositiveInt] = None
    """optimizer steps to train for; overrides epochs."""
    max_seq_length: Optional[PositiveInt] = None
    """longest sequence (packed row length); default the data's. Longer samples are truncated."""
    packing: bool = True
    """pack several samples into each row (attention never crosses samples); false pads length-bucketed batches."""
    neftune_alpha: NonNegativeFloat = 0.0
    """NEFTune noise on the embeddings during training (5 is the paper's value); 0 disables."""
    save_interval: PositiveInt = 100
    """write an adapter and the resumable state every this many steps."""
    log_interval: PositiveInt = 1
    """print a progress line every this many steps."""


@dataclass
class SpeedArgs:
    fused: bool = True
    """fast.speed_up: fused LoRA matmuls and, on a GPU, compiled RMSNorm/RoPE/SwiGLU kernels; false: the plain path."""
    fp8: Optional[Literal["grad", "all"]] = None
    """frozen base matmuls on FP8 tensor cores (compute capability 8.9+): "grad" the backward pass's input-gradient
    matmuls only, "all" the forward ones too. Needs fused and lora.dropout 0."""
    recompute_inputs: bool = True
    """the fused LoRA matmuls recompute the norm outputs and SwiGLU products they read in the backward pass; false
    keeps them: faster where memory allows. --memory_budget chooses it (unless given false)."""
    activation_checkpointing: Union[bool, NonNegativeInt] = False
    """recompute each block in the backward pass (less memory, more compute): true (or 1) every block, N >= 2 the
    first N blocks only (spend the memory left over on speed). --memory_budget chooses it (unless given)."""
    offload_checkpoints: bool = False
    """with activation checkpointing, the checkpointed blocks' inputs wait in pinned host memory instead of on the
    GPU; the copies overlap compute. What lets a 13B train on a small GPU. --memory_budget chooses it (unless given
    true)."""
    cuda_graph: bool = False
    """capture one micro-batch's forward and backward as a CUDA graph and replay it (GPU, packed rows, one device):
    no kernel-launch overhead at small micro-batches."""
    compile: bool = False
    """torch.compile each block (GPU)."""


@dataclass
class EvalArgs:
    interval: PositiveInt = 100
    """validate every this many steps (and at the start and the end)."""
    samples: Optional[PositiveInt] = 1000
    """validate on at most this many validation samples; null means all."""
    sample_tokens: NonNegativeInt = 64
    """at each validation, greedily generate this many tokens for the first validation prompt (0: never)."""


def check_flags(lora: LoRAArgs, train: TrainArgs, speed: SpeedArgs, devices: int, on_gpu: bool,
                quantize: Optional[str], planned: bool = False) -> None:
    """Flag combinations that cannot work: one line each, before anything is loaded. planned: --memory_budget
    chooses the memory flags (finetune/plan.py), and --speed.offload_checkpoints alone says to offload what it
    checkpoints."""
    if (quantize or train.optimizer != "adamw") and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"--quantize {quantize} --train.optimizer {train.optimizer}: needs bitsandbytes; "
                         "pip install 'bitsandbytes>=0.45'")
    if speed.cuda_graph and (not train.packing or devices != 1):
        raise InputError("--speed.cuda_graph true needs fixed shapes and one device: use --train.packing true "
                         "--devices 1")
    if speed.cuda_graph and not on_gpu:
        raise InputError("--speed.cuda_graph true needs a CUDA GPU; drop it to train on the CPU")
    if speed.cuda_graph and lora.dropout > 0 and speed.activation_checkpointing:
        raise InputError("--speed.cuda_graph true with --lora.dropout > 0 and activation checkpointing is not "
                         "supported (the recomputed dropout masks would need the RNG state inside the graph); set one "
                         "of them off")
    if speed.offload_checkpoints and not speed.activation_checkpointing and not planned:
        raise InputError("--speed.offload_checkpoints true offloads checkpointed blocks' inputs: add "
                         "--speed.activation_checkpointing")
    if speed.offload_checkpoints and speed.compile:
        raise InputError("--speed.offload_checkpoints true with --speed.compile true is not supported (the copies' "
                         "streams would be traced into the compiled blocks); set one of them off")
    if speed.fp8 and not (speed.fused and lora.dropout == 0):
        raise InputError(f"--speed.fp8 {speed.fp8} runs inside the fused LoRA matmul: set --speed.fused true and "
                         "--lora.dropout 0")
    if not speed.recompute_inputs and not (speed.fused and lora.dropout == 0):
        raise InputError("--speed.recompute_inputs false applies to the fused LoRA matmul: set --speed.fused true "
                         "and --lora.dropout 0, or drop it")
    if speed.fp8 and on_gpu:
        from fast import fp8

        problem = fp8.device_problem(torch.device("cuda"))
        if problem:
            raise InputError(f"--speed.fp8 {speed.fp8}: {problem}")
