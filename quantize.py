"""4-bit and 8-bit base weights through bitsandbytes: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8.

The model is built on the meta device, its block linears become bitsandbytes layers, and the checkpoint streams in
one tensor at a time, each quantized as soon as it lands on the device: GPU memory stays near the quantized size and
host RAM near one tensor. Everything that is not a block linear (embedding, norms, LM head) keeps the training dtype.
"-dq" also quantizes the per-block scales (QLoRA's double quantization, ~0.4 bit per weight less).
bitsandbytes >= 0.45 runs 4-bit quantize/dequantize/matmul on CPU too, which is how the tests exercise this file.
"""

from typing import Iterable, Literal, Tuple, get_args

import torch
import torch.nn as nn

from cli import InputError
from model import GPT, Config

Mode = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]  # the scripts' --quantize
MODES = get_args(Mode)
BLOCKSIZE = 64  # QLoRA's block size for the 4-bit scales


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"--quantize {mode!r} is not supported; choose one of {list(MODES)}")


def is_quantized_linear(name: str) -> bool:
    """Block linears are quantized; the embedding, norms and LM head are not (as in QLoRA)."""
    return name.startswith("blocks.") and name.rsplit(".", 2)[-2] in ("qkv", "proj", "fc_1", "fc_2")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("--quantize needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from None
    return bnb


def quantized_layer(linear: nn.Linear, mode: str, dtype: torch.dtype) -> nn.Module:
    """An empty (meta) bitsandbytes layer with the shape of `linear`."""
    bnb = _bnb()
    bias = linear.bias is not None
    if mode == "bnb.int8":
        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                   threshold=6.0, device="meta")
    quant_type = mode.split(".")[1].split("-")[0]
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                              compress_statistics=mode.endswith("-dq"), quant_type=quant_type, device="meta")
    # On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks the weight in place for its inference kernel at the first
    # eval-mode forward without grad: training after that (e.g. after a validation) dequantizes the repacked bytes as
    # if they were not (silently wrong losses), and the repacking fails outright on layers narrower than a block.
    # One code path on every CPU: the standard layout.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantized_weight(module: nn.Module, weight: torch.Tensor, device) -> nn.Parameter:
    """Quantizes a full-precision weight for `module` (a layer from quantized_layer) on `device`."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        # Int8Params quantizes when it moves off the CPU; on a CPU-only machine it quantizes on .to("cpu") too.
        param = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        return param.to(device)
    param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE,
                              compress_statistics=module.weight.compress_statistics,
                              quant_type=module.weight.quant_type, module=module)
    return param._quantize(torch.device(device))


def replace_linears(model: GPT, mode: str, dtype: torch.dtype) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_linear(name + ".weight"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, quantized_layer(module, mode, dtype))


def quantize_model(model: GPT, tensors: Iterable[Tuple[str, torch.Tensor]], mode: str, device, dtype: torch.dtype,
                   source: str = "checkpoint") -> GPT:
    """Fills a meta-device model (from `empty_quantized_model`) with `tensors`, quantizing block linears as they
    come (utils.load_model streams a checkpoint through it)."""
    modules = dict(model.named_modules())
    expected = {name for name, _ in model.named_parameters()}
    if model.config.tie_embeddings:
        expected.discard("lm_head.weight")
    seen = set()
    for name, tensor in tensors:
        module_name, _, param_name = name.rpartition(".")
        if name not in expected or module_name not in modules:
            raise InputError(f"{source}: tensor {name!r} does not belong to model {model.config.name!r}; "
                             "is model_config.json from the same conversion?")
        module = modules[module_name]
        current = getattr(module, param_name)
        if tuple(tensor.shape) != tuple(current.shape) and not (param_name == "weight" and is_quantized_linear(name)):
            raise InputError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(current.shape)}; model_config.json does not match the weights")
        tensor = tensor.to(device=device, dtype=dtype)
        if param_name == "weight" and is_quantized_linear(name):
            if tuple(tensor.shape) != (module.out_features, module.in_features):
                raise InputError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{(module.out_features, module.in_features)}; model_config.json does not match the weights")
            module.weight = quantized_weight(module, tensor, device)
        else:
            setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))
        seen.add(name)
        del tensor
    missing = sorted(expected - seen)
    if missing:
        raise InputError(f"{source}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                         "the checkpoint is incomplete, convert it again")
    # RMSNorm/LayerNorm have no buffers; the rest of the model is parameters, all filled now.
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model


def empty_quantized_model(config: Config, mode: str, dtype: torch.dtype) -> GPT:
    check_mode(mode)
    with torch.device("meta"):
        model = GPT(config)
    replace_linears(model, mode, dtype)
    return model


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight that a bitsandbytes layer computes with (fp32 for int8, the compute dtype for 4-bit)."""
    bnb = _bnb()
    import bitsandbytes.functional as BF

    weight = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return BF.dequantize_4bit(weight.data, weight.quant_state)  # never CPU-repacked: see quantized_layer


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding the dequantized weight of a bitsandbytes layer (for merging LoRA into it)."""
    weight = dequantize_weight(module)
    dtype = module.bias.dtype if module.bias is not None else (getattr(module, "compute_dtype", None) or torch.bfloat16)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear


def roundtrip(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """What a weight becomes after quantizing and dequantizing it exactly as utils.load_model does (4-bit modes);
    merge_lora.py applies it so the merged model computes what the adapter was trained against."""
    check_mode(mode)
    if mode == "bnb.int8":
        return weight
    layer = quantized_layer(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"), mode, weight.dtype)
    layer.weight = quantized_weight(layer, weight, weight.device)
    return dequantize_weight(layer).to(weight.dtype)
