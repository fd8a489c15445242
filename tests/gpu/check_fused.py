"""On the GPU: the training speed paths give the plain path's loss and gradients (CPU tests cover the same on CPU;
the CUDA graph, the Triton kernels and compiled FlexAttention exist only here). A small random GQA model with a
sliding window, an NF4 base and LoRA on every linear, packed rows (a row of a few documents, a row of many short ones
and padding), bf16:

    python tests/gpu/check_fused.py

1. plain (the model as model.py and lora.py build it: packed rows through the dense document mask) vs the same
   weights after fast.speed_up (LoRAMatmul, lora_gated_mlp with fast/kernels.py's Triton SwiGLU kernels, compiled
   RMSNorm/RoPE/SwiGLU, packed rows through compiled FlexAttention), eager;
2. fused + checkpointing of the first blocks + CUDA graph: two replays accumulate the gradients of two micro-batches,
   which must equal the sum of the plain path's gradients for the two;
3. the same with the checkpointed blocks' inputs offloaded to pinned host memory (--speed.offload_checkpoints);
4. FP8 base matmuls (speed_up(fp8=...)): the 4-bit -> float8 decode (the Triton kernel) equals bitsandbytes'
   dequantization
   rounded to float8, the Triton per-row cast equals eager PyTorch's, the GPU's scaled matmul equals the float8 values
   multiplied out in fp32, and fused + FP8 training (eager "grad" and "all", then "all" graphed with offloaded
   checkpoints) stays near the plain path (looser: e4m3 rounding);
5. packed rows' attention alone at Mistral-7B's head shapes with a sliding window: compiled FlexAttention with the
   document BlockMask (fast/attention.py) and model.py's attention with the dense document mask, forward and
   backward, each against fp32;
and that an RMSNorm output recomputed without grad (as LoRAMatmul's backward does) equals the forward's bit for bit,
also where the forward fused the norm with the residual add before it.
Prints one JSON line per comparison (loss and the worst relative gradient error) and exits non-zero on a mismatch.
"""

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fast  # noqa: E402
from fast import fp8  # noqa: E402
from fast.memory import GraphedMicroStep  # noqa: E402
from finetune.lora import training_loss  # noqa: E402
from lora import LoRAConfig  # noqa: E402
from model import CausalSelfAttention, Config, document_mask  # noqa: E402
from benchmarks.benchmark_finetune import build, set_checkpointing  # noqa: E402


def make_batch(seed: int, mb: int, T: int, vocab: int) -> dict:
    """Packed rows as data.collate makes them: the first row holds 4 documents, the others about 30 short ones and a
    padded tail (segment -1, no target)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (mb, T), generator=g)
    targets = torch.randint(0, vocab, (mb, T), generator=g)
    targets[:, : T // 8] = -100  # a prompt
    segments = torch.zeros(mb, T, dtype=torch.long)
    for row in range(mb):
        n_cuts = 3 if row == 0 else 30
        for c in sorted(torch.randperm(T - 2, generator=g)[:n_cuts].add(1).tolist()):
            segments[row, c:] += 1
        if row:
            segments[row, T - 40:] = -1
            targets[row, T - 40:] = -100
    return {k: v.cuda() for k, v in dict(idx=idx, targets=targets, segments=segments).items()}


def check_flex_attention(flex) -> bool:
    """Compiled FlexAttention with the document BlockMask against model.py's attention with the dense mask, both
    against the same math in fp32, at Mistral-7B's head shapes (32 query heads, 8 K/V heads of 128) over 2048 tokens
    with a 512-token sliding window: documents longer than the window, one across tiles, and a padded tail."""
    from fast.attention import document_block_mask

    config = Config(name="mistral-heads", n_head=32, n_query_groups=8, n_embd=4096, sliding_window=512)
    with torch.device("meta"):
        attention = CausalSelfAttention(config)  # attend() uses no weights
    T, window = 2048, config.sliding_window
    segments = torch.repeat_interleave(torch.arange(5), torch.tensor([700, 900, 300, 100, 48])).cuda()[None]
    segments[segments == 4] = -1
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 128, device="cuda", generator=g) for h in (32, 8, 8))
    dy = torch.randn(1, 32, T, 128, device="cuda", generator=g)

    def run(fn, dtype):
        leaves = [x.to(dtype, copy=True).requires_grad_() for x in (q, k, v)]
        y = fn(*leaves)
        y.backward(dy.to(dtype))
        return [t.float() for t in (y, *(x.grad for x in leaves))]

    dense = document_mask(segments, window)
    exact = run(lambda q, k, v: attention.attend(q, k, v, dense), torch.float32)
    block_mask = document_block_mask(segments, window)
    flex_err = rel_err(run(lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True), torch.bfloat16),
                       exact)
    sdpa_err = rel_err(run(lambda q, k, v: attention.attend(q, k, v, dense), torch.bfloat16), exact)
    print(json.dumps({"check": "packed rows' attention: compiled FlexAttention (BlockMask) vs dense-mask SDPA in bf16, "
                               "each vs fp32 (output, dq, dk, dv)", "max_rel_err_flex": flex_err,
                      "max_rel_err_sdpa_bf16": sdpa_err}), flush=True)
    return flex_err < max(2 * sdpa_err, 1e-2)


def grads(params):
    return [p.grad.float().clone() for p in params]


def rel_err(a, b) -> float:
    return max(((x - y).norm() / y.norm().clamp_min(1e-12)).item() for x, y in zip(a, b))


def close(losses, reference_losses, grad_err: float, grad_tol: float = 3e-2) -> bool:
    """Losses within 1% of the plain path's, gradients within 3% (bf16 against bf16 in another kernel order; FP8
    passes its own, looser tolerance)."""
    return all(abs(a - b) / abs(b) < 1e-2 for a, b in zip(losses, reference_losses)) and grad_err < grad_tol


def decode_matches(label: str, w8: torch.Tensor, scale: torch.Tensor, reference: torch.Tensor, transpose: bool
                   ) -> bool:
    """Prints and checks one FP8 decode against bitsandbytes' fp32 dequantization `reference` rounded to float8."""
    expected = (reference / scale).to(fp8.E4M3)
    expected = expected.t() if transpose else expected
    same = (w8.float() == expected.float()).float().mean().item()
    print(json.dumps({"check": f"FP8 decode of {label} (transpose={transpose}) == bitsandbytes' dequantization "
                               "rounded to float8", "fraction_equal": same}), flush=True)
    return same > 0.9999  # fp32 products in another order may tip a rare tie


def check_fp8_kernels(net, kernels: fp8.Kernels) -> bool:
    """The Triton decode against bitsandbytes, the Triton per-row cast against eager PyTorch, and torch._scaled_mm
    against fp32 math on the same float8 values (`kernels`: the FP8 kernels speed_up chose)."""
    import copy

    import bitsandbytes.functional as BF

    ok = True
    for N, K in ((4096, 4096), (14336, 4096)):  # Mistral-7B's shapes too: a wrong decode once passed the small ones
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        state.dtype = torch.float32
        reference = BF.dequantize_4bit(packed, state)
        for transpose in (False, True):
            w8, scale = kernels.decode_4bit(packed, state.absmax, state.code, (N, K), transpose)
            ok &= decode_matches(f"a random {N}x{K} NF4 weight", w8, scale, reference, transpose)
    for name in ("attn.qkv", "mlp.proj"):
        base = net.blocks[0].get_submodule(name).base
        state = copy.copy(base.weight.quant_state)
        state.dtype = torch.float32
        reference = BF.dequantize_4bit(base.weight.data, state)
        for transpose in (False, True):
            w8, scale = fp8.weight_fp8(base, transpose, kernels)
            ok &= decode_matches(name, w8, scale, reference, transpose)
        x = torch.randn(1000, base.in_features, device="cuda", dtype=torch.bfloat16)
        x[1] *= 1000
        x8, x_scale = kernels.cast_rows(x)  # the Triton kernel
        plain8, plain_scale = fp8.cast_rows(x)  # eager PyTorch
        same = (x8.float() == plain8.float()).float().mean().item()
        print(json.dumps({"check": f"FP8 per-row cast (Triton) == eager PyTorch, {base.in_features} columns",
                          "fraction_equal": same, "scales_equal": torch.equal(x_scale, plain_scale)}), flush=True)
        ok &= same > 0.9999 and torch.equal(x_scale, plain_scale)
        w8, scale = fp8.weight_fp8(base, False, kernels)
        y = fp8.scaled_mm(x, w8, scale, torch.bfloat16, kernels).float()  # casts x as above, then multiplies
        expected = (x8.float() * x_scale) @ (w8.float() * scale).t()
        err = ((y - expected).norm() / expected.norm()).item()
        print(json.dumps({"check": f"FP8 scaled matmul ({name}) vs fp32 on the same float8 values", "rel_err": err}),
              flush=True)
        ok &= err < 1e-2  # bf16 output rounding only
    return ok


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("tests/gpu/check_fused.py needs a CUDA GPU")
    config = Config(name="check", block_size=512, vocab_size=1000, n_layer=4, n_head=8, n_query_groups=2, n_embd=512,
                    intermediate_size=1408, sliding_window=192)

    def make_net():  # the same random weights each time
        torch.manual_seed(0)
        net = build(config, "bnb.nf4-dq", LoRAConfig(r=16, alpha=16, dropout=0.0), "cuda", torch.bfloat16)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return net

    plain_net, net = make_net(), make_net()
    b1, b2 = make_batch(1, 2, 512, config.vocab_size), make_batch(2, 2, 512, config.vocab_size)
    assert not torch.equal(document_mask(b1["segments"], config.sliding_window), document_mask(b1["segments"]))

    def eager(model, batch):
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        loss, _ = training_loss(model, batch, select_targets=False)
        loss.backward()
        return loss.item(), grads(params)

    plain1, plain2 = eager(plain_net, b1), eager(plain_net, b2)
    fast.speed_up(net)  # on the GPU: compiled elementwise ops, the Triton kernels and compiled FlexAttention
    params = [p for p in net.parameters() if p.requires_grad]
    masks = []  # what each model's first attention layer is given
    hooks = [m.blocks[0].attn.register_forward_pre_hook(lambda module, args: masks.append(type(args[3]).__name__))
             for m in (net, plain_net)]
    fused1 = eager(net, b1)
    eager(plain_net, b1)
    for hook in hooks:
        hook.remove()
    flex_in_use = masks == ["BlockMask", "Tensor"]
    print(json.dumps({"check": "the trainer's training_loss gives packed rows to the sped-up model as a BlockMask "
                              "(FlexAttention) and to the plain one as a dense mask", "masks": masks}), flush=True)
    ok = flex_in_use
    triton_in_use = net.blocks[0].mlp.proj.kernels.triton_mlp
    print(json.dumps({"check": "speed_up's self-check accepted fast/kernels.py's Triton SwiGLU kernels on this GPU",
                      "ok": triton_in_use}), flush=True)
    ok &= triton_in_use
    err = rel_err(fused1[1], plain1[1])
    row = {"check": "fused vs plain", "loss_plain": plain1[0], "loss_fused": fused1[0], "max_rel_grad_err": err}
    ok &= close([fused1[0]], [plain1[0]], err)
    print(json.dumps(row), flush=True)

    # LoRAMatmul recomputes RMSNorm outputs in backward (no-grad compiled kernel) instead of keeping the forward's
    # (training kernel): the two must agree bit for bit
    x = torch.randn(2, 512, config.n_embd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm = net.blocks[0].norm_1
    y = norm(x)
    with torch.no_grad():
        same = torch.equal(y.detach(), norm.forward(x.detach()))
    print(json.dumps({"check": "RMSNorm recomputed (no grad) == forward (compiled)", "equal": same}), flush=True)
    ok &= same
    # ... also after the residual add it is fused with (FastBlock: norm_2.add_forward): recomputed from the stored sum
    s, y = net.blocks[0].norm_2.add_forward(x, torch.randn_like(x))
    with torch.no_grad():
        same = torch.equal(y.detach(), net.blocks[0].norm_2.forward(s.detach()))
    print(json.dumps({"check": "RMSNorm of a residual add recomputed from the sum == forward (compiled)",
                      "equal": same}), flush=True)
    ok &= same
    summed = [a + b for a, b in zip(plain1[1], plain2[1])]
    for n_ckpt, offload in ((2, False), (3, True)):
        set_checkpointing(net, f"p{n_ckpt}" + ("o" if offload else ""))
        mode = f"{n_ckpt} of 4 blocks checkpointed" + (", inputs offloaded to pinned host memory" if offload else "")
        if offload:  # eager first: the copies on their own stream without a graph
            loss, g = eager(net, b1)
            err = rel_err(g, plain1[1])
            print(json.dumps({"check": f"eager (fused, {mode}) vs plain", "loss_plain": plain1[0], "loss": loss,
                              "max_rel_grad_err": err}), flush=True)
            ok &= close([loss], [plain1[0]], err)
        for p in params:
            p.grad = None
        graphed = GraphedMicroStep(net, params, b1, loss_fn=training_loss)
        l1 = graphed(b1).item()
        l2 = graphed(b2).item()
        err = rel_err(grads(params), summed)
        row = {"check": f"cuda graph (fused, {mode}), 2 replays accumulated vs plain",
               "loss_plain": [plain1[0], plain2[0]], "loss_graph": [l1, l2], "max_rel_grad_err": err}
        ok &= close([l1, l2], [plain1[0], plain2[0]], err)
        print(json.dumps(row), flush=True)
        del graphed

    set_checkpointing(net, "0")
    fp8_grads = None
    for mode in ("grad", "all"):
        fast.speed_up(net, fp8=mode)  # again: new settings, and the FP8 kernels checked on this GPU
        if mode == "grad":
            kernels = net.blocks[0].attn.qkv.kernels.fp8
            triton_in_use = kernels.decode_4bit is not fp8.decode_4bit and kernels.cast_rows is not fp8.cast_rows
            print(json.dumps({"check": "speed_up's self-check accepted the Triton decode and cast on this GPU",
                              "ok": triton_in_use}), flush=True)
            ok &= triton_in_use and check_fp8_kernels(net, kernels)
        loss, fp8_grads = eager(net, b1)
        err = rel_err(fp8_grads, plain1[1])
        print(json.dumps({"check": f"eager (fused, FP8 {mode}) vs plain", "loss_plain": plain1[0], "loss": loss,
                          "max_rel_grad_err": err}), flush=True)
        ok &= close([loss], [plain1[0]], err, grad_tol=0.25)
    set_checkpointing(net, "p3o")
    for p in params:
        p.grad = None
    graphed = GraphedMicroStep(net, params, b1, loss_fn=training_loss)
    loss = graphed(b1).item()
    err = rel_err(grads(params), fp8_grads)
    print(json.dumps({"check": "cuda graph (fused, FP8 all, 3 of 4 blocks checkpointed and offloaded) vs eager FP8",
                      "loss": loss, "max_rel_grad_err": err}), flush=True)
    ok &= err < 3e-2
    # last: its shapes differ from the model's, and a compiled function that has seen two shapes recompiles for
    # dynamic ones, which the checks above should not run
    ok &= check_flex_attention(net.blocks[0].attn.kernels.flex_attention)
    # The smaller tiles that GPUs with about 100 KB of shared memory per block fall back to: valid options, same result
    from torch.nn.attention.flex_attention import flex_attention
    from fast.attention import SMALL_TILES
    ok &= check_flex_attention(functools.partial(torch.compile(flex_attention, dynamic=False),
                                                 kernel_options=SMALL_TILES))
    print("gpu_check_fused:", "OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
