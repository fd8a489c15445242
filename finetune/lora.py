"""LoRA / QLoRA fine-tuning on prepared data, inside a time budget, on one GPU (or several through Fabric's DDP).

    python finetune/lora.py --data_dir data/demo --train.max_steps 60        # SmolLM2-135M, CPU, a few minutes
    python finetune/lora.py --config finetune/configs/upaya_4090.yaml        # a winning recipe's flags
    python finetune/lora.py --config out/lora/run/train_config.yaml --out_dir out/lora/again   # the same run again
    python finetune/lora.py --checkpoint_dir mistral-7b --quantize bnb.nf4-dq --memory_budget 22.5GiB  # a 24 GB card

Reads `train.safetensors` / `val.safetensors` and `meta.json` (data.py; made by prepare_data/) and writes to out_dir:
`adapter.safetensors` (latest), `adapter_best.safetensors` (best validation loss), `adapters/step-*.safetensors`,
`state.ckpt` (everything --resume needs), `train_config.yaml` (every flag: give it to --config), `prompt_style.json`,
`logs/` (CSV, TensorBoard when installed), `loss.png` and `status.json` (finetune/state.py). Exit status: 0 finished,
75 stopped by --max_time, a signal or a loss that is no longer finite (status.json says why; continue with --resume
true), 2 a bad input (one line, nothing written).
"""

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Literal, Optional, Tuple

import torch
from jsonargparse.typing import PositiveInt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fast  # noqa: E402
from cli import InputError  # noqa: E402
from data import (IGNORE, Examples, check_tokenizer, collate, epoch_batches, load_split, make_examples,  # noqa: E402
                  pack, read_meta)
from fast.memory import GraphedMicroStep, chunked_cross_entropy, enable_activation_checkpointing  # noqa: E402
from finetune import plan  # noqa: E402
from finetune.args import EvalArgs, LoRAArgs, Seed, SpeedArgs, TrainArgs, check_flags  # noqa: E402
from finetune.state import (EXIT_STOPPED, START, Stopper, adapter_extra, check_resumable, finish,  # noqa: E402
                            format_seconds, load_checkpoint, make_loggers, parse_time, peak_memory, save_checkpoint,
                            write_config, write_status)
from lora import LoRAConfig, inject_lora, lora_modules, lora_state_dict, save_adapter  # noqa: E402
from model import GPT, segment_positions  # noqa: E402
from quantize import Mode as QuantizeMode  # noqa: E402
from utils import checkpoint_files, load_config, load_model, resolve_checkpoint_dir  # noqa: E402


def setup(
    checkpoint_dir: str = "smollm2-135m",
    data_dir: Path = Path("data/demo"),
    out_dir: Optional[Path] = None,
    quantize: Optional[QuantizeMode] = None,
    precision: Optional[Literal["bf16-true", "32-true"]] = None,
    devices: PositiveInt = 1,
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    lora: LoRAArgs = LoRAArgs(),
    train: TrainArgs = TrainArgs(),
    speed: SpeedArgs = SpeedArgs(),
    eval: EvalArgs = EvalArgs(),
    max_time: Optional[str] = "23:30:00",
    memory_budget: Optional[str] = None,
    resume: bool = False,
    seed: Seed = 1337,
) -> str:
    """Fine-tune a base model with LoRA (QLoRA with --quantize). Returns "finished" or "stopped".

    Args:
        checkpoint_dir: converted base checkpoint folder or a registered name (smollm2-135m, mistral-7b, ...).
        data_dir: prepared data folder (prepare_data/). An empty val.safetensors trains without validation.
        out_dir: where adapters, state and logs go; default out/lora/<checkpoint>-<data>.
        quantize: 4-bit/8-bit base weights through bitsandbytes (QLoRA): bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.int8.
        precision: base weights and compute dtype; default bf16-true on a GPU, 32-true on CPU. LoRA weights and
            optimizer states are always fp32.
        devices: number of devices (GPUs, or CPU processes with --accelerator cpu); several run DDP.
        accelerator: cuda, cpu or auto.
        lora: the adapters.
        train: optimizer, schedule, batches, data and saving.
        speed: the speed layer (fast/): fused kernels, FP8, activation memory, CUDA graphs.
        eval: validation.
        max_time: wall-clock budget as [DD:]HH:MM:SS or seconds, counted from process start; the run stops and saves
            before it runs out, and exits with status 75 (status.json says "stopped"). null: no budget.
        memory_budget: a cap on GPU memory, e.g. 24GiB, 40GB or 22.5GiB (GiB = 2^30 bytes): the trainer chooses the
            micro-batch, activation checkpointing, offloading and kept inputs for the fastest training that fits,
            checks its choice with a real step, prints it, and PyTorch never holds more (finetune/plan.py). Those
            flags, given at other values than their defaults, are kept. null: the flags as given.
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
    on_gpu = torch.cuda.is_available() and accelerator != "cpu"
    precision = precision or ("bf16-true" if on_gpu else "32-true")
    # Plain values (Path -> str, jsonargparse's PositiveInt & co. -> int, float) in --config's shape.
    hparams = json.loads(json.dumps(dict(
        checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, quantize=quantize, precision=precision,
        devices=devices, accelerator=accelerator, lora=asdict(lora), train=asdict(train), speed=asdict(speed),
        eval=asdict(eval), max_time=max_time, memory_budget=memory_budget, resume=resume, seed=seed), default=str))

    # Everything that can be wrong with the inputs is found here, before a GPU second is spent or out_dir is touched.
    try:
        lora_config = LoRAConfig(r=lora.r, alpha=float(lora.alpha), dropout=float(lora.dropout), targets=lora.targets)
    except ValueError as e:
        raise InputError(f"--lora.targets {lora.targets}: {e}") from None
    parent = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # out_dir or the folder it will be made in
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise InputError(f"--out_dir {out_dir}: {parent} is {'not writable' if parent.is_dir() else 'a file'}; "
                         "choose another --out_dir")
    if not (data_dir.is_dir() and os.access(data_dir, os.R_OK | os.X_OK)):
        raise InputError(f"--data_dir {data_dir}: {'not readable' if data_dir.is_dir() else 'no such folder'}; "
                         "prepare the data with prepare_data/ (see README)")
    cap = plan.parse_budget(memory_budget) if memory_budget is not None else None
    if cap is not None and on_gpu:
        plan.check_device(cap, memory_budget, torch.device("cuda"))
    check_flags(lora, train, speed, devices, on_gpu, quantize, planned=cap is not None)
    train_data, val_data = load_split(data_dir / "train.safetensors"), load_split(data_dir / "val.safetensors")
    meta = read_meta(data_dir)
    if (data_dir / "prompt_style.json").is_file():  # copied next to the adapter, where generate/lora.py reads it
        from prompts import load_style

        load_style(data_dir)
    max_seq_length = train.max_seq_length or min(meta.get("max_seq_length") or max([2, *train_data.lengths().tolist()]),
                                                 config.block_size)
    if max_seq_length > config.block_size:
        raise InputError(f"--train.max_seq_length {max_seq_length} exceeds the context of {config.name} "
                         f"({config.block_size} tokens, {checkpoint_dir}/model_config.json); use at most that")
    check_tokenizer(data_dir, meta, checkpoint_dir, config, train_data, val_data)
    train_examples = make_examples(train_data, max_seq_length)
    if not train_examples.n:
        raise InputError(f"{data_dir}/train.safetensors: no sample with a target token in its first {max_seq_length} "
                         "tokens (an empty split, loss_mask all 0, or prompts longer than --train.max_seq_length); "
                         "prepare the data again with rows that have responses")
    val_examples = make_examples(val_data, max_seq_length, limit=eval.samples)
    if train.batch_size % (train.micro_batch_size * devices):
        raise InputError(f"--train.batch_size {train.batch_size} is not a multiple of --train.micro_batch_size "
                         f"{train.micro_batch_size} x {devices} devices; change one of them")
    if cap is not None:  # nothing fits: say so now, not after loading the model
        a = json.loads(json.dumps(hparams), object_hook=lambda d: SimpleNamespace(**d))
        plan.choose(plan.memory_job(config, a, max_seq_length, dense_mask=train.packing), cap,
                    pins=plan.memory_pins(a, config.n_layer), budget_text=memory_budget)
    budget = parse_time(max_time) if max_time else None
    state_path = out_dir / "state.ckpt"
    if resume and not state_path.is_file():
        raise InputError(f"{state_path}: nothing to resume; run without --resume to start this out_dir")
    if resume:
        check_resumable(out_dir, hparams, config)
    elif state_path.is_file():
        raise InputError(f"{out_dir} already holds a run; pass --resume true to continue it "
                         "or choose another --out_dir")

    try:  # LoRA weights are fp32 on purpose and the base is cast by us, so Fabric itself casts nothing ("32-true")
        fabric = Fabric(devices=devices, accelerator=accelerator, precision="32-true", loggers=make_loggers(out_dir))
    except (ValueError, RuntimeError, ImportError) as e:  # Lightning's word on these flags
        raise InputError(f"--accelerator {accelerator} --devices {devices}: {e}") from None
    # Run as a script, the budget counts from process start (imports and start-up are part of the day); called from
    # Python (a notebook, the tests), from this call.
    deadline = (START if __name__ == "__main__" else time.monotonic()) + budget if budget is not None else None
    return fabric.launch(main, hparams, lora_config, train_examples, val_examples, max_seq_length, deadline)


def main(fabric, hparams: dict, lora_config: LoRAConfig, train_examples: Examples, val_examples: Examples,
         max_seq_length: int, deadline: Optional[float]) -> str:
    """Trains until the end, the deadline (time.monotonic()), a signal or a non-finite loss; returns "finished" or
    "stopped" (status.json says which and why)."""
    from lightning.fabric.utilities.throughput import Throughput

    a = json.loads(json.dumps(hparams), object_hook=lambda d: SimpleNamespace(**d))  # a.train.batch_size
    out_dir, checkpoint_dir, data_dir = Path(a.out_dir), Path(a.checkpoint_dir), Path(a.data_dir)
    fabric.seed_everything(a.seed)  # the same LoRA init on every rank

    budget = plan.parse_budget(a.memory_budget) if a.memory_budget else None
    if budget is not None and fabric.device.type == "cuda":
        plan.enforce(budget, fabric.device)  # from the first weight on
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if a.precision == "bf16-true" else torch.float32
    gpt = load_model(checkpoint_dir, device=fabric.device, dtype=dtype, quantize=a.quantize)
    inject_lora(gpt, lora_config)
    fabric.print(f"Loaded {checkpoint_dir} ({a.quantize or a.precision}) in {time.perf_counter() - t0:.1f}s; LoRA "
                 f"{lora_config.targets} r={lora_config.r}: {sum(p.numel() for p in lora_state_dict(gpt).values()):,} "
                 "trainable parameters")
    if a.train.neftune_alpha > 0:
        gpt.wte.register_forward_hook(partial(neftune_hook, alpha=a.train.neftune_alpha))
    trainable = [p for p in gpt.parameters() if p.requires_grad]
    rows = pack(train_examples.lengths.tolist(), max_seq_length) if a.train.packing else None
    memory = None  # what status.json says of --memory_budget
    if budget is not None:  # sets a.train.micro_batch_size and a.speed.* to the plan's choice
        memory = plan.fit_budget(fabric, gpt, a, budget, train_examples, rows, max_seq_length, apply_speed,
                                 training_loss, make_optimizer)
    else:
        apply_speed(gpt, a)
    if a.speed.fp8:
        layers = lora_modules(gpt).values()
        n_fp8 = sum(getattr(m, "fp8_mode", None) is not None for m in layers)
        fabric.print(f"FP8 base matmuls ({a.speed.fp8}) in {n_fp8} of {len(layers)} LoRA layers")
    if a.speed.compile:
        for block in gpt.blocks:
            block.compile()

    optimizer = make_optimizer(a.train.optimizer, trainable, a.train.learning_rate, a.train.weight_decay, fabric.device)
    model = fabric.setup_module(gpt)
    model.mark_forward_method("hidden_states")
    optimizer = fabric.setup_optimizers(optimizer)

    t = a.train
    world, rank = fabric.world_size, fabric.global_rank
    micro_per_step = t.batch_size // t.micro_batch_size  # over all devices
    n_micro = len(epoch_batches(train_examples, rows, t.micro_batch_size, a.seed, 0))
    steps_per_epoch = math.ceil(n_micro / micro_per_step)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, warmup=warmup, total=total_steps,
                                                                     min_ratio=t.min_lr_ratio))
    truncated = int((train_examples.split.lengths() - 1 > max_seq_length).sum())
    fabric.print(f"{train_examples.n:,} training samples ({truncated} truncated to {max_seq_length} tokens), "
                 f"{'packed into ' + str(len(rows)) + ' rows, ' if rows else ''}{steps_per_epoch} steps per epoch; "
                 f"training {total_steps} steps of {t.batch_size} x {max_seq_length if rows else '<=' + str(max_seq_length)}"
                 f" tokens ({micro_per_step // world} micro-batches of {t.micro_batch_size} per device and step)")
    if not val_examples.n:
        fabric.print(f"{data_dir}/val.safetensors has no sample with a target token in its first {max_seq_length} "
                     "tokens: training without validation (no val loss, no adapter_best.safetensors)")

    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val": float("inf"), "history": {"train": [], "val": []},
             "tokens": 0}
    if a.resume:
        state = load_checkpoint(fabric, out_dir / "state.ckpt", gpt, optimizer, scheduler, state, hparams)
        fabric.print(f"Resumed {out_dir} at step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} "
                     "of it)")
    else:
        torch.manual_seed(a.seed + rank)  # dropout/NEFTune noise differs per rank; LoRA init above did not
    if rank == 0:  # only now: a run that refused to start leaves nothing behind
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config(out_dir, hparams, memory and memory["line"])
        if (data_dir / "prompt_style.json").is_file():
            shutil.copy(data_dir / "prompt_style.json", out_dir / "prompt_style.json")
        write_status(out_dir, "running", state["step"], total_steps, memory=plan.memory_status(memory, fabric.device))
    stopper = Stopper(deadline, a.max_time)
    save = partial(save_checkpoint, fabric, gpt, optimizer, scheduler, state, out_dir, hparams)

    if state["step"] == 0 and not a.resume:
        validate_and_log(fabric, model, gpt, val_examples, a, state, checkpoint_dir)
    model.train()  # load_model returns eval mode: without this LoRA dropout and NEFTune would silently be off
    step_times: List[float] = []
    throughput = Throughput(window_size=t.log_interval + 1)  # tokens/s over the last log interval
    throughput.update(time=0.0, batches=0, samples=0, lengths=0)
    tokens_now = 0  # this process's: the throughput window starts here, also on --resume
    graphed = None  # the captured micro-step (--speed.cuda_graph), made at the first step
    while state["step"] < total_steps:
        batches = epoch_batches(train_examples, rows, t.micro_batch_size, a.seed, state["epoch"])
        n_steps = math.ceil(len(batches) / micro_per_step)
        while state["step_in_epoch"] < n_steps and state["step"] < total_steps:
            eval_due = (state["step"] + 1) % a.eval.interval == 0
            if stopper.should_stop(fabric, step_times, eval_due):
                save()
                fabric.print(f"Stopping at step {state['step']}: {stopper.reason}; saved. Continue with --resume true")
                finish(fabric, state, out_dir)
                if rank == 0:
                    write_status(out_dir, "stopped", state["step"], total_steps, stopper.reason,
                                 plan.memory_status(memory, fabric.device))
                return "stopped"
            t_step = time.perf_counter()
            i0 = state["step_in_epoch"] * micro_per_step
            step_batches = batches[i0:i0 + micro_per_step]
            if world > 1 and len(step_batches) % world:  # every rank needs as many passes: wrap around
                step_batches += batches[:world - len(step_batches) % world]
            # Packed rows are padded to one shape, as the CUDA graph needs anyway: the compiled kernels (FlexAttention
            # among them) then never recompile for dynamic shapes; the padding is a few tokens per row
            fixed = dict(fixed_length=max_seq_length, fixed_rows=t.micro_batch_size) \
                if a.speed.cuda_graph or t.packing else {}
            mine = step_batches[rank::world]
            collated = [collate(train_examples, b, t.packing, fabric.device, **fixed) for b in mine]
            n_local = sum(int((c["targets"] != IGNORE).sum()) for c in collated)
            n_global = fabric.all_reduce(torch.tensor(float(n_local), device=fabric.device), reduce_op="sum").item()
            loss_total = 0.0
            if a.speed.cuda_graph:
                graphed = graphed or GraphedMicroStep(gpt, trainable, collated[0], training_loss)
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
                          f"{state['step'] // t.save_interval * t.save_interval}; continue from there with a lower "
                          f"--train.learning_rate (now {t.learning_rate:g}) and --resume true, or start again")
                fabric.print(f"Stopping: {reason}")
                if rank == 0:
                    write_status(out_dir, "stopped", state["step"], total_steps, reason,
                                 plan.memory_status(memory, fabric.device))
                return "stopped"
            if t.grad_clip:
                fabric.clip_gradients(model, optimizer, max_norm=t.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # this step's; the scheduler then sets the next one's
            optimizer.step()
            optimizer.zero_grad(set_to_none=not a.speed.cuda_graph)  # the graph accumulates into fixed buffers
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
            tokens_now += int(n_tok)
            throughput.update(time=sum(step_times), batches=len(step_times), samples=len(step_times),
                              lengths=tokens_now)
            # The log gets this step's figure; the printed line the mean over the steps since the last line (the
            # window holds all ranks' tokens, already summed: "device" here is the whole job).
            tok_s = throughput.compute().get("device/items_per_sec", n_tok / step_times[-1])
            fabric.log_dict({"train_loss": loss, "lr": lr, "tokens_per_s": n_tok / step_times[-1]}, step=state["step"])
            if state["step"] % t.log_interval == 0 or state["step"] == total_steps:
                recent = sorted(step_times[-20:])[len(step_times[-20:]) // 2]
                eta = recent * (total_steps - state["step"])
                if deadline is not None:
                    eta = min(eta, max(0.0, deadline - time.monotonic()))
                fabric.print(f"step {state['step']}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                             f" | {peak_memory(fabric.device)} | ETA {format_seconds(eta)}")
            if eval_due or state["step"] == total_steps:
                t_eval = time.perf_counter()
                validate_and_log(fabric, model, gpt, val_examples, a, state, checkpoint_dir)
                stopper.eval_s = time.perf_counter() - t_eval
            if state["step"] % t.save_interval == 0 and state["step"] < total_steps:
                t_save = time.perf_counter()
                save(numbered=True)
                stopper.save_s = time.perf_counter() - t_save
        if state["step_in_epoch"] >= n_steps:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    save(numbered=True)
    finish(fabric, state, out_dir)
    if rank == 0:
        write_status(out_dir, "finished", state["step"], total_steps, memory=plan.memory_status(memory, fabric.device))
    return "finished"


def apply_speed(gpt: GPT, a) -> None:
    """The --speed.* settings in `a` on the model; called again, it replaces them. speed_up first: checkpointing wraps
    each block's forward as speed_up left it."""
    if a.speed.fused:
        fast.speed_up(gpt, fp8=a.speed.fp8, recompute_inputs=a.speed.recompute_inputs)
    for block in gpt.blocks:
        block.__dict__.pop("forward", None)  # no checkpointing: the class's own forward
    if a.speed.activation_checkpointing:
        n = None if a.speed.activation_checkpointing in (True, 1) else int(a.speed.activation_checkpointing)
        enable_activation_checkpointing(gpt, n, preserve_rng_state=a.lora.dropout > 0,
                                        offload=a.speed.offload_checkpoints)


def training_loss(model, batch: Dict[str, torch.Tensor], select_targets: bool = True) -> Tuple[torch.Tensor, int]:
    """(sum of the token losses, number of counted tokens) for one micro-batch. Packed rows get a document mask
    (fast.packed_mask: a FlexAttention BlockMask for a sped-up model on a GPU, else model.document_mask) and RoPE
    positions that restart per sample; otherwise no mask at all, so SDPA takes its causal flash path.
    select_targets=False sends every position through the head (fixed shapes, no host sync: for CUDA graphs) and
    returns None for the count."""
    pos_ids = mask = None
    if "segments" in batch:
        mask, pos_ids = fast.packed_mask(model, batch["segments"]), segment_positions(batch["segments"])
    hidden = model.hidden_states(batch["idx"], pos_ids=pos_ids, mask=mask)
    head = model.lm_head if hasattr(model, "lm_head") else model.module.lm_head
    return chunked_cross_entropy(head, hidden, batch["targets"], select_targets=select_targets)


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


def validate_and_log(fabric, model, gpt, val_examples: Examples, a, state: dict, checkpoint_dir) -> None:
    """Validation loss (and a greedy sample); a new best writes adapter_best.safetensors. `a` holds the run's
    hyperparameters (a.train.micro_batch_size, a.eval.sample_tokens, a.out_dir)."""
    if not val_examples.n:  # an empty validation split: training without validation (see main)
        return
    t0 = time.perf_counter()
    # Evaluation runs the compiled kernels eagerly: its batches (and the sample's tokens) vary in length, and a
    # compiled function that has seen several lengths recompiles for dynamic shapes, also for the training step
    # compiled after it (slower, more memory).
    eager = torch.compiler.set_stance("force_eager")
    with eager:
        val_loss = validate(fabric, model, val_examples, a.train.micro_batch_size)
    state["history"]["val"].append((state["step"], val_loss))
    fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=state["step"])
    fabric.print(f"step {state['step']} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f} | "
                 f"{time.perf_counter() - t0:.1f}s")
    if state["step"] > 0 and val_loss < state["best_val"]:
        state["best_val"] = val_loss
        if fabric.global_rank == 0:
            save_adapter(gpt, Path(a.out_dir) / "adapter_best.safetensors", extra=adapter_extra(vars(a), state))
    if a.eval.sample_tokens > 0 and fabric.global_rank == 0:
        with eager:
            print_sample(fabric, gpt, val_examples, checkpoint_dir, a.eval.sample_tokens)
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
    split = examples.split
    tokens, mask = split.sample(int(torch.searchsorted(split.offsets, examples.starts[0])))
    targets = mask.nonzero()
    prompt = tokens[:int(targets[0]) if len(targets) else len(tokens)]
    max_new = min(max_new_tokens, gpt.config.block_size - len(prompt))
    if max_new <= 0:
        return
    was_training = gpt.training
    gpt.eval()
    try:
        out = generate(gpt, [prompt], max_new, temperature=0.0, eos_id=tokenizer.eos_id)[0]
    except torch.cuda.OutOfMemoryError:  # its KV cache is the one allocation --memory_budget's probe does not make
        torch.cuda.empty_cache()
        fabric.print("(no sample generation: out of GPU memory under the cap; training goes on)")
        return
    finally:
        gpt.train(was_training)
    fabric.print(f"sample | {tokenizer.decode(prompt.tolist())[-200:]!r} -> {tokenizer.decode(out)!r}")


if __name__ == "__main__":
    from cli import run

    torch.set_float32_matmul_precision("high")
    if run(setup) == "stopped":
        sys.exit(EXIT_STOPPED)
