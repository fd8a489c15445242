"""How far FP8 base matmuls move a real model's loss and LoRA gradients, on the CPU (no GPU needed): one
forward/backward pass of a checkpoint on a batch of prepared training data, in fp32 (the reference), in bf16 (the
normal training path) and with finetune/lora.py's --speed.fp8 grad and --speed.fp8 all, all from the same LoRA initialisation.
One JSON line per run: loss, and the relative error of each LoRA gradient against fp32 (mean and worst).

    python benchmarks/fp8_accuracy.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/e2e

The base weights are loaded unquantized (the CPU's 4-bit path is slow); on a 4-bit base the FP8 decode gives the
same float8 values as rounding the dequantized weight (tests/test_fp8.py), so the comparison carries over.
"""

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fast  # noqa: E402
from data import load_split  # noqa: E402
from fast import fp8  # noqa: E402
from fast.fused import FusedLoRALinear, base_weight  # noqa: E402
from lora import LoRAConfig, inject_lora  # noqa: E402
from utils import load_model  # noqa: E402


def e4m3(t: torch.Tensor, block: int = 0) -> torch.Tensor:
    """t (M, K) rounded through float8 e4m3 (fp8.cast_rows) and back to fp32: one scale per row, or per `block`
    elements of a row."""
    rows = t.reshape(-1, block) if block else t
    t8, scale = fp8.cast_rows(rows)
    return (t8.float() * scale).reshape(t.shape)


def emulated(round_weights: bool, activation_block):
    """A context in which fp8.linear / fp8.input_grad are fp32 emulations (an experiment, patched for its runs only):
    weights rounded to e4m3 per tensor (as the kernels do) or left exact; activations and output gradients rounded
    per row (block 0), per `activation_block` elements, or left exact (None). What would a finer scale, or exact
    weights, change?"""
    def weight(base):
        if not round_weights:
            return base_weight(base, torch.float32)
        w8, scale = fp8.cast_weight(base_weight(base, torch.float32), transpose=False)
        return w8.float() * scale

    def act(t):
        return t.float() if activation_block is None else e4m3(t, activation_block)

    def linear(x2, base, kernels=None):
        y = act(x2) @ weight(base).t()
        return (y if base.bias is None else y + base.bias.float()).to(x2.dtype)

    def input_grad(dy2, base, kernels=None):
        return (act(dy2) @ weight(base)).to(dy2.dtype)

    return mock.patch.multiple(fp8, linear=linear, input_grad=input_grad)


def lora_grads(checkpoint_dir: Path, dtype: torch.dtype, fp8_mode, idx, targets, seed: int, keep=(), device="cpu",
               quantize=None, kernels: bool = False):
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.01)  # B = 0 at init would leave A without a gradient
    fast.speed_up(model, fp8=fp8_mode, kernels=kernels)
    for name, module in model.named_modules():
        if isinstance(module, FusedLoRALinear) and fp8_mode == "all" and name.split(".", 2)[-1] in keep:
            module.fp8_matmuls = "grad"  # this layer's forward pass stays bf16
    logits = model(idx.to(device))
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def main(checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
         data_dir: Path = Path("data/e2e"), rows: int = 2, seq: int = 512, seed: int = 1338,
         keep_forward_bf16: str = "", emulate_rounding: Optional[str] = None, device: str = "cpu",
         quantize: Optional[str] = None, kernels: str = "triton") -> None:
    """Args:
        checkpoint_dir: a converted checkpoint.
        data_dir: prepared data (its train split's first rows x seq tokens are the batch).
        rows: rows in the batch.
        seq: tokens per row.
        seed: LoRA initialisation seed.
        keep_forward_bf16: comma list of a block's linears (attn.qkv, attn.proj, mlp.fc_1, mlp.fc_2, mlp.proj) whose
            forward pass stays bf16 in the fp8="all" run, to find which layers move the output (then only that run
            and the fp32 reference run).
        emulate_rounding: instead of the real FP8 matmuls, emulate them in fp32 for the fp8="all" run (then only that
            run and the fp32 reference run): "weights" rounds only the weights, "activations" only the activations
            (per row), "blocks" both with one activation scale per 64 elements of a row instead of per row.
        device: "cpu" or "cuda" (where torch._scaled_mm runs on the FP8 tensor cores).
        quantize: e.g. "bnb.nf4": a 4-bit base as finetune/lora.py --quantize makes it (the fp32 reference then
            computes with the dequantized weights), so the FP8 decode of the 4-bit blocks is what runs.
        kernels: on a GPU, "triton" (fast.speed_up's compiled and Triton kernels, what finetune/lora.py runs) or
            "plain" (the PyTorch reference kernels): the two must give the same loss.
    """
    choices = {"weights": (True, None), "activations": (False, 0), "blocks": (True, 64)}
    if emulate_rounding is not None and emulate_rounding not in choices:
        raise SystemExit(f"--emulate_rounding {emulate_rounding}: use one of {sorted(choices)}")
    keep = tuple(k for k in keep_forward_bf16.split(",") if k)
    if kernels not in ("triton", "plain"):
        raise SystemExit(f"--kernels {kernels}: use triton or plain")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    split = load_split(data_dir / "train.safetensors")
    n = rows * (seq + 1)
    tokens = split.tokens[:n].long().view(rows, seq + 1)
    targets = tokens[:, 1:].clone()
    targets[~split.loss_mask[:n].view(rows, seq + 1)[:, 1:].bool()] = -100  # prompt tokens carry no loss
    all_label = "bf16 + fp8 all" + (f" (forward bf16: {keep_forward_bf16})" if keep else "") + (
        f" (emulated, rounding: {emulate_rounding})" if emulate_rounding else "")
    runs = [("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
            ("bf16 + fp8 grad", torch.bfloat16, "grad"), (all_label, torch.bfloat16, "all")]
    if keep or emulate_rounding:  # only the reference and the variant
        runs = [runs[0], runs[-1]]
    reference = None
    for label, dtype, mode in runs:
        with emulated(*choices[emulate_rounding]) if emulate_rounding and mode else contextlib.nullcontext():
            loss, grads = lora_grads(checkpoint_dir, dtype, mode, tokens[:, :-1], targets, seed, keep, device,
                                     quantize, kernels=device != "cpu" and kernels == "triton")
        reference = reference or grads
        errs = [((grads[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference]
        print(json.dumps({"run": label, "loss": round(loss, 4),
                          "lora_grad_rel_err_vs_fp32_mean": round(sum(errs) / len(errs), 3),
                          "worst": round(max(errs), 3), "checkpoint": checkpoint_dir.name, "tokens": rows * seq,
                          "device": device, "quantize": quantize, "kernels": kernels if device != "cpu" else "plain"}),
              flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
