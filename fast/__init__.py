"""The fast path: one call turns a plain model (after lora.inject_lora) into the fused one.

INTERIM: this first version still works through the old class-wide switches; it is being rewritten.
"""

from typing import Literal, Optional

import torch

FP8 = Literal["grad", "all"]


def speed_up(model, fp8: Optional[FP8] = None, recompute_inputs: bool = True, fused_mlp: bool = True,
             kernels: Optional[bool] = None):
    """Switches `model` to the fast path in place and returns it. kernels (compiled elementwise ops and the Triton
    kernels) default to on when the model is on a CUDA GPU."""
    import fp8 as fp8_module
    import lora
    import model as model_module

    on_gpu = next(model.parameters()).device.type == "cuda"
    kernels = on_gpu if kernels is None else kernels
    lora.LoRALinear.fused_matmul = True
    lora.LoRALinear.fp8_matmul = fp8
    lora.LoRALinear.recompute_inputs = recompute_inputs
    lora.LoRALinear.fused_mlp = fused_mlp
    if kernels:
        model_module.compile_elementwise()
        lora.compile_kernels(rank=model.lora_config.r)
        if fp8:
            fp8_module.compile_kernels()
    return model
