"""The training speed layer, switched on by one call on a model: `fast.speed_up(model)`.

model.py and lora.py are the plain reference. After `lora.inject_lora`, speed_up converts the model in place: each
LoRALinear, MLP, RMSNorm, attention and Block becomes its subclass in fast/fused.py, which computes the same thing in
fewer kernels and keeps less for the backward pass. Parameters, their names and the state_dict stay the same, so
adapters save and load as before. A model that never calls speed_up runs the plain path, and two models in one
process can run different paths: every setting lives on the model's own modules.

- fast/fused.py: the fused LoRA autograd functions and the fast modules;
- fast/attention.py: packed rows' document mask as a FlexAttention BlockMask (made by packed_mask below);
- fast/fp8.py: FP8 base matmuls (fp8="grad" or "all");
- fast/kernels.py: Triton kernels for the gated MLP, used on a GPU once checked against the plain math;
- fast/memory.py: activation checkpointing, host offload and CUDA graphs. speed_up comes first: checkpointing wraps
  each block's forward as it is when checkpointing is switched on.
"""

from typing import Literal, Optional

import torch

from fast import attention, fused
from model import CausalSelfAttention, document_mask

FP8 = Literal["grad", "all"]


def speed_up(model, fp8: Optional[FP8] = None, recompute_inputs: bool = True, fused_mlp: bool = True,
             kernels: Optional[bool] = None):
    """Converts `model` to the fast path in place and returns it; calling it again changes the settings.

    fp8: run the frozen base weights' matmuls on FP8 tensor cores: "grad" the input-gradient matmul of the backward
        pass only, "all" the forward ones too (fast/fp8.py); per layer, where its shape allows.
    recompute_inputs: the fused matmuls recompute the RMSNorm outputs and SwiGLU products they read in the backward
        pass instead of keeping them (less memory, a few more elementwise kernels).
    fused_mlp: a gated MLP with adapters on gate, up and down runs as one (fast.fused.lora_gated_mlp); False runs it
        as three fused LoRA matmuls.
    kernels: torch.compile'd RMSNorm, RoPE and SwiGLU, and on a GPU the Triton kernels (each checked against its
        plain version before use) and compiled FlexAttention for packed rows; default: on when the model's
        parameters are on a CUDA GPU.
    """
    if fp8 not in (None, "grad", "all"):
        raise ValueError(f"fp8={fp8!r}: use None, 'grad' or 'all'")
    on_gpu = next(model.parameters()).device.type == "cuda"
    lora_config = getattr(model, "lora_config", None)
    c = getattr(model, "config", None)  # None: a single layer sped up alone
    chosen = fused.choose_kernels(on_gpu if kernels is None else kernels, on_gpu,
                                  rank=lora_config.r if lora_config else 16, fp8_on=fp8 is not None,
                                  attention_shape=c and (c.n_head, c.n_query_groups, c.head_size, c.sliding_window))
    return fused.convert(model, chosen, fp8, recompute_inputs, fused_mlp)


def packs_with_flex(model) -> bool:
    """Whether `model` (a GPT, also inside Fabric's wrapper) takes packed rows through FlexAttention: speed_up gave it
    compiled FlexAttention that passed its check on this GPU."""
    attn = next(m for m in model.modules() if isinstance(m, CausalSelfAttention))
    return isinstance(attn, fused.FastAttention) and attn.kernels.flex_attention is not None


def packed_mask(model, segments: torch.Tensor):
    """The attention mask of packed rows with these segment ids (B, T) (data.collate) for `model`, made once per
    micro-batch for all its layers (GPT.hidden_states(mask=...)): a FlexAttention BlockMask where packs_with_flex,
    else model.document_mask's dense mask (the reference)."""
    window = next(m for m in model.modules() if isinstance(m, CausalSelfAttention)).config.sliding_window
    return (attention.document_block_mask if packs_with_flex(model) else document_mask)(segments, window)
