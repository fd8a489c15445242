"""Where one decode step's time goes, against what its weight reads alone would take.

    PYTHONPATH=.wheels/train_site python3 benchmarks/profile_decode.py

First the attention of one decode token alone (see attention_ms). Then a random Mistral-7B (bf16, on the GPU): for each
variant of the fast decode step (generate/fast_decode.py) and each (rows, keys) bucket, the median time of a captured
step's replay (CUDA events, after warm-up); for the first variant, the kernels of the step run uncaptured under
torch.profiler, grouped by name (GPU time only, so launch gaps do not count). Floors for comparison: the step's bytes
over the measured copy bandwidth, and the same matrix products (every block's and the head's, on the bucket's rows)
captured alone in one CUDA graph. Variants: shipped (the server's step), or + joined changes to it: sdpa (model.attend
instead of decode_attention), nocdt (no coordinate-descent tuning for the one-row graph), wide (that tuning searching
every direction at radius 2), eagerwrite (the cache write as eager kernels outside the compiled block, as before).
`--quantize bnb.nf4-dq` profiles the 4-bit base instead (its products through --fused_4bit's kernel, as served; the
floor's products through it too), `--lora true` with an unmerged random adapter over it.
"""

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate import fast_decode  # noqa: E402

InGraphWrite, shipped_attention, SHIPPED_ONE_ROW = (fast_decode.DecodeView, fast_decode.decode_attention,
                                                    dict(fast_decode.ONE_ROW_COMPILE))
WIDE = {"coordinate_descent_check_all_directions": True, "coordinate_descent_search_radius": 2}


def sdpa(q, k, v, mask):
    from model import CausalSelfAttention

    return CausalSelfAttention.attend(None, q, k, v, mask)


class EagerWrite(fast_decode.DecodeView):
    """The cache write as eager kernels outside the compiled block (a graph break), as the server did before."""

    @torch.compiler.disable
    def forward(self, input_pos, k, v):
        return super().forward(input_pos, k, v)


def replay_ms(graph, reps: int = 50) -> float:
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_floor_ms(model, rows: int, fused: list = ()) -> float:
    """The step's linear layers alone, on `rows` rows, captured in one graph; a 4-bit layer through its entry of
    `fused` (fast_decode.fused_4bit_layers) where it has one, as the step runs it (with its adapter, if any)."""
    kernel = {id(getattr(layer, "base", layer)): f for _, _, layer, f in fused}  # an adapter's: its NF4 layer's
    linears = [kernel.get(id(m), m) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(rows, m.in_features, device="cuda", dtype=torch.bfloat16) for m in linears}
    for m in linears:
        m(inputs[m.in_features])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for m in linears:
            m(inputs[m.in_features])
    return replay_ms(graph)


def attention_ms(model: str, shapes, reps: int = 50) -> None:
    """One decode token's attention for every layer (each its own cache, as in a step), captured in one graph:
    model.attend (SDPA with the engine's boolean mask, which picks cuDNN's kernel on an H100) against the fast step's
    decode_attention compiled as the step compiles it, each with its error against fp32."""
    from generate.fast_decode import decode_attention
    from model import Config

    c = Config.from_name(model)
    n_head, n_kv, hs = c.n_head, c.n_query_groups, c.head_size
    slots, positions = max(b for b, _ in shapes), 2049
    caches = [(torch.randn(slots, n_kv, positions, hs, device="cuda", dtype=torch.bfloat16),
               torch.randn(slots, n_kv, positions, hs, device="cuda", dtype=torch.bfloat16)) for _ in range(c.n_layer)]
    kernels = {"sdpa": sdpa, "decode_attention": torch.compile(decode_attention, dynamic=True)}
    for rows, keys in shapes:
        pos = torch.randint(keys // 2, keys, (rows,), device="cuda")
        mask = (torch.arange(keys, device="cuda") <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        q = torch.randn(rows, n_head, 1, hs, device="cuda", dtype=torch.bfloat16)
        views = [(k[:rows, :, :keys], v[:rows, :, :keys]) for k, v in caches]
        reference = kernels["sdpa"](q.float(), views[0][0].float(), views[0][1].float(), mask)
        line = []
        for name, fn in kernels.items():
            error = ((fn(q, *views[0], mask).float() - reference).norm() / reference.norm()).item()
            for _ in range(2):
                [fn(q, k, v, mask) for k, v in views]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                [fn(q, k, v, mask) for k, v in views]
            line.append(f"{name} {replay_ms(graph, reps) * 1e3 / len(views):.1f} us (error {error:.1e})")
        print(f"attention {rows}x{keys}, per layer: " + "; ".join(line), flush=True)


def main(model: str = "Mistral-7B-v0.1", variants: str = "shipped,sdpa,sdpa+nocdt+eagerwrite",
         shapes: str = "1x256,32x256,1x2048,32x1024", attention_shapes: str = "1x256,32x256,1x2048,32x2048",
         n_layer: int = 0, top: int = 12, profile_one_row: bool = False, quantize: Optional[str] = None,
         lora: bool = False) -> None:
    """Args:
        model: a registered config.
        variants: comma-separated; each is shipped or joins with + what it changes: sdpa, nocdt, wide, eagerwrite
            (empty: none).
        shapes: rows x keys buckets, comma-separated.
        attention_shapes: rows x keys for the attention kernels alone (empty: none).
        n_layer: fewer layers (0: the model's).
        top: kernels listed in the profile.
        profile_one_row: profile the one-row buckets of every variant, not only of the first.
        quantize: a 4-bit mode (bnb.nf4-dq): profile the quantized base, through the 4-bit kernel as served.
        lora: an unmerged random LoRA adapter over the (quantized) base, as serve_table's +lora rows.
    """
    import torch._dynamo

    from benchmarks.benchmark_server import build_random_model, random_checkpoint
    from benchmarks.serve_table import add_random_adapter, copy_bandwidth, quantized_copy, weight_bytes
    from generate.engine import Engine
    from tokenizer import Tokenizer

    def parse(text):
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s.strip()]

    if attention_shapes:
        attention_ms(model, parse(attention_shapes))
    if not variants:
        return
    folder = random_checkpoint(model, Path(tempfile.mkdtemp()) / "random", n_layer or None)
    gpt = build_random_model(folder, "cuda", torch.bfloat16)
    if quantize:
        gpt = quantized_copy(gpt, quantize, "cuda", torch.bfloat16)
    if lora:
        add_random_adapter(gpt)
    engine = Engine(gpt, Tokenizer(folder), max_seq_length=2048, decode="compiled", fused_4bit=True)
    with torch.inference_mode():
        engine._install_caches()
    fused = engine._fast.fused  # empty unless 4-bit (and the kernel passed its start-up check)
    if quantize:
        print(f"{quantize}: {len(fused)} layers through the 4-bit kernel" if fused else
              f"{quantize}: the 4-bit kernel is off (see the warning above); bitsandbytes' products")
    bandwidth = copy_bandwidth("cuda")
    buckets = parse(shapes)
    weights = weight_bytes(gpt)
    kv_per_key = 2 * gpt.config.n_layer * gpt.config.n_query_groups * gpt.config.head_size * 2
    print(f"{model}: {weights / 1e9:.2f} GB of weights read per step; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for rows, keys in buckets:
        floor = (weights + rows * keys * kv_per_key) / bandwidth * 1e3
        print(f"  {rows}x{keys}: bytes/bandwidth {floor:.2f} ms; matmuls alone "
              f"{matmul_floor_ms(gpt, rows, fused):.2f} ms")

    with torch.inference_mode():
        decoder = engine._fast
        chosen = [v.strip() for v in variants.split(",") if v.strip()]
        try:
            for variant in chosen:
                parts = variant.split("+")
                torch._dynamo.reset()
                fast_decode.ONE_ROW_COMPILE = {**SHIPPED_ONE_ROW, **(WIDE if "wide" in parts else {})}
                if "nocdt" in parts:
                    decoder._block = torch.compile(fast_decode._call_block, dynamic=True)
                else:
                    decoder._block = decoder._compiled_block()
                decoder._graphs.clear()
                decoder._views.clear()
                fast_decode.DecodeView = EagerWrite if "eagerwrite" in parts else InGraphWrite
                decoder.attention = sdpa if "sdpa" in parts else shipped_attention
                for rows, keys in buckets:
                    decoder.tokens.zero_()
                    decoder.positions.zero_()
                    decoder.positions[:rows] = keys - 1
                    graph, _ = decoder._capture((rows, keys))
                    ms = replay_ms(graph)
                    tokens_s = rows * 1e3 / ms
                    print(f"{variant:24s} {rows:3d} rows x {keys:5d} keys: {ms:.3f} ms/step, {tokens_s:,.0f} tokens/s")
                    if variant == chosen[0] or (rows == 1 and profile_one_row):
                        profile(decoder, (rows, keys), top)
        finally:  # the module as shipped again
            fast_decode.ONE_ROW_COMPILE, fast_decode.DecodeView = dict(SHIPPED_ONE_ROW), InGraphWrite


def profile(decoder, shape, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        decoder._forward(*shape)
    torch.cuda.synchronize()
    steps = 5
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder._forward(*shape)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events) / steps / 1e3
    print(f"  profile of {shape} uncaptured: {total:.3f} ms of kernel time per step, {len(events)} kernel names")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"    {e.device_time_total / steps / 1e3:7.3f} ms  {e.count // steps:4d}x  {e.key[:110]}")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
