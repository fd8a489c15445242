"""--memory_budget: the fastest memory settings of finetune/lora.py that fit a cap on GPU memory.

    python finetune/lora.py --checkpoint_dir mistral-7b --data_dir data/mix --quantize bnb.nf4-dq \
        --memory_budget 22.5GiB --speed.fp8 all --speed.cuda_graph true

The planner sets four things: the micro-batch (gradient accumulation keeps --train.batch_size), how many blocks,
counted from the first, recompute their activations in the backward pass (--speed.activation_checkpointing), whether
those blocks' inputs wait in host memory (--speed.offload_checkpoints) and whether the fused LoRA matmuls keep their
inputs (--speed.recompute_inputs false). One of these four flags given at a value other than its default pins it: the
planner then only looks at configurations with that value. Everything else (--speed.fp8, --speed.cuda_graph, the
model, LoRA, the data) is the user's and planned for as given.

1. peak_bytes, a model of memory, predicts each configuration's footprint: the weights by quantization, the LoRA
   weights with their gradients and optimizer state, per token the activations each kept block holds for its backward
   pass (what tests/test_plan.py measures autograd keeping), a checkpointed block's input, the last block's backward
   and the loss, and with a CUDA graph the validation forward beside the graph's own memory pool. Its constants come
   from the peaks in docs/speed/ (H100, torch.cuda.max_memory_allocated); tests/test_plan.py checks it against them.
   The cap limits what PyTorch reserves, more than it allocates: reserved_bytes adds that margin, and is what the
   planner compares with the cap.
2. relative_speed, a model of speed, ranks them (assumptions at its definition).
3. The fastest configuration the model fits under the cap is probed: in the trainer, one real micro-step (as the loop
   runs it, CUDA graph included), an optimizer step and a validation forward, under the cap, report the peak memory
   PyTorch reserved. Out of memory or within HEADROOM of the cap, the planner steps down to the next configuration,
   with the model's activation estimate scaled by what the probe found (at most MAX_PROBES probes).

The trainer (finetune/lora.py) calls fit_budget, the last section here, and enforces the cap with
torch.cuda.set_per_process_memory_fraction, so PyTorch's allocator never holds more, whatever happens after the probe;
the CUDA context (about half a GiB) comes on top. On a CPU nothing is probed or enforced: the model's choice is
printed as such.
"""

import gc
import math
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from cli import InputError
import fast
from data import Examples, collate
from fast.memory import GraphedMicroStep
from lora import LoRAConfig, inject_lora
from model import GPT, Config
from quantize import is_quantized_linear

GiB = 2**30
UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}

# Bytes per weight of a quantized block linear: 4-bit codes and one scale per 64 weights (fp32; with double
# quantization 8-bit, plus an fp32 scale per 256 of those), or int8 codes (its per-row scales are negligible).
QUANTIZED_BYTES = {"bnb.nf4": 0.5 + 4 / 64, "bnb.fp4": 0.5 + 4 / 64, "bnb.nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),
                   "bnb.int8": 1.0}
# Optimizer state per LoRA weight. The paged optimizers keep theirs in CUDA unified memory, outside PyTorch's
# allocator: neither counted here nor capped.
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw": 0, "paged_adamw8bit": 0}
FIXED = 0.08 * GiB  # cuBLAS workspaces, a dequantized weight, the loss's logits chunk: fitted to docs/speed's peaks
# What PyTorch's caching allocator reserves beyond the allocated peak: freed blocks it keeps cached, segments split and
# rounded up, the CUDA graph's private pool beside the rest. So the reserved peak, which the cap limits, runs ahead of
# the allocated one, modelled as a fixed amount plus a share of the activations. Fitted to the trainer's probes on an
# H100 (tests/gpu/check_plan.py, 2026-12-06: Mistral-7B NF4-dq, FP8, CUDA graph, 8-24 GiB): every measured probe
# within 0.15 GiB, every out-of-memory one predicted over its cap (tests/test_plan.py). Other setups (eager, bf16)
# are unmeasured; the fixed part is large for small models.
RESERVED_FIXED, RESERVED_SHARE = 1.2 * GiB, 0.075
HEADROOM = 0.02  # a probe must stay this fraction below the cap: later steps vary a little (validation lengths)
MAX_PROBES = 4


def parse_budget(text) -> int:
    """"24GiB", "40GB", "22.5GiB", "8000MiB" -> bytes (GiB = 2^30 bytes, GB = 10^9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", str(text).lower())
    if not m or m.group(2) not in UNITS or float(m.group(1)) <= 0:
        raise InputError(f"--memory_budget {text!r}: give a size with its unit, e.g. 24GiB, 40GB or 22.5GiB "
                         "(GiB = 2^30 bytes, GB = 10^9 bytes)")
    return int(float(m.group(1)) * UNITS[m.group(2)])


@dataclass
class Job:
    """What the memory and speed of a training step depend on, besides the Choice."""
    config: Config
    lora: LoRAConfig
    seq: int  # tokens per row (max_seq_length)
    batch_size: int  # rows per optimizer step and device
    quantize: Optional[str] = None
    dtype_bytes: int = 2  # of the base weights and activations (bf16)
    optimizer: str = "adamw"
    fused: bool = True  # --speed.fused: the fast path (compiled kernels on a GPU)
    dense_mask: bool = False  # packed rows through model.py's dense document mask (not FlexAttention)
    fp8: Optional[str] = None  # --speed.fp8: None, "grad" or "all"
    cuda_graph: bool = False
    compile: bool = False
    ddp: bool = False
    lora_params: int = field(init=False)
    weight_bytes: int = field(init=False)

    def __post_init__(self):
        # Count parameters on a model of the meta device: exact for any config and LoRA targets, and instant.
        with torch.device("meta"):
            model = GPT(self.config)
        inject_lora(model, self.lora)
        self.lora_params, weights = 0, 0.0
        for name, p in model.named_parameters():
            if "lora_" in name.rpartition(".")[2]:
                self.lora_params += p.numel()
            elif self.quantize and is_quantized_linear(name.replace(".base.", ".")):
                weights += p.numel() * QUANTIZED_BYTES[self.quantize]
            else:
                weights += p.numel() * self.dtype_bytes
        self.weight_bytes = int(weights + 4 * self.lora_params)  # LoRA weights are fp32

    @property
    def fused_path(self) -> bool:
        return self.fused and self.lora.dropout == 0


@dataclass(frozen=True)
class Choice:
    micro_batch_size: int
    checkpointed: int  # the first N blocks recompute their activations in the backward pass (0: none)
    offload: bool  # and their inputs wait in host memory
    keep_inputs: bool  # --speed.recompute_inputs false

    def flags(self, n_layer: int) -> str:
        ckpt = "true" if self.checkpointed >= n_layer else str(self.checkpointed or "false")
        return (f"--train.micro_batch_size {self.micro_batch_size} --speed.activation_checkpointing {ckpt} "
                f"--speed.offload_checkpoints {str(self.offload).lower()} "
                f"--speed.recompute_inputs {str(not self.keep_inputs).lower()}")

    def describe(self, n_layer: int) -> str:
        c = self.checkpointed
        ckpt = "no checkpointing" if not c else f"{'every block' if c >= n_layer else f'the first {c} blocks'} " \
            f"checkpointed{' and offloaded' if self.offload else ''}"
        return f"micro-batch {self.micro_batch_size}, {ckpt}, inputs {'kept' if self.keep_inputs else 'recomputed'}"


@dataclass(frozen=True)
class Pins:
    """Planner settings the user fixed with a flag (None: the planner chooses)."""
    micro_batch_size: Optional[int] = None
    checkpointed: Optional[int] = None
    offload: Optional[bool] = None
    keep_inputs: Optional[bool] = None

    def allow(self, c: Choice) -> bool:
        return all(pinned is None or pinned == getattr(c, name) for name, pinned in vars(self).items())


# ---------------------------------------------------------------------------------------------------------------------
# The models


def block_bytes_per_token(job: Job, keep_inputs: bool) -> float:
    """What one block keeps for its backward pass, per token. The fast path keeps the block input and the attention
    residual, q, k and v after RoPE, the attention output and the MLP's two projections (tests/test_fused.py), and
    with kept inputs both norm outputs and the SwiGLU product too. The plain path and LoRA dropout keep more: bounds
    that tests/test_plan.py checks."""
    c = job.config
    kv = c.n_query_groups * c.head_size
    fast = 4 * c.n_embd + 2 * kv + 2 * c.intermediate_size + (2 * c.n_embd + c.intermediate_size) * keep_inputs
    factor = 1.0 if job.fused_path else 2.5 if job.lora.dropout > 0 else 2.0
    return factor * fast * job.dtype_bytes


def static_bytes(job: Job) -> int:
    """What no choice changes: weights, LoRA weights with gradients and optimizer state, DDP's gradient buckets."""
    per_lora_weight = 4 + OPTIMIZER_BYTES[job.optimizer] + (4 if job.ddp else 0)
    return int(job.weight_bytes + job.lora_params * per_lora_weight + FIXED)


def peak_bytes(job: Job, choice: Choice, validation: bool = True) -> int:
    """The predicted footprint of training with `choice`. The peak comes at the end of the forward pass, or, with
    every block checkpointed, while the first block to be recomputed holds its activations again. validation=False:
    the training step alone (what benchmarks/benchmark_finetune.py's peak_mem_gib measures)."""
    c = job.config
    tokens = choice.micro_batch_size * job.seq
    kept = max(c.n_layer - choice.checkpointed, 1 if choice.checkpointed else 0)
    inputs = 2 if choice.offload else choice.checkpointed  # offloaded: the one in flight and the one prefetched
    # Beyond the blocks: the last block's backward through the gated MLP (three tensors as wide as it) and the
    # embedding, per token; the logits are chunked (fast/memory.py), so they are in FIXED.
    outside = 3 * c.intermediate_size + c.n_embd
    per_token = kept * block_bytes_per_token(job, choice.keep_inputs) + inputs * c.n_embd * job.dtype_bytes
    activations = tokens * (per_token + outside * job.dtype_bytes)
    if job.dense_mask:  # SDPA's masked kernel keeps per layer the mask tiled over each K/V head's query heads as a
        # bias, and the boolean tiling: 3 bytes an element, the 1.5 GiB more that packed rows took for Mistral-7B
        # 1 x 2048 (docs/training-speed.md)
        activations += kept * choice.micro_batch_size * 3 * (c.n_head // c.n_query_groups) * job.seq ** 2
    if validation and job.cuda_graph:  # the graph's pool keeps the step's activations; validation runs beside it
        activations += tokens * (5 * c.n_embd + 2 * c.n_query_groups * c.head_size + 3 * c.intermediate_size) \
            * job.dtype_bytes
    return int(static_bytes(job) + activations)


def reserved_bytes(job: Job, choice: Choice, scale: float = 1.0) -> int:
    """The predicted peak PyTorch reserves, what the cap limits: peak_bytes with its activations times `scale` (what
    probes found beyond the model), plus the allocator's margin."""
    static = static_bytes(job)
    activations = scale * (peak_bytes(job, choice) - static)
    return int(static + activations + RESERVED_FIXED + RESERVED_SHARE * activations)


# Speed, relative (tokens per unit of time), fitted to the H100 benchmark calls in docs/speed/ (tests/test_plan.py
# checks that it ranks each call's configurations in their measured order). Its assumptions:
# - a micro-step costs its tokens plus a fixed amount of work whatever its size (dequantizing every base weight, with
#   FP8 quantizing it again; thousands of small kernels; the optimizer). With a CUDA graph that work is worth
#   FIXED_TOKENS tokens: more with FP8 base matmuls, which make each token cheaper and add to the fixed work (Mistral-7B
#   at 2048: 3 rows a micro-step ran 14-16% faster than 1 with FP8, 8.5% with bf16), an unmeasured middle for FP8 in
#   the backward pass only. Without a graph, far more (eager launches: 333 ms a step for 183 ms of GPU work);
# - a checkpointed block runs its forward again: RECOMPUTE of its forward-and-backward time (FP8, 2026-12-06: the first
#   4 of 32 blocks took 4.5% longer, 17 of them offloaded 21%; all 40 of Llama-2-13B's 39%);
# - offloading costs next to nothing (the copies overlap compute): OFFLOAD_COST only breaks ties towards keeping
#   inputs on the GPU;
# - kept inputs save the recomputation of norms and SwiGLU products: 1.2-2.4% measured, for half again the activation
#   memory (2.7 GiB for Mistral-7B 1 x 2048);
# - the model, data and GPU scale every configuration alike: only the ranking within one job matters.
# Not modelled: the one contrary measurement, FP8 with 4 rows and every block offloaded, 20% slower than 1 row with
# half of them offloaded (docs/speed/h100_2026-11-24_d.md, a call whose configurations recompiled for dynamic shapes),
# where this model puts them level.
FIXED_TOKENS = {None: 320, "grad": 410, "all": 500}  # by --speed.fp8
FIXED_TOKENS_EAGER, RECOMPUTE, OFFLOAD_COST, KEEP_SPEEDUP = 2000, 0.38, 0.01, 1.02


def relative_speed(job: Job, choice: Choice) -> float:
    tokens = choice.micro_batch_size * job.seq
    share = choice.checkpointed / job.config.n_layer
    fixed = FIXED_TOKENS[job.fp8] if job.cuda_graph else FIXED_TOKENS_EAGER
    time = (tokens + fixed) * (1 + RECOMPUTE * share + OFFLOAD_COST * share * choice.offload)
    return tokens / time * (KEEP_SPEEDUP if choice.keep_inputs else 1.0)


def candidates(job: Job, pins: Pins = Pins(), max_micro_batch: int = 16) -> List[Choice]:
    """Every configuration the flags allow: micro-batches that divide the batch, 0, 2..n_layer checkpointed blocks
    (--speed.activation_checkpointing 1 means every block), offloaded or not, inputs kept or recomputed."""
    n = job.config.n_layer
    sizes = [m for m in range(1, min(job.batch_size, max_micro_batch) + 1) if job.batch_size % m == 0]
    # CUDA graphs cannot replay the dropout masks a recomputed block would need; compiled blocks cannot trace the
    # offload copies' streams; kept inputs are the fused LoRA matmul's
    blocks = [0] if job.cuda_graph and job.lora.dropout > 0 else [0, *range(2, n + 1)]
    out = [Choice(m, c, offload, keep) for m in sizes for c in blocks
           for offload in ((False, True) if c and not job.compile else (False,))
           for keep in ((False, True) if job.fused_path else (False,))]
    return [c for c in out if pins.allow(c)]


# ---------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    choice: Choice
    predicted: int  # reserved_bytes: the model's reserved peak, the probe's counterpart
    allocated: int  # peak_bytes: the model's allocated peak
    probed: Optional[int]  # the probe's reserved peak (None: not probed)
    rejected: List[Tuple[Choice, Optional[int]]]  # probed and over the cap (None: out of memory)

    def line(self, job: Job, budget_text: str, budget: int) -> str:
        n = job.config.n_layer
        probed = f"probed {self.probed / GiB:.2f} GiB" if self.probed is not None else "not probed (CPU)"
        tried = "; over the cap: " + ", ".join(
            f"{c.describe(n)} ({'out of memory' if peak is None else f'{peak / GiB:.2f} GiB'})"
            for c, peak in self.rejected) if self.rejected else ""
        return (f"--memory_budget {budget_text} ({budget / GiB:.2f} GiB): {self.choice.describe(n)} "
                f"({self.choice.flags(n)}); reserved peak predicted {self.predicted / GiB:.2f} GiB (allocated "
                f"{self.allocated / GiB:.2f}), {probed}{tried}")


def choose(job: Job, budget: int, probe: Optional[Callable[[Choice], Optional[int]]] = None,
           pins: Pins = Pins(), budget_text: str = "") -> Plan:
    """The fastest configuration whose predicted reserved peak fits `budget` bytes. probe(choice) -> the reserved peak
    of a real step, None when it ran out of memory; without a probe, the model's choice. Raises InputError when
    nothing fits."""
    ranked = sorted(candidates(job, pins), key=lambda c: relative_speed(job, c), reverse=True)
    if not ranked:
        raise InputError(f"--memory_budget {budget_text}: the pinned flags leave no configuration to choose from; "
                         "drop --train.micro_batch_size or --speed.* flags")
    limit, static = budget * (1 - HEADROOM), static_bytes(job)
    scale = 1.0  # how much more activation memory the probes found than the model predicted (only ever raised)
    rejected = []
    for choice in ranked:
        if reserved_bytes(job, choice, scale) > limit:
            continue
        plan = Plan(choice, reserved_bytes(job, choice), peak_bytes(job, choice), None, rejected)
        if probe is None:
            return plan
        if len(rejected) == MAX_PROBES:
            break
        plan.probed = probe(choice)
        if plan.probed is not None and plan.probed <= limit:
            return plan
        rejected.append((choice, plan.probed))
        # the scale at which reserved_bytes predicts what the probe found (out of memory: at least the budget)
        found = (plan.probed if plan.probed is not None else budget) - static - RESERVED_FIXED
        scale = max(scale, found / ((1 + RESERVED_SHARE) * max(plan.allocated - static, 1)))
    leanest = min(ranked, key=lambda c: peak_bytes(job, c))  # of equally lean ones the fastest (ranked order)
    n = job.config.n_layer
    if rejected:
        raise InputError(f"--memory_budget {budget_text}: {len(rejected)} configurations probed, none fit "
                         f"({', '.join(c.describe(n) for c, _ in rejected)}); give a larger budget, a shorter "
                         "--train.max_seq_length or a smaller --lora.r")
    four_bit = "" if job.quantize else "4-bit weights (--quantize bnb.nf4-dq), "
    need = reserved_bytes(job, leanest)
    raise InputError(f"--memory_budget {budget_text}: nothing fits; even {leanest.describe(n)} would reserve about "
                     f"{need / GiB:.1f} GiB (the weights alone {job.weight_bytes / GiB:.1f}), so the smallest budget "
                     f"that fits is about {math.ceil(need / (1 - HEADROOM) / GiB * 10) / 10:.1f}GiB; give that or "
                     f"more, or {four_bit}a shorter --train.max_seq_length or a smaller --lora.r")


def check_device(budget: int, budget_text: str, device: torch.device) -> None:
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise InputError(f"--memory_budget {budget_text}: more than {torch.cuda.get_device_name(device)} has "
                         f"({total / GiB:.2f} GiB); give at most that, less the CUDA context's half GiB and what "
                         "other processes use")


def enforce(budget: int, device: torch.device) -> None:
    """PyTorch's allocator raises out of memory rather than hold more than `budget` bytes in this process."""
    torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(device).total_memory,
                                               device)


# ---------------------------------------------------------------------------------------------------------------------
# In the trainer: its flags (`a`, finetune/lora.py's hyperparameters as attributes) to a Job and Pins, the probe, and
# the choice back to its flags. The trainer passes in its own apply_speed, training_loss and make_optimizer, so that
# the probe runs what the loop runs and this module does not import the trainer.


def memory_job(config: Config, a, max_seq_length: int, dense_mask: bool) -> Job:
    lora = LoRAConfig(r=a.lora.r, alpha=float(a.lora.alpha), dropout=float(a.lora.dropout), targets=a.lora.targets)
    return Job(config, lora, max_seq_length, a.train.batch_size // a.devices, quantize=a.quantize,
               dtype_bytes=2 if a.precision == "bf16-true" else 4, optimizer=a.train.optimizer, fused=a.speed.fused,
               dense_mask=dense_mask, fp8=a.speed.fp8, cuda_graph=a.speed.cuda_graph, compile=a.speed.compile,
               ddp=a.devices > 1)


def memory_pins(a, n_layer: int) -> Pins:
    """The planner's four flags at other values than their defaults pin them. Unpacked rows keep their micro-batch:
    their length buckets, and so the data order, depend on it."""
    mb, ckpt = a.train.micro_batch_size, a.speed.activation_checkpointing
    return Pins(micro_batch_size=mb if mb != 1 or not a.train.packing else None,
                checkpointed=None if ckpt is False or ckpt == 0 else n_layer if ckpt is True or ckpt == 1
                else min(int(ckpt), n_layer),
                offload=True if a.speed.offload_checkpoints else None,
                keep_inputs=True if not a.speed.recompute_inputs else None)


def use_choice(a, choice: Choice, n_layer: int) -> None:
    a.train.micro_batch_size = choice.micro_batch_size
    c = choice.checkpointed  # --speed.activation_checkpointing 1 means every block; candidates never gives 1
    a.speed.activation_checkpointing = True if c >= n_layer else c or False
    a.speed.offload_checkpoints = choice.offload
    a.speed.recompute_inputs = not choice.keep_inputs


def fit_budget(fabric, gpt: GPT, a, budget: int, examples: Examples, rows, max_seq_length: int,
               apply_speed: Callable, training_loss: Callable, make_optimizer: Callable) -> dict:
    """Chooses, probes (on a GPU) and applies (in `a` and through apply_speed) the fastest memory settings under the
    budget; prints the choice and returns what status.json reports of it."""
    pins = memory_pins(a, gpt.config.n_layer)  # the flags as given
    apply_speed(gpt, a)
    # Packed rows not taken by FlexAttention take the dense document mask, which each layer keeps
    job = memory_job(gpt.config, a, max_seq_length, dense_mask=a.train.packing and not fast.packs_with_flex(gpt))
    probe = memory_probe(fabric, gpt, a, examples, rows, max_seq_length, apply_speed, training_loss, make_optimizer)
    chosen = choose(job, budget, probe, pins, a.memory_budget)
    use_choice(a, chosen.choice, gpt.config.n_layer)
    apply_speed(gpt, a)
    line = chosen.line(job, a.memory_budget, budget)
    fabric.print(line)
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fabric.device)  # status.json's peaks are the run's, not the probes'
    gib = lambda n: None if n is None else round(n / GiB, 2)  # noqa: E731
    return {"line": line, "budget_gib": gib(budget), **vars(chosen.choice), "dense_mask": job.dense_mask,
            "predicted_gib": gib(chosen.predicted), "predicted_allocated_gib": gib(chosen.allocated),
            "probed_gib": gib(chosen.probed), "probes": len(chosen.rejected) + (chosen.probed is not None)}


def memory_status(memory: Optional[dict], device) -> Optional[dict]:
    """status.json's "memory": fit_budget's report and the run's peaks so far (None without --memory_budget)."""
    if memory is None:
        return None
    status = {k: v for k, v in memory.items() if k != "line"}
    if torch.device(device).type == "cuda":
        status.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GiB, 2))
    return status


def memory_probe(fabric, gpt: GPT, a, examples: Examples, rows, max_seq_length: int, apply_speed: Callable,
                 training_loss: Callable, make_optimizer: Callable) -> Optional[Callable[[Choice], Optional[int]]]:
    """probe(choice) for choose: the peak memory PyTorch reserved (under the cap) for one micro-step in that choice's
    settings, as the loop runs it, then an optimizer step and a validation forward; None when that ran out of
    memory. None on a CPU: nothing to measure or cap there."""
    if fabric.device.type != "cuda":
        return None
    n_layer, shapes = gpt.config.n_layer, set()
    trainable = [p for p in gpt.parameters() if p.requires_grad]

    def probe(choice: Choice) -> Optional[int]:
        if shapes and choice.micro_batch_size not in shapes:
            torch._dynamo.reset()  # kernels compiled for one shape and called with another recompile for any shape
        shapes.add(choice.micro_batch_size)
        use_choice(a, choice, n_layer)
        apply_speed(gpt, a)
        batch = probe_batch(examples, rows, choice.micro_batch_size, max_seq_length, fabric.device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(fabric.device)
        try:
            probe_step(gpt, a, batch, training_loss, make_optimizer)
            peak = float(torch.cuda.max_memory_reserved(fabric.device))
        except RuntimeError as e:  # OutOfMemoryError, or an allocation failing in the CUDA graph's capture or cuBLAS
            if not isinstance(e, torch.cuda.OutOfMemoryError) and not any(
                    m in str(e) for m in ("out of memory", "ALLOC_FAILED")):
                raise
            peak = math.inf
        gc.collect()
        torch.cuda.empty_cache()
        if fabric.world_size > 1:  # every rank decides alike, on the largest peak; DDP adds its gradient buckets
            peak = fabric.all_reduce(torch.tensor(peak, device=fabric.device), reduce_op="max").item()
            peak += 4 * sum(p.numel() for p in trainable)
        return None if math.isinf(peak) else int(peak)

    return probe


def probe_batch(examples: Examples, rows, micro_batch_size: int, max_seq_length: int, device) -> dict:
    """A micro-batch of the fullest rows of the training data, at the loop's largest shape, every position a target:
    the most a training micro-step can hold."""
    if rows is not None:
        fullest = sorted(rows, key=lambda r: -sum(int(examples.lengths[i]) for i in r))[:micro_batch_size]
    else:
        fullest = [[int(i)] for i in torch.argsort(examples.lengths, descending=True)[:micro_batch_size]]
    batch = collate(examples, fullest, rows is not None, device, fixed_length=max_seq_length,
                    fixed_rows=micro_batch_size)
    batch["targets"] = batch["targets"].clamp(min=0)
    return batch


def probe_step(gpt: GPT, a, batch: dict, training_loss: Callable, make_optimizer: Callable) -> None:
    """What the loop does with memory, once: training micro-steps (the CUDA graph's capture and a replay, or two
    eager ones), optimizer steps, a validation forward. Afterwards the LoRA weights are as they were and have no
    gradients; the optimizer stepped is the probe's own. Blocks run uncompiled (--speed.compile comes after)."""
    trainable = [p for p in gpt.parameters() if p.requires_grad]
    saved = [p.detach().cpu().clone() for p in trainable]
    optimizer = make_optimizer(a.train.optimizer, trainable, a.train.learning_rate, 0.0, batch["idx"].device)
    graphed = None
    try:
        gpt.train()
        if a.speed.cuda_graph:
            graphed = GraphedMicroStep(gpt, trainable, batch, training_loss)
            graphed(batch)
            optimizer.step()
        else:
            for _ in range(2):  # the second with the optimizer state allocated
                loss, _ = training_loss(gpt, batch)
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        gpt.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # as validate_and_log runs it
            training_loss(gpt, {"idx": batch["idx"], "targets": batch["targets"]})
    finally:
        del graphed, optimizer
        gpt.train()
        with torch.no_grad():
            for p, value in zip(trainable, saved):
                p.copy_(value)
                p.grad = None
