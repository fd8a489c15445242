"""LoRA / QLoRA fine-tuning on prepared data, inside a time budget, on one GPU (or several through Fabric's DDP).

    python finetune/lora.py --checkpoint_dir mistral-7b --data_dir data/mix --quantize bnb.nf4-dq
    python finetune/lora.py --data_dir data/demo --max_steps 60          # SmolLM2-135M, CPU, a few minutes

Reads `train.safetensors` / `val.safetensors` (tokens, loss_mask, offsets; see prepare_data/) and writes to out_dir:
`adapter.safetensors` (latest), `adapter_best.safetensors` (best validation loss), `adapters/step-*.safetensors`,
`state.ckpt` (everything --resume needs), `train_config.json`, `prompt_style.json`, `logs/` (CSV, TensorBoard when
installed), `loss.png` and `status.json` (running, stopped or finished). Every file is written to a temporary name and
renamed, so a run killed at any moment loses at most the steps since its last checkpoint. Exit status: 0 finished,
75 stopped by --max_time, a signal or a loss that is no longer finite (status.json says why; continue with --resume
true), 2 a bad input (one line, nothing written).
"""

import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from jsonargparse.typing import (ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                                 restricted_number_type)
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import InputError  # noqa: E402
import fp8 as fp8_module  # noqa: E402  (setup's --fp8 flag takes the plain name)
from lora import compile_kernels as compile_lora_kernels  # noqa: E402
from lora import (LoRAConfig, LoRALinear, check_adapter_fits, inject_lora, lora_modules, lora_state_dict,  # noqa: E402
                  read_adapter, save_adapter)
import model as model_module  # noqa: E402
from model import GPT, Config, document_mask, segment_positions  # noqa: E402
from quantize import Mode as QuantizeMode  # noqa: E402
from utils import checkpoint_files, load_config, load_model, resolve_checkpoint_dir  # noqa: E402


def process_start() -> float:
    """time.monotonic() when this process began (Linux: /proc/self/stat's starttime against /proc/uptime); elsewhere
    now less the CPU time spent so far, which is mostly the imports before this line."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, after "(name)"
        age = float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = -1.0
    return time.monotonic() - (age if age >= 0 else time.process_time())  # < 0: a container's own uptime (lxcfs)


START = process_start()  # the time budget counts from process start: imports and loading the model are part of the day
IGNORE = -100
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early (status.json says why); continue with --resume true
Dropout = restricted_number_type("Dropout", float, [(">=", 0), ("<", 1)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<", 2**32)])  # Lightning replaces any other seed by 0


def setup(
    checkpoint_dir: str = "smollm2-135m",
    data_dir: Path = Path("data/demo"),
    out_dir: Optional[Path] = None,
    quantize: Optional[QuantizeMode] = None,
    precision: Optional[Literal["bf16-true", "32-true"]] = None,
    devices: PositiveInt = 1,
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    strategy: str = "auto",
    lora_r: PositiveInt = 16,
    lora_alpha: PositiveFloat = 32.0,
    lora_dropout: Dropout = 0.0,
    lora_targets: str = "all",
    learning_rate: PositiveFloat = 2e-4,
    min_lr_ratio: ClosedUnitInterval = 0.0,
    weight_decay: NonNegativeFloat = 0.0,
    warmup_steps: Optional[NonNegativeInt] = None,
    warmup_ratio: ClosedUnitInterval = 0.03,
    grad_clip: Optional[PositiveFloat] = 1.0,
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw",
    batch_size: PositiveInt = 16,
    micro_batch_size: PositiveInt = 1,
    epochs: PositiveInt = 1,
    max_steps: Optional[PositiveInt] = None,
    max_seq_length: Optional[PositiveInt] = None,
    packing: bool = True,
    activation_checkpointing: Union[bool, NonNegativeInt] = False,
    offload_checkpoints: bool = False,
    neftune_alpha: NonNegativeFloat = 0.0,
    fused: bool = True,
    fp8: Optional[Literal["grad", "all"]] = None,
    recompute_inputs: bool = True,
    cuda_graph: bool = False,
    compile: bool = False,
    eval_interval: PositiveInt = 100,
    eval_samples: Optional[PositiveInt] = 1000,
    sample_tokens: NonNegativeInt = 64,
    save_interval: PositiveInt = 100,
    log_interval: PositiveInt = 1,
    max_time: Optional[str] = "23:30:00",
    resume: bool = False,
    seed: Seed = 1337,
) -> None:
    """Fine-tune a base model with LoRA (QLoRA with --quantize).

    Args:
        checkpoint_dir: converted base checkpoint folder or a registered name (smollm2-135m, mistral-7b, ...).
        data_dir: prepared data folder with train.safetensors, val.safetensors and prompt_style.json. An empty
            val.safetensors (a recipe's val_size 0) trains without validation.
        out_dir: where adapters, state and logs go; default out/lora/<checkpoint>-<data>.
        quantize: 4-bit/8-bit base weights through bitsandbytes (QLoRA): bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.int8.
        precision: base weights and compute dtype; default bf16-true on a GPU, 32-true on CPU. LoRA weights and
            optimizer states are always fp32.
        devices: number of devices (GPUs, or CPU processes with --accelerator cpu).
        accelerator: cuda, cpu or auto.
        strategy: Fabric strategy: auto, ddp, ...
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA branch input. 0 (the default) lets every adapted layer run as one fused
            LoRA matmul (lora.LoRAMatmul); above 0 the slower generic path runs.
        lora_targets: presets all | attn | mlp | qv, or a comma list of q,k,v,o,gate,up,down,head.
        learning_rate: peak learning rate after warm-up.
        min_lr_ratio: the cosine decays to learning_rate * min_lr_ratio.
        weight_decay: AdamW weight decay on the LoRA weights.
        warmup_steps: linear warm-up steps; default warmup_ratio of all steps.
        warmup_ratio: warm-up as a fraction of all steps when warmup_steps is not given.
        grad_clip: clip the global gradient norm to this; null disables.
        optimizer: adamw (torch, fused on GPU) or bitsandbytes adamw8bit / paged_adamw / paged_adamw8bit.
        batch_size: sequences (packed rows) per optimizer step, over all devices.
        micro_batch_size: sequences per forward/backward pass on one device; batch_size / (micro_batch_size * devices)
            is the number of gradient accumulation steps.
        epochs: passes over the training data (when max_steps is not given).
        max_steps: optimizer steps to train for; overrides epochs.
        max_seq_length: longest sequence (packed row length); default the data's max_seq_length. Longer samples are
            truncated; it must not exceed the model's context.
        packing: pack several samples into each row (attention never crosses samples); false pads length-bucketed
            batches instead.
        activation_checkpointing: recompute each block in the backward pass: much less memory, ~30% more compute.
            true (or 1): every block; a number N >= 2: the first N blocks only (spend the memory left over on speed).
        offload_checkpoints: with activation checkpointing, the checkpointed blocks' inputs wait in pinned host memory
            instead of on the GPU (0.5 GiB less for a 7B at 2,048 tokens per micro-batch, 0.8 GiB for a 13B; the
            copies overlap compute). What lets a 13B train in 8 GiB.
        neftune_alpha: NEFTune noise on the embeddings during training (5 is the paper's value); 0 disables.
        fused: the fused LoRA matmuls (lora.LoRAMatmul, lora.lora_gated_mlp) and, on a GPU, RMSNorm, RoPE and SwiGLU
            compiled into fused kernels (model.compile_elementwise, lora.compile_kernels); false runs the plain
            reference path.
        fp8: run frozen base weights' matmuls on FP8 tensor cores (fp8.py; needs --fused, no LoRA dropout and a GPU
            of compute capability 8.9+ such as an H100 or RTX 4090): "grad" the backward pass's input-gradient matmuls
            only (the forward pass is untouched), "all" the forward ones too (the fastest: see the README's speed
            table; its training loss starts a little higher, and on SmolLM2 its validation curve matched bf16's).
        recompute_inputs: the fused LoRA matmuls recompute the RMSNorm outputs and SwiGLU products they read in the
            backward pass; false keeps them instead: 3% faster on an H100 with --fp8 all when memory allows (for
            Mistral-7B 1.35 GiB more per 1,000 tokens of a micro-batch, in the blocks without activation
            checkpointing). Needs --fused true and --lora_dropout 0.
        cuda_graph: on a GPU, capture one micro-batch's forward and backward as a CUDA graph and replay it (packed
            rows only; one device): removes the kernel-launch overhead that dominates small micro-batches.
        compile: torch.compile each block (GPU).
        eval_interval: validate every this many steps (and at the start and the end).
        eval_samples: validate on at most this many validation samples; null means all.
        sample_tokens: at each validation, greedily generate this many tokens for the first validation prompt (0: never).
        save_interval: write an adapter and the resumable state every this many steps.
        log_interval: print a progress line every this many steps.
        max_time: wall-clock budget as [DD:]HH:MM:SS or seconds, counted from process start; the run stops and saves
            before it runs out, and exits with status 75 (status.json says "stopped"). null: no budget.
        resume: continue the run in out_dir from its last state (optimizer, scheduler, RNG and data position).
        seed: random seed (LoRA init, data order, dropout).
    """
    from lightning import Fabric

    try:
        checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
        checkpoint_files(checkpoint_dir)  # the weights are read after launch: find a folder without them now
    except InputError as e:
        raise InputError(f"--checkpoint_dir {e}") from None
    data_dir = Path(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path("out/lora") / f"{checkpoint_dir.name}-{data_dir.name}"
    config = load_config(checkpoint_dir)
    if precision is None:
        precision = "bf16-true" if torch.cuda.is_available() and accelerator != "cpu" else "32-true"
    # Plain JSON values (Path -> str, jsonargparse's PositiveInt & co. -> int, float): state.ckpt loads without them.
    args = json.loads(json.dumps({k: v for k, v in locals().items() if k not in ("Fabric", "config")}, default=str))

    # Everything that can be wrong with the inputs is found here, before a GPU second is spent or out_dir is touched.
    try:
        lora = LoRAConfig(r=args["lora_r"], alpha=args["lora_alpha"], dropout=args["lora_dropout"],
                          targets=lora_targets)
    except ValueError as e:
        raise InputError(f"--lora_targets {lora_targets}: {e}") from None
    parent = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # out_dir or the folder it will be made in
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise InputError(f"--out_dir {out_dir}: {parent} is {'not writable' if parent.is_dir() else 'a file'}; "
                         "choose another --out_dir")
    if not (data_dir.is_dir() and os.access(data_dir, os.R_OK | os.X_OK)):
        raise InputError(f"--data_dir {data_dir}: {'not readable' if data_dir.is_dir() else 'no such folder'}; "
                         "prepare the data with prepare_data/ (see README)")
    if (quantize or optimizer != "adamw") and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"--quantize {quantize} --optimizer {optimizer}: needs bitsandbytes; "
                         "pip install 'bitsandbytes>=0.45'")
    if cuda_graph and (not packing or devices != 1):
        raise InputError("--cuda_graph true needs fixed shapes and one device: use --packing true --devices 1")
    if cuda_graph and not (torch.cuda.is_available() and accelerator != "cpu"):
        raise InputError("--cuda_graph true needs a CUDA GPU; drop it to train on the CPU")
    if cuda_graph and lora_dropout > 0 and activation_checkpointing:
        raise InputError("--cuda_graph true with --lora_dropout > 0 and activation checkpointing is not supported "
                         "(the recomputed dropout masks would need the RNG state inside the graph); set one of them off")
    if offload_checkpoints and not activation_checkpointing:
        raise InputError("--offload_checkpoints true offloads checkpointed blocks' inputs: "
                         "add --activation_checkpointing")
    if offload_checkpoints and compile:
        raise InputError("--offload_checkpoints true with --compile true is not supported (the copies' streams would "
                         "be traced into the compiled blocks); set one of them off")
    if fp8 and not (fused and lora_dropout == 0):
        raise InputError(f"--fp8 {fp8} runs inside the fused LoRA matmul: set --fused true and --lora_dropout 0")
    if not recompute_inputs and not (fused and lora_dropout == 0):
        raise InputError("--recompute_inputs false applies to the fused LoRA matmul: set --fused true and "
                         "--lora_dropout 0, or drop it")
    if fp8 and torch.cuda.is_available() and accelerator != "cpu":
        problem = fp8_module.device_problem(torch.device("cuda"))
        if problem:
            raise InputError(f"--fp8 {fp8}: {problem}")
    train_data = load_split(data_dir / "train.safetensors")
    val_data = load_split(data_dir / "val.safetensors")
    meta = read_meta(data_dir)
    if (data_dir / "prompt_style.json").is_file():  # copied next to the adapter, where generate/lora.py reads it
        from prompts import load_style

        load_style(data_dir)
    if max_seq_length is None:
        max_seq_length = min(meta.get("max_seq_length") or max([2, *train_data.lengths().tolist()]), config.block_size)
    if max_seq_length > config.block_size:
        raise InputError(f"--max_seq_length {max_seq_length} exceeds the context of {config.name} "
                         f"({config.block_size} tokens, {checkpoint_dir}/model_config.json); use at most that")
    check_tokenizer(data_dir, meta, checkpoint_dir, config, train_data, val_data)
    train_examples = make_examples(train_data, max_seq_length)
    if not train_examples.n:
        raise InputError(f"{data_dir}/train.safetensors: no sample with a target token in its first {max_seq_length} "
                         "tokens (an empty split, loss_mask all 0, or prompts longer than --max_seq_length); prepare "
                         "the data again with rows that have responses")
    val_examples = make_examples(val_data, max_seq_length, limit=eval_samples)
    args["effective_max_seq_length"] = max_seq_length
    if batch_size % (micro_batch_size * devices):
        raise InputError(f"--batch_size {batch_size} is not a multiple of --micro_batch_size {micro_batch_size} x "
                         f"{devices} devices; change one of them")
    budget = parse_time(max_time) if max_time else None
    state_path = out_dir / "state.ckpt"
    if resume:
        if not state_path.is_file():
            raise InputError(f"{state_path}: nothing to resume; run without --resume to start this out_dir")
        check_resumable(out_dir, args, config)
    elif state_path.is_file():
        raise InputError(f"{out_dir} already holds a run; pass --resume true to continue it "
                         "or choose another --out_dir")

    try:
        fabric = Fabric(devices=devices, accelerator=accelerator, strategy=strategy, precision="32-true",
                        loggers=make_loggers(out_dir))
    except (ValueError, RuntimeError, ImportError) as e:  # Lightning's word on these flags
        raise InputError(f"--accelerator {accelerator} --devices {devices} --strategy {strategy}: {e}") from None
    # LoRA weights are fp32 on purpose and the base is cast by us, so Fabric itself casts nothing ("32-true").
    # Run as a script, the budget counts from process start (imports and start-up are part of the day); called from
    # Python (a notebook, the tests), from this call.
    deadline = (START if __name__ == "__main__" else time.monotonic()) + budget if budget is not None else None
    return fabric.launch(main, args, config, lora, train_examples, val_examples, max_seq_length, deadline)


def main(fabric, args: dict, config: Config, lora: LoRAConfig, train_examples: "Examples", val_examples: "Examples",
         max_seq_length: int, deadline: Optional[float]) -> str:
    """Trains until the end, the deadline (time.monotonic()), a signal or a non-finite loss; returns "finished" or
    "stopped" (status.json says which and why)."""
    a = argparse_namespace(args)
    out_dir, checkpoint_dir, data_dir = Path(a.out_dir), Path(a.checkpoint_dir), Path(a.data_dir)
    dtype = torch.bfloat16 if a.precision == "bf16-true" else torch.float32
    fabric.seed_everything(a.seed)  # the same LoRA init on every rank

    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=fabric.device, dtype=dtype, quantize=a.quantize)
    inject_lora(model, lora)
    fabric.print(f"Loaded {checkpoint_dir} ({a.quantize or a.precision}) in {time.perf_counter() - t0:.1f}s; "
                 f"LoRA {lora.targets} r={lora.r}: {sum(p.numel() for p in lora_state_dict(model).values()):,} trainable "
                 f"parameters")
    gpt = model
    on_gpu = fabric.device.type == "cuda"
    if a.activation_checkpointing:
        n = None if a.activation_checkpointing in (True, 1) else int(a.activation_checkpointing)  # "1" reads as true
        enable_activation_checkpointing(gpt, n, preserve_rng_state=lora.dropout > 0, offload=a.offload_checkpoints)
    LoRALinear.fused_matmul = a.fused
    if a.fused and on_gpu:
        model_module.compile_elementwise()
        compile_lora_kernels(rank=lora.r)
    LoRALinear.fp8_matmul = a.fp8
    LoRALinear.recompute_inputs = a.recompute_inputs
    if a.fp8:
        layers = lora_modules(gpt).values()
        fabric.print(f"FP8 base matmuls ({a.fp8}) in {sum(m.fp8_mode is not None for m in layers)} of {len(layers)} "
                     "LoRA layers")
        if on_gpu:
            fp8_module.compile_kernels()
    if a.neftune_alpha > 0:
        gpt.wte.register_forward_hook(partial(neftune_hook, alpha=a.neftune_alpha))
    if a.compile:
        for block in gpt.blocks:
            block.compile()

    trainable = [p for p in gpt.parameters() if p.requires_grad]
    optimizer = make_optimizer(a.optimizer, trainable, a.learning_rate, a.weight_decay, fabric.device)
    model = fabric.setup_module(gpt)
    model.mark_forward_method("hidden_states")
    optimizer = fabric.setup_optimizers(optimizer)

    world, rank = fabric.world_size, fabric.global_rank
    micro_per_step = a.batch_size // a.micro_batch_size  # over all devices
    rows = pack(train_examples.lengths.tolist(), max_seq_length) if a.packing else None
    n_micro = len(epoch_batches(train_examples, rows, a.micro_batch_size, a.seed, 0))
    steps_per_epoch = math.ceil(n_micro / micro_per_step)
    total_steps = a.max_steps or a.epochs * steps_per_epoch
    warmup = a.warmup_steps if a.warmup_steps is not None else round(a.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, warmup=warmup, total=total_steps,
                                                                     min_ratio=a.min_lr_ratio))
    truncated = int((train_examples.split.lengths() - 1 > max_seq_length).sum())
    fabric.print(f"{train_examples.n:,} training samples ({truncated} truncated to {max_seq_length} tokens), "
                 f"{'packed into ' + str(len(rows)) + ' rows, ' if rows else ''}{steps_per_epoch} steps per epoch; "
                 f"training {total_steps} steps of {a.batch_size} x {max_seq_length if rows else '<=' + str(max_seq_length)}"
                 f" tokens ({micro_per_step // world} micro-batches of {a.micro_batch_size} per device and step)")
    if not val_examples.n:
        fabric.print(f"{data_dir}/val.safetensors has no sample with a target token in its first {max_seq_length} "
                     "tokens: training without validation (no val loss, no adapter_best.safetensors)")

    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val": float("inf"), "history": {"train": [], "val": []},
             "tokens": 0}
    if a.resume:
        state = load_training_state(fabric, out_dir / "state.ckpt", gpt, optimizer, scheduler, state, args)
        fabric.print(f"Resumed {out_dir} at step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} "
                     "of it)")
    else:
        torch.manual_seed(a.seed + rank)  # dropout/NEFTune noise differs per rank; LoRA init above did not
    if rank == 0:  # only now: a run that refused to start leaves nothing behind
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(args, indent=2) + "\n")
        if (data_dir / "prompt_style.json").is_file():
            shutil.copy(data_dir / "prompt_style.json", out_dir / "prompt_style.json")
        write_status(out_dir, "running", state["step"], total_steps)
    stopper = Stopper(deadline, a.max_time)

    if state["step"] == 0 and not a.resume:
        validate_and_log(fabric, model, gpt, val_examples, a, state, checkpoint_dir)
    model.train()  # load_model returns eval mode: without this LoRA dropout and NEFTune would silently be off
    step_times: List[float] = []
    graphed = None  # the captured micro-step (--cuda_graph), made at the first step
    while state["step"] < total_steps:
        batches = epoch_batches(train_examples, rows, a.micro_batch_size, a.seed, state["epoch"])
        n_steps = math.ceil(len(batches) / micro_per_step)
        while state["step_in_epoch"] < n_steps and state["step"] < total_steps:
            eval_due = (state["step"] + 1) % a.eval_interval == 0
            if stopper.should_stop(fabric, step_times, eval_due):
                save_everything(fabric, gpt, optimizer, scheduler, state, out_dir, args)
                fabric.print(f"Stopping at step {state['step']}: {stopper.reason}; saved. Continue with --resume true")
                finish(fabric, state, out_dir)
                if rank == 0:
                    write_status(out_dir, "stopped", state["step"], total_steps, stopper.reason)
                return "stopped"
            t_step = time.perf_counter()
            i0 = state["step_in_epoch"] * micro_per_step
            step_batches = batches[i0:i0 + micro_per_step]
            if world > 1 and len(step_batches) % world:  # every rank needs as many passes: wrap around
                step_batches += batches[:world - len(step_batches) % world]
            mine = step_batches[rank::world]
            fixed = dict(fixed_length=max_seq_length, fixed_rows=a.micro_batch_size) if a.cuda_graph else {}
            collated = [collate(train_examples, b, a.packing, fabric.device, **fixed) for b in mine]
            n_local = sum(int((c["targets"] != IGNORE).sum()) for c in collated)
            n_global = fabric.all_reduce(torch.tensor(float(n_local), device=fabric.device), reduce_op="sum").item()
            loss_total = 0.0
            if a.cuda_graph:
                if graphed is None:
                    graphed = GraphedMicroStep(gpt, trainable, collated[0])
                for batch in collated:
                    loss_total += graphed(batch).item()
                torch._foreach_mul_([p.grad for p in trainable], 1.0 / max(n_global, 1.0))
            else:
                for i, batch in enumerate(collated):
                    with fabric.no_backward_sync(model, enabled=i < len(collated) - 1):
                        loss_sum, _ = training_loss(model, batch)
                        # DDP averages gradients over ranks, so scale by world: the result is the mean over every
                        # counted token of the whole step, however tokens fall into micro-batches and ranks.
                        fabric.backward(loss_sum * world / max(n_global, 1.0))
                    loss_total += loss_sum.item()
            loss = fabric.all_reduce(torch.tensor(loss_total, device=fabric.device),
                                     reduce_op="sum").item() / max(n_global, 1)
            if not math.isfinite(loss):  # diverged: a save now would put broken adapters over the last good ones
                reason = (f"the training loss is {loss} at step {state['step'] + 1}, nothing saved after step "
                          f"{state['step'] // a.save_interval * a.save_interval}; continue from there with a lower "
                          f"--learning_rate (now {a.learning_rate:g}) and --resume true, or start again")
                fabric.print(f"Stopping: {reason}")
                if rank == 0:
                    write_status(out_dir, "stopped", state["step"], total_steps, reason)
                return "stopped"
            if a.grad_clip:
                fabric.clip_gradients(model, optimizer, max_norm=a.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # this step's; the scheduler then sets the next one's
            optimizer.step()
            optimizer.zero_grad(set_to_none=not a.cuda_graph)  # the graph accumulates into fixed gradient buffers
            scheduler.step()
            state["step"] += 1
            state["step_in_epoch"] += 1
            if fabric.device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t_step)
            n_tok = fabric.all_reduce(torch.tensor(float(sum(int(c["n_tokens"]) for c in collated)),
                                                   device=fabric.device), reduce_op="sum").item()
            state["tokens"] += n_tok
            state["history"]["train"].append((state["step"], loss))
            fabric.log_dict({"train_loss": loss, "lr": lr, "tokens_per_s": n_tok / step_times[-1]}, step=state["step"])
            if state["step"] % a.log_interval == 0 or state["step"] == total_steps:
                recent = sorted(step_times[-20:])[len(step_times[-20:]) // 2]
                eta = recent * (total_steps - state["step"])
                if deadline is not None:
                    eta = min(eta, max(0.0, deadline - time.monotonic()))
                fabric.print(f"step {state['step']}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                             f"{n_tok / step_times[-1]:,.0f} tok/s | {peak_memory(fabric.device)} | "
                             f"ETA {format_seconds(eta)}")
            if eval_due or state["step"] == total_steps:
                t_eval = time.perf_counter()
                validate_and_log(fabric, model, gpt, val_examples, a, state, checkpoint_dir)
                stopper.eval_s = time.perf_counter() - t_eval
            if state["step"] % a.save_interval == 0 and state["step"] < total_steps:
                t_save = time.perf_counter()
                save_everything(fabric, gpt, optimizer, scheduler, state, out_dir, args, numbered=True)
                stopper.save_s = time.perf_counter() - t_save
        if state["step_in_epoch"] >= n_steps:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    save_everything(fabric, gpt, optimizer, scheduler, state, out_dir, args, numbered=True)
    finish(fabric, state, out_dir)
    if rank == 0:
        write_status(out_dir, "finished", state["step"], total_steps)
    return "finished"


# ---------------------------------------------------------------------------------------------------------------------
# Data: prepared splits -> shifted examples -> packed rows or length-bucketed batches -> tensors


@dataclass
class Split:
    tokens: torch.Tensor  # int32 (N,)
    loss_mask: torch.Tensor  # uint8 (N,)
    offsets: torch.Tensor  # int64 (n + 1,)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def load_split(path: Path) -> Split:
    """Reads and checks one split file; every problem is one line naming the file and what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    fix = "prepare the data again with prepare_data/ (see README)"
    if not path.is_file():
        raise InputError(f"{path}: not found; {fix}")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); {fix}") from None
    missing = [k for k in ("tokens", "loss_mask", "offsets") if k not in d]
    if missing:
        raise InputError(f"{path}: missing tensor(s) {missing}; expected tokens, loss_mask, offsets; {fix}")
    tokens, mask, offsets = d["tokens"], d["loss_mask"], d["offsets"]
    if tokens.dim() != 1 or mask.shape != tokens.shape:
        raise InputError(f"{path}: tokens {tuple(tokens.shape)} and loss_mask {tuple(mask.shape)} must be 1-D of one "
                         f"length; {fix}")
    if (offsets.dim() != 1 or not offsets.numel() or offsets.is_floating_point() or offsets[0] != 0
            or offsets[-1] != tokens.numel()):
        raise InputError(f"{path}: offsets must be integers running from 0 to len(tokens)={tokens.numel()}; {fix}")
    if bool((offsets[1:] - offsets[:-1] < 2).any()):
        row = int((offsets[1:] - offsets[:-1] < 2).nonzero()[0])
        raise InputError(f"{path}: sample {row} has fewer than 2 tokens (or offsets decrease); {fix}")
    if tokens.is_floating_point() or (tokens.numel() and int(tokens.min()) < 0):
        raise InputError(f"{path}: tokens must be non-negative integer ids; {fix}")
    return Split(tokens.long(), mask.to(torch.uint8), offsets.long())


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in `path`; a missing, unreadable or malformed file is one line naming it and `fix`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable or malformed JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object {{...}}, found {type(data).__name__}; {fix}")
    return data


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():  # prepare_data moves it in last: without it the folder holds no finished preparation
        raise InputError(f"{path}: not found, so {data_dir} is not a finished prepared dataset; prepare the data again "
                         "with prepare_data/")
    meta = read_json(path, "prepare the data again")
    value = meta.get("max_seq_length")
    if value is not None and not (type(value) is int and value > 0):
        raise InputError(f"{path}: max_seq_length {value!r} is not a positive whole number; prepare the data again "
                         "or pass --max_seq_length")
    return meta


def check_tokenizer(data_dir: Path, meta: dict, checkpoint_dir: Path, config: Config, *splits: Split) -> None:
    """Token ids from another tokenizer train silently on nonsense: compare the tokenizer that prepared the data
    (its fingerprint in meta.json) with the checkpoint's, and for any data check that every id fits the vocabulary."""
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is not None:
        from tokenizer import Tokenizer

        ours = Tokenizer(checkpoint_dir).fingerprint()
        if recorded != ours:
            raise InputError(f"{data_dir}/meta.json: the data was tokenized by {meta.get('tokenizer_dir', '?')}'s "
                             f"tokenizer (fingerprint {recorded}), not {checkpoint_dir}'s ({ours}); prepare the data "
                             f"again with --checkpoint_dir {checkpoint_dir}")
    for name, split in zip(("train", "val"), splits):
        if split.tokens.numel() and int(split.tokens.max()) >= config.vocab_size:
            raise InputError(f"{data_dir}/{name}.safetensors: token id {int(split.tokens.max())} is outside the "
                             f"vocabulary of {config.name} ({config.vocab_size}); prepare the data with this model's "
                             "tokenizer")


@dataclass
class Examples:
    """Samples shifted for next-token prediction: inputs tokens[s:s+L], targets tokens[s+1:s+L+1]."""
    split: Split
    starts: torch.Tensor
    lengths: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.starts)


def make_examples(split: Split, max_seq_length: int, limit: Optional[int] = None) -> Examples:
    starts = split.offsets[:-1]
    lengths = (split.lengths() - 1).clamp(max=max_seq_length)
    # Drop samples whose kept part has no target token: they would only cost compute.
    csum = torch.cat([torch.zeros(1, dtype=torch.long), split.loss_mask.long().cumsum(0)])
    has_target = csum[starts + lengths + 1] - csum[starts + 1] > 0
    starts, lengths = starts[has_target], lengths[has_target]
    if limit is not None:
        starts, lengths = starts[:limit], lengths[:limit]
    return Examples(split, starts, lengths)


def pack(lengths: List[int], capacity: int) -> List[List[int]]:
    """Best-fit decreasing: sample ids grouped into rows of at most `capacity` tokens (deterministic)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # sorted (free tokens, row id)
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def epoch_batches(examples: Examples, rows: Optional[List[List[int]]], micro_batch_size: int, seed: int,
                  epoch: int) -> List[List[List[int]]]:
    """The micro-batches of one epoch, a pure function of (seed, epoch) so --resume can find its place again.
    Each micro-batch is a list of rows; a row is a list of sample ids (one id when not packing)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if rows is not None:
        order = torch.randperm(len(rows), generator=g).tolist()
        shuffled = [rows[i] for i in order]
        return [shuffled[i:i + micro_batch_size] for i in range(0, len(shuffled), micro_batch_size)]
    # Length buckets: sort shuffled chunks by length so a micro-batch pads little, then shuffle the micro-batches.
    order = torch.randperm(examples.n, generator=g).tolist()
    chunk = micro_batch_size * 64
    lengths = examples.lengths.tolist()
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i])
        batches += [[[i] for i in part[j:j + micro_batch_size]] for j in range(0, len(part), micro_batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def collate(examples: Examples, batch: List[List[int]], packed: bool, device, fixed_length: Optional[int] = None,
            fixed_rows: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-padded (B, T) inputs and targets (IGNORE on prompt and padding); for packed rows also segment ids.
    fixed_length / fixed_rows pad every batch to that T / B (rows of padding only: no target) and always include
    the segment ids: the CUDA graph's fixed shapes."""
    split = examples.split
    rows_idx, rows_tgt, rows_seg = [], [], []
    for row in batch:
        idx, tgt, seg = [], [], []
        for n, i in enumerate(row):
            s, L = int(examples.starts[i]), int(examples.lengths[i])
            idx.append(split.tokens[s:s + L])
            t = split.tokens[s + 1:s + L + 1].clone()
            t[split.loss_mask[s + 1:s + L + 1] == 0] = IGNORE
            tgt.append(t)
            seg.append(torch.full((L,), n, dtype=torch.long))
        rows_idx.append(torch.cat(idx))
        rows_tgt.append(torch.cat(tgt))
        rows_seg.append(torch.cat(seg))
    T = fixed_length or max(len(r) for r in rows_idx)
    B = max(len(rows_idx), fixed_rows or 0)
    idx = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)  # padding: a segment of its own, attends only to itself
    n_tokens = 0
    for b in range(len(rows_idx)):
        L = len(rows_idx[b])
        idx[b, :L], targets[b, :L], segments[b, :L] = rows_idx[b], rows_tgt[b], rows_seg[b]
        n_tokens += L
    out = {"idx": idx.to(device), "targets": targets.to(device), "n_tokens": torch.tensor(n_tokens)}
    if packed and (fixed_length or any(len(row) > 1 for row in batch)):
        out["segments"] = segments.to(device)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The training step


def training_loss(model, batch: Dict[str, torch.Tensor], select_targets: bool = True) -> Tuple[torch.Tensor, int]:
    """(sum of the token losses, number of counted tokens) for one micro-batch. Packed rows get a document mask and
    RoPE positions that restart per sample; otherwise no mask at all, so SDPA takes its causal flash path.
    select_targets=False sends every position through the head (fixed shapes, no host sync: for CUDA graphs) and
    returns None for the count."""
    pos_ids = mask = None
    if "segments" in batch:
        segments = batch["segments"]
        window = getattr(model, "config", None) and model.config.sliding_window
        mask = document_mask(segments, window)
        pos_ids = segment_positions(segments)
    hidden = model.hidden_states(batch["idx"], pos_ids=pos_ids, mask=mask)
    head = model.lm_head if hasattr(model, "lm_head") else model.module.lm_head
    return chunked_cross_entropy(head, hidden, batch["targets"], select_targets=select_targets)


def chunked_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 64 * 2**20,
                          select_targets: bool = True) -> Tuple[torch.Tensor, Optional[int]]:
    """Summed cross-entropy of head(hidden) against targets without ever holding all fp32 logits.

    Only positions with a target go through the head (all positions with select_targets=False); they go in chunks
    whose fp32 logits take about `chunk_bytes`, each recomputed in the backward pass instead of kept (the head
    matmul is ~1% of a 7B model's FLOPs)."""
    if select_targets:
        keep = targets != IGNORE
        h, t = hidden[keep], targets[keep]
        n = t.numel()
        if n == 0:
            return hidden.sum() * 0.0, 0
    else:
        h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        n = None
    rows = t.numel()
    random_head = not isinstance(getattr(head, "dropout", None), (torch.nn.Identity, type(None)))
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    size = max(128, chunk_bytes // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, rows, size):
        if torch.is_grad_enabled():  # a LoRA head with dropout must see the same mask when recomputed
            total = total + checkpoint(_ce_sum, head, h[i:i + size], t[i:i + size], use_reentrant=False,
                                       preserve_rng_state=random_head)
        else:
            total = total + _ce_sum(head, h[i:i + size], t[i:i + size])
    return total, n


def _ce_sum(head, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def enable_activation_checkpointing(model: GPT, n_blocks: Optional[int] = None, preserve_rng_state: bool = True,
                                    offload: bool = False) -> None:
    """Each block's activations (of the first n_blocks; default all) are recomputed in the backward pass
    (non-reentrant checkpointing); parameter names and the module tree stay as they are, so checkpoints and adapters
    do not notice. preserve_rng_state is needed only when something random runs inside a block (LoRA dropout).
    offload: the blocks' inputs, all that checkpointing keeps on the GPU, wait in pinned host memory instead (see
    HostCopy): 20 MB per block and 2,048 tokens for a 13B, 0.8 GB in all."""
    blocks = list(model.blocks)[:n_blocks]
    copies = [HostCopy() for _ in blocks] if offload else [None] * len(blocks)
    for i, (block, copy) in enumerate(zip(blocks, copies)):
        plain = block.forward
        if copy is not None:
            copy.previous = copies[i - 1] if i else None

        def forward(x, *args, _plain=plain, _block=block, _copy=copy, **kwargs):
            if not (torch.is_grad_enabled() and _block.training):
                return _plain(x, *args, **kwargs)
            if _copy is None:
                return checkpoint(_plain, x, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                                  **kwargs)
            # x itself is not handed to checkpoint, which would keep it: the copy gives it back
            parked = _copy.park(x)
            return checkpoint(_call_with_input, _plain, _copy, parked, *args, use_reentrant=False,
                              preserve_rng_state=preserve_rng_state, **kwargs)

        block.forward = forward


def _call_with_input(forward, copy: "HostCopy", parked: int, *args, **kwargs):
    return forward(copy.take(parked), *args, **kwargs)


class HostCopy:
    """A checkpointed block's input, parked in pinned host memory from the forward pass to the block's recompute in
    the backward pass (as Unsloth's offloaded checkpointing): on a side stream, so the copies overlap the blocks'
    compute (55 GB/s each way on an H100's PCIe 5: 0.4 ms for a 13B's 2,048 x 5,120 input, next to ~3 ms of block).

    park(x) starts the copy to the host; the GPU x is let go when the next block parks its own input (after waiting
    for this copy). take() gives x back: the first time (the forward pass) the GPU tensor itself; later (the
    recompute) a copy back from the host, started early: fetching block i's input prefetches block i-1's. The host
    buffer is allocated once and reused, at a fixed address, so CUDA graphs can replay the copies. On the CPU (tests)
    the "host copy" is a plain clone, which exercises the same bookkeeping. One input per block: a second forward
    pass before the first one's backward would overwrite it, so take() refuses a recompute of an older pass."""

    _stream = None

    def __init__(self) -> None:
        self.previous: Optional["HostCopy"] = None
        self.host = self.gpu = self.prefetched = None
        self.copied = self.ready = None
        self.first_take = False
        self.requires_grad = False
        self.parked = 0  # counts park() calls: which forward pass the kept input belongs to

    @classmethod
    def side_stream(cls):
        if cls._stream is None:
            cls._stream = torch.cuda.Stream()
        return cls._stream

    def park(self, x: torch.Tensor) -> int:
        if self.previous is not None:
            self.previous.let_go()
        self.gpu, self.first_take, self.requires_grad = x, True, x.requires_grad
        self.prefetched = self.ready = None  # left over from a backward pass that stopped half way
        self.parked += 1
        if not x.is_cuda:
            self.host = x.detach().clone()
            return self.parked
        if self.host is None or self.host.shape != x.shape or self.host.dtype != x.dtype:
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream = self.side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.host.copy_(x.detach(), non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        return self.parked

    def let_go(self) -> None:
        if self.gpu is not None and self.copied is not None:
            torch.cuda.current_stream().wait_event(self.copied)  # x's memory is reused only after the copy read it
        self.gpu = None

    def take(self, parked: int) -> torch.Tensor:
        if parked != self.parked:
            raise RuntimeError("offloaded checkpointing keeps one input per block: a second forward pass ran before "
                               "the first one's backward; run each backward before the next forward, or turn "
                               "--offload_checkpoints off")
        if self.first_take:  # the forward pass
            self.first_take = False
            return self.gpu
        if self.gpu is not None:  # the last parked block's recompute: its input never left the GPU
            if self.copied is not None:
                torch.cuda.current_stream().wait_event(self.copied)  # joins the side stream (CUDA graph capture)
            x, self.gpu = self.gpu, None
        elif self.prefetched is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            x, self.prefetched = self.prefetched, None
        elif self.host.is_pinned():
            x = self.host.to(torch.cuda.current_device(), non_blocking=True)
        else:
            x = self.host.clone()
        if self.previous is not None and self.host.is_pinned():
            self.previous.prefetch()
        return x.detach().requires_grad_(self.requires_grad)

    def prefetch(self) -> None:
        self.let_go()
        if self.prefetched is not None:
            return
        current = torch.cuda.current_stream()
        self.prefetched = torch.empty(self.host.shape, dtype=self.host.dtype, device=current.device)
        stream = self.side_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self.prefetched.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)


class GraphedMicroStep:
    """Forward and backward of one micro-batch, captured once as a CUDA graph and replayed for every later one.

    At micro-batch 1 eager PyTorch spends longer launching a QLoRA step's thousands of small kernels than the GPU
    spends running them (Mistral-7B, 1 x 2048, H100: a 333 ms step held 183 ms of GPU work); a replay launches them
    all at once. Shapes must be fixed (packed rows padded to max_seq_length, see collate). Building it zeroes the
    parameters' gradients (its warm-up runs real backward passes). Each replay ADDS the gradients of the summed token
    loss to every parameter's .grad, a fixed buffer: scale them, step, and zero them in place
    (zero_grad(set_to_none=False)), never replace them.
    """

    def __init__(self, model, params: List[torch.Tensor], batch: Dict[str, torch.Tensor], warmup: int = 2) -> None:
        self.params = params
        self.static = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_cuda}
        for p in params:  # fixed buffers: backward() adds into them in place, so replays accumulate
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, cuBLAS workspaces) off the capture
            for _ in range(warmup):
                loss, _ = training_loss(model, self.static, select_targets=False)
                loss.backward()
        torch.cuda.current_stream().wait_stream(side)
        torch._foreach_zero_([p.grad for p in params])  # the warm-up's gradients do not count
        del loss
        torch.cuda.empty_cache()  # the warm-up's cached blocks would otherwise sit beside the graph's own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, _ = training_loss(model, self.static, select_targets=False)
            # backward() adds each gradient into its .grad in place as soon as it is ready, and frees it;
            # autograd.grad would hold all of them until the end (0.2 GiB of fp32 for a 13B's LoRA at r=16)
            self.loss.backward()

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        for k, v in self.static.items():
            v.copy_(batch[k], non_blocking=True)
        self.graph.replay()
        return self.loss


def neftune_hook(module, inputs, output, alpha: float):
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(T * dim) on the embeddings, training only."""
    if not module.training:
        return output
    scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
    return output + torch.empty_like(output).uniform_(-scale, scale)


def make_optimizer(name: str, params, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    if name == "adamw":
        fused = torch.device(device).type == "cuda"
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused,
                                 foreach=None if fused else True)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to the peak, then cosine down to min_ratio of it at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------------------------
# Validation, checkpoints, the time budget, logs


@torch.no_grad()
def validate(fabric, model, examples: Examples, micro_batch_size: int) -> float:
    model.eval()
    order = sorted(range(examples.n), key=lambda i: int(examples.lengths[i]))  # little padding
    batches = [[[i] for i in order[j:j + micro_batch_size]] for j in range(0, len(order), micro_batch_size)]
    total = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    for b in batches[fabric.global_rank::fabric.world_size]:
        loss_sum, n = training_loss(model, collate(examples, b, False, fabric.device))
        total += torch.tensor([loss_sum.item(), n], device=fabric.device, dtype=torch.float64)
    total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def validate_and_log(fabric, model, gpt, val_examples, a, state, checkpoint_dir) -> None:
    if not val_examples.n:  # an empty validation split: training without validation (see main)
        return
    t0 = time.perf_counter()
    # Evaluation runs the compiled kernels eagerly: its batches (and the sample's tokens) vary in length, and a
    # compiled function that has seen several lengths recompiles for dynamic shapes, also for the training step
    # compiled after it (slower, more memory: docs/speed/h100_2026-11-24_e.md, "Ordering").
    eager = torch.compiler.set_stance("force_eager")
    with eager:
        val_loss = validate(fabric, model, val_examples, a.micro_batch_size)
    state["history"]["val"].append((state["step"], val_loss))
    fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=state["step"])
    fabric.print(f"step {state['step']} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f} | "
                 f"{time.perf_counter() - t0:.1f}s")
    if state["step"] > 0 and val_loss < state["best_val"]:
        state["best_val"] = val_loss
        if fabric.global_rank == 0:
            save_adapter(gpt, Path(a.out_dir) / "adapter_best.safetensors", extra=adapter_extra(a, state))
    if a.sample_tokens > 0 and fabric.global_rank == 0:
        with eager:
            print_sample(fabric, gpt, val_examples, checkpoint_dir, a.sample_tokens)
    fabric.barrier()


def print_sample(fabric, gpt: GPT, examples: Examples, checkpoint_dir: Path, max_new_tokens: int) -> None:
    """Greedy continuation of the first validation prompt (its tokens before the first target), via generate/base.py."""
    try:
        from generate.base import generate
        from tokenizer import Tokenizer

        tokenizer = Tokenizer(checkpoint_dir)
    except Exception as e:  # a sample is a nicety: never let it stop training
        fabric.print(f"(no sample generation: {e})")
        return
    if not examples.n:
        return
    split, s = examples.split, int(examples.starts[0])
    end = int(split.offsets[int(torch.searchsorted(split.offsets, s)) + 1])
    targets = split.loss_mask[s:end].nonzero()
    prompt = split.tokens[s:s + (int(targets[0]) if len(targets) else end - s)]
    max_new = min(max_new_tokens, gpt.config.block_size - len(prompt))
    if max_new <= 0:
        return
    was_training = gpt.training
    gpt.eval()
    try:
        out = generate(gpt, [prompt], max_new, temperature=0.0, eos_id=tokenizer.eos_id)[0]
    finally:
        gpt.train(was_training)
    fabric.print(f"sample | {tokenizer.decode(prompt.tolist())[-200:]!r} -> {tokenizer.decode(out)!r}")


def adapter_extra(a, state) -> dict:
    return {"step": state["step"], "quantize": a.quantize, "checkpoint_dir": a.checkpoint_dir, "data_dir": a.data_dir}


def save_everything(fabric, gpt, optimizer, scheduler, state, out_dir: Path, args: dict, numbered: bool = False) -> None:
    """Adapter (+ a numbered copy) and the resumable state, each written atomically; state.ckpt last, so a state
    on disk always has its adapter next to it."""
    a = argparse_namespace(args)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if fabric.device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)
    rngs = fabric.all_gather(torch.cat([rng, cuda_rng]).to(fabric.device))  # every rank's dropout stream
    rngs = rngs.cpu() if rngs.dim() == 2 else rngs.cpu().unsqueeze(0)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_adapter(gpt, out_dir / "adapter.safetensors", extra=adapter_extra(a, state))
        if numbered:
            (out_dir / "adapters").mkdir(exist_ok=True)
            save_adapter(gpt, out_dir / "adapters" / f"step-{state['step']:06d}.safetensors", extra=adapter_extra(a, state))
    payload = {"lora": {k: v.detach().cpu().clone() for k, v in lora_state_dict(gpt).items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
               "cpu_rng_size": rng.numel(), "state": json.dumps(state), "args": json.dumps(args)}
    tmp = out_dir / "state.ckpt.tmp"
    fabric.save(tmp, payload)
    for logger in fabric.loggers:
        logger.save()
    fabric.barrier()
    if fabric.global_rank == 0:
        os.replace(tmp, out_dir / "state.ckpt")
    fabric.barrier()


def load_training_state(fabric, path: Path, gpt, optimizer, scheduler, default: dict, args: dict) -> dict:
    import pickle

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: unreadable ({str(e)[:200]}); it cannot be resumed, start a new "
                         "--out_dir") from None
    params = dict(gpt.named_parameters())
    with torch.no_grad():
        for k, v in payload["lora"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    # Both state dicts bring back the saved run's learning rate and weight decay: this run's flags win, as
    # train_config.json says.
    saved = json.loads(payload["args"])
    changed = [f"--{k} {args[k]:g} (was {saved[k]:g})" for k in ("learning_rate", "weight_decay")
               if saved.get(k, args[k]) != args[k]]
    scheduler.base_lrs = [args["learning_rate"]] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=args["learning_rate"], lr=args["learning_rate"] * factor(scheduler.last_epoch),
                     weight_decay=args["weight_decay"])
    if changed:
        fabric.print(f"Resuming with {' and '.join(changed)}, from this step on")
    rngs = payload["rng"]
    if rngs.size(0) != fabric.world_size:
        fabric.print(f"{path}: saved with {rngs.size(0)} ranks, resuming on {fabric.world_size}: dropout noise will differ")
    mine = rngs[min(fabric.global_rank, rngs.size(0) - 1)]
    n = payload["cpu_rng_size"]
    torch.set_rng_state(mine[:n].to(torch.uint8).contiguous())
    if fabric.device.type == "cuda" and mine.numel() > n:
        torch.cuda.set_rng_state(mine[n:].to(torch.uint8).contiguous())
    return {**default, **json.loads(payload["state"])}


RESUME_MUST_MATCH = ("checkpoint_dir", "data_dir", "quantize", "precision", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_targets", "batch_size", "micro_batch_size", "max_seq_length", "packing", "seed", "optimizer")


def check_resumable(out_dir: Path, args: dict, config: Config) -> None:
    path = out_dir / "train_config.json"
    saved = read_json(path, "restore it, or start a new --out_dir") if path.exists() else {}
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != args[key]:
            raise InputError(f"{path}: --{key} was {saved[key]!r}, now {args[key]!r}; resuming needs the same value "
                             "(or start a new --out_dir)")
    adapter = out_dir / "adapter.safetensors"
    if adapter.is_file():
        check_adapter_fits(read_adapter(adapter)[0], config, adapter)


class Stopper:
    """Stops before the time budget runs out (leaving room for one more step, an evaluation and a save) or on
    SIGTERM/SIGINT (a second Ctrl-C interrupts at once)."""

    def __init__(self, deadline: Optional[float], max_time: Optional[str] = None) -> None:
        self.deadline, self.max_time = deadline, max_time  # time.monotonic() to be done by; the --max_time it came from
        self.save_s, self.eval_s, self.signalled, self.reason = 0.0, 0.0, False, ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a notebook runner): budget only
                pass

    def _on_signal(self, signum, frame) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = signal.Signals(signum).name

    def should_stop(self, fabric, step_times: List[float], eval_due: bool) -> bool:
        stop = bool(self.signalled)
        if self.signalled:
            self.reason = f"asked to stop ({self.signalled})"
        elif self.deadline is not None:
            step = max(step_times[-5:]) if step_times else 0.0
            needed = 1.5 * step + 2 * self.save_s + (self.eval_s if eval_due else 0.0) + 10.0
            stop = time.monotonic() + needed > self.deadline
            if stop:
                self.reason = f"the --max_time budget of {format_seconds(parse_time(self.max_time))} is nearly spent"
        flag = fabric.all_reduce(torch.tensor(float(stop), device=fabric.device), reduce_op="sum").item()
        if flag and not self.reason:
            self.reason = "another rank is stopping"
        return flag > 0


def finish(fabric, state: dict, out_dir: Path) -> None:
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.global_rank != 0:
        return
    plot_losses(state["history"], out_dir / "loss.png")
    val = state["history"]["val"]
    summary = f"Val loss {val[0][1]:.4f} -> {val[-1][1]:.4f} (best {state['best_val']:.4f})" if val else "No validation"
    fabric.print(f"Done: {state['step']} steps, {state['tokens']:,.0f} tokens. {summary}. "
                 f"Adapter: {out_dir / 'adapter.safetensors'}\n"
                 f"Try it: python generate/lora.py --adapter {out_dir / 'adapter.safetensors'} --prompt '...'")


def write_status(out_dir: Path, status: str, step: int, total_steps: int, reason: str = "") -> None:
    """status.json: "running", "stopped" (by the budget or a signal: continue with --resume true; the exit status is
    75) or "finished" (exit status 0). A run that crashed still says "running"."""
    tmp = out_dir / "status.json.tmp"
    tmp.write_text(json.dumps({"status": status, "reason": reason, "step": step, "total_steps": total_steps}) + "\n")
    os.replace(tmp, out_dir / "status.json")


def plot_losses(history: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train", alpha=0.6)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def make_loggers(out_dir: Path) -> list:
    from lightning.fabric.loggers import CSVLogger

    loggers = [CSVLogger(str(out_dir), name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard"))
    except ImportError:
        pass
    return loggers


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def parse_time(value) -> float:
    """"[DD:]HH:MM:SS" or a number of seconds -> seconds (> 0)."""
    try:
        parts = [float(p) for p in str(value).strip().split(":")]
    except ValueError:
        parts = []
    seconds = sum(p * unit for p, unit in zip(reversed(parts), (1, 60, 3600, 86400)))
    if not 0 < len(parts) <= 4 or any(math.copysign(1, p) < 0 for p in parts) or not 0 < seconds < math.inf:
        raise InputError(f"--max_time {value!r}: use [DD:]HH:MM:SS (e.g. 23:30:00) or seconds > 0; null for no budget")
    return seconds


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class argparse_namespace:  # attribute access to the arguments dict, for brevity in the loop
    def __init__(self, d: dict) -> None:
        self.__dict__.update(d)


if __name__ == "__main__":
    from cli import run

    torch.set_float32_matmul_precision("high")
    if run(setup) == "stopped":
        sys.exit(EXIT_STOPPED)
