"""generate/nf4_matmul.py (NF4 decoded inside the tiles of the decode step's matrix products, --fused_4bit) in Triton's
CPU interpreter, each check in a fresh process (the interpreter must be on before triton is imported):
- the kernel equals x @ W^T with W dequantized by bitsandbytes, for plain and double-quantized scales, partial tiles in
  every direction, one row and several, K split or not (its parts summed by the kernel, its tickets left at zero), fp32,
  fp16, and one row of bf16 and fp16 (the one-row kernel); with an adapter's products added in it (ranks padded to 16),
  and qkv's adapter with each part's ranks in a segment of their own (adapter_segments);
- with their PTX lookups (byte permutes, warp shuffles) emulated lane by lane in place of the inline assembly the
  interpreter cannot run, both kernels give the same products, and the lookups ran;
- the fast decode step with the kernel in place of bitsandbytes' NF4 layers, alone, with an unmerged LoRA adapter (its
  products in the kernel) and torch.compile'd, gives the plain step's answers, and puts bitsandbytes' layers back
  after each step;
and in this process: the PTX, simulated alone, decodes every byte in every position; both kernels assemble for sm_90
with it (ptxas, on the CPU); a kernel that fails or disagrees with bitsandbytes, at start or mid-serving, is not used.
Triton 3.9's interpreter computes bf16 products wrongly, so these run fp32 and fp16; on a GPU the start-up check
(nf4_matmul.self_check) covers bf16."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def interpreted(check: str) -> None:
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", f"import test_nf4_matmul; test_nf4_matmul.{check}()"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_kernel_equals_dequantize_then_matmul():
    interpreted("check_kernel")


def test_kernels_with_their_ptx_lookups_equal_dequantize_then_matmul():
    interpreted("check_lookups")


def test_fast_step_with_the_kernel_gives_the_plain_answers():
    interpreted("check_fast_step")


def test_adapter_segments_give_each_tile_its_own_parts_ranks():
    interpreted("check_adapter_segments")


@pytest.mark.parametrize("one_row", [True, False])
def test_kernels_and_their_ptx_assemble_for_sm90(one_row):
    """Each kernel compiled ahead of time for an H100 (sm_90) on this CPU by Triton and the wheel's ptxas
    (benchmarks/nf4_kernel_sass.py): its inline PTX assembles as ptx_text writes it (register widths included), and
    its main loop holds the lookup's instructions: a shuffle per value in the one-row kernel (BN 32 x BK 256 over 64
    threads: 128 a thread), byte permutes in the tensor-core kernel."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel has no ptxas")
    args = ["--one_row", "true", "--configs", "32x256x2"] if one_row else ["--configs", "128x16x4"]
    done = subprocess.run([sys.executable, "benchmarks/nf4_kernel_sass.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    frequent = dict(counts["most_frequent"])
    if one_row:
        assert frequent.get("SHFL.IDX") == 128, frequent
    else:
        assert frequent.get("PRMT", 0) >= 64 and "SHFL.IDX" not in frequent, frequent


def run_ptx(program, registers: dict, lane: int = 0, memory: Optional[dict] = None,
            shuffled: Optional[List[int]] = None) -> dict:
    """The registers of one lane after `program` (lookup_program's or shuffle_program's PTX instructions), starting
    from `registers`, by the PTX manual's rules for mov (%laneid, a 64-bit register from two 32-bit halves), and, or,
    shr, mul.wide, add.s64, prmt (each output byte picked out of the 8 bytes of its two sources by a 3-bit selector; a
    selector's fourth bit, sign replication, must never be set here), ld (from `memory`, 32-bit words by byte address)
    and shfl.sync.idx (the source register's value in the lane that the index's low 5 bits name, every lane taking
    part: `shuffled`, the 32 lanes' values of that register)."""
    registers = dict(registers)

    def value(operand: str) -> int:
        return registers[operand] if operand in registers else int(operand, 0)

    for op, destination, *sources in program:
        if op == "shfl.sync.idx.b32":
            index, *rest = [value(s) for s in sources[1:]]
            assert rest == [31, -1], "clamp 31 and every lane's mask: the whole warp is one segment"
            registers[destination] = shuffled[index & 31]
            continue
        if op == "mov.u32" and sources == ["%laneid"]:
            registers[destination] = lane
            continue
        if op == "mov.b64":
            low, high = sources[0].strip("{}").split(", ")
            registers[destination] = value(low) | value(high) << 32
            continue
        if op == "ld.global.nc.b32":
            registers[destination] = memory[registers[sources[0].strip("[]")]]
            continue
        a, *rest = [value(s) for s in sources]
        if op == "prmt.b32":
            both, selectors = a | rest[0] << 32, rest[1]
            assert not selectors & 0x8888, "sign replication"
            a = sum(((both >> 8 * (selectors >> 4 * i & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op != "mov.b32":
            a = {"and.b32": a & rest[0], "or.b32": a | rest[0], "shr.b32": a >> rest[0], "mul.wide.u32": a * rest[0],
                 "add.s64": a + rest[0]}[op]
        registers[destination] = a & (0xFFFFFFFFFFFFFFFF if op in ("mul.wide.u32", "add.s64") else 0xFFFFFFFF)
    return registers


def warp_entries(program, registers: dict, memory) -> List[int]:
    """What each of the 32 lanes holds after running `program` up to its first load (the lane's table entry): the
    values its shuffles then read (run_ptx's `shuffled`)."""
    load = next(i for i, (op, *_) in enumerate(program) if op.startswith("ld."))
    return [run_ptx(program[:load + 1], registers, lane, memory)[program[load][1]] for lane in range(32)]


def test_byte_permute_lookup_decodes_every_byte_in_every_position():
    """The tensor-core kernel's PTX (lookup_program), simulated: for every byte value at each of the 4 positions of the
    input register, both nibbles' table values, in bf16 and in fp16, land in the byte's output register, high nibble
    first."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as BF

    from generate.nf4_matmul import TABLE_AT, kernel_table, lookup_program, table_words

    code = BF.get_4bit_type("nf4", device="cpu").tolist()
    table = kernel_table(tuple(code))
    for dtype in (torch.bfloat16, torch.float16):
        words = table_words(code, dtype)
        assert torch.tensor(words, dtype=torch.int32).to(torch.int16).view(dtype).equal(torch.tensor(code).to(dtype))
        quarters = {f"${5 + 4 * i}": q & 0xFFFFFFFF for i, q in enumerate(table[TABLE_AT[dtype]:][:8])}
        program = lookup_program()
        for first in range(256):
            data = [(first + 97 * j) % 256 for j in range(4)]  # every byte value once per position
            registers = run_ptx(program, {"$4": int.from_bytes(bytes(data), "little"), **quarters})
            for j, byte in enumerate(data):
                assert registers[f"${j}"] == words[byte >> 4] | words[byte & 15] << 16, (dtype, j, byte)
            # as the kernel reads them: the low half is W[n, 2c], the high half W[n, 2c + 1]
            pairs = torch.tensor([registers[f"${j}"] for j in range(4)], dtype=torch.int64)
            halves = torch.stack([pairs & 0xFFFF, pairs >> 16], 1).reshape(-1).to(torch.int32).to(torch.int16)
            nibbles = torch.tensor([[b >> 4, b & 15] for b in data]).reshape(-1)
            assert halves.view(dtype).equal(torch.tensor(code).to(dtype)[nibbles]), (dtype, data)


def test_shuffle_lookup_decodes_every_byte_in_every_position():
    """The one-row kernel's PTX (shuffle_program), simulated for a whole warp with kernel_table at an address above
    4 GB: each lane loads its entry (lane mod 16) through the address's two halves, then for every byte value at each
    of the 4 positions of the input register both nibbles' fp32 code values come out in K's order, byte j's high
    nibble first."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as BF

    from generate.nf4_matmul import kernel_table, shuffle_program

    code = BF.get_4bit_type("nf4", device="cpu").tolist()
    table = kernel_table(tuple(code))
    program = shuffle_program()
    base = 0x7F12_3456_7000
    memory = {base + 4 * i: v & 0xFFFFFFFF for i, v in enumerate(table)}
    loads = [i for i, (op, *_) in enumerate(program) if op.startswith("ld.")]
    assert len(loads) == 1, "one load of the lane's entry, before any shuffle"
    address = {"$9": base & 0xFFFFFFFF, "$10": base >> 32}
    shuffled = warp_entries(program, address, memory)
    for first in range(256):
        data = [(first + 97 * j) % 256 for j in range(4)]  # every byte value once per position
        registers = run_ptx(program, {"$8": int.from_bytes(bytes(data), "little"), **address}, lane=first % 32,
                            memory=memory, shuffled=shuffled)
        nibbles = torch.tensor([[b >> 4, b & 15] for b in data]).reshape(-1)
        got = torch.tensor([registers[f"${r}"] for r in range(8)], dtype=torch.int64).to(torch.int32)
        got = got.view(torch.float32)
        assert got.equal(torch.tensor(code)[nibbles]), data


def test_start_up_check_passes_bf16_rounding_and_rejects_one_misread_tile(monkeypatch):
    """nf4_matmul.self_check in bf16, with a stand-in kernel computing what the real one does (the table rounded to
    bf16, times the block's scale, fp32 sums; the server's layer rounds the output to bf16; an adapter's x A rounded
    to bf16): that passes, with and without an adapter; the same with one 64-column tile of a 4096-wide weight 10% off
    (a misread scale there) fails, and so does a kernel that drops the adapter's products, though the adapter's own
    delta is too small to tell. The first limit, 1e-3, rejected every bf16 model."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as BF

    from generate import nf4_matmul
    from lora import LoRALinear
    from tiny_checkpoint import make_tiny_checkpoint
    from utils import load_model

    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()), n_embd=64, intermediate_size=4096)
    model = load_model(checkpoint, quantize="bnb.nf4-dq").eval()
    layer = next(m for m in model.modules() if nf4_matmul.is_nf4(m) and m.out_features == 4096)
    state = layer.weight.quant_state
    nibbles = torch.stack([layer.weight.data.reshape(-1) >> 4, layer.weight.data.reshape(-1) & 15], 1).long()
    block_scales = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset  # one per row of 64 here
    weight = state.code.bfloat16().float()[nibbles.reshape(4096, 64)] * block_scales[:, None]
    assert not torch.equal(weight.bfloat16(), BF.dequantize_4bit(layer.weight.data, state))  # rounded otherwise
    scale = torch.ones(4096)

    honours_adapter = [True]

    def kernel_like(x, packed, absmax, code, shape, nested, lookup, table, tickets, lora=None, lora_starts=None):
        assert lora_starts is None  # one part, all rows: adapter_segments keeps pad_adapter's layout
        y = x.float() @ weight.t() * scale
        if lora is not None and honours_adapter[0]:
            A, B, scaling = lora
            y = y + scaling * (x.float() @ A.float().t()).to(x.dtype).float() @ B.float().t()
        return y.to(x.dtype)

    monkeypatch.setattr(nf4_matmul, "nf4_matmul", kernel_like)
    adapter = LoRALinear(layer, r=4, alpha=8)
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.001)  # a delta of about 1e-3 of the output: below the limit
        adapter.freeze(torch.bfloat16)
        pairs = [(layer, nf4_matmul.FusedNF4Linear(layer)), (adapter, nf4_matmul.FusedNF4Linear(layer, adapter))]
        assert nf4_matmul.self_check(pairs, torch.bfloat16) is None
        honours_adapter[0] = False  # the adapter's products dropped in the kernel: the random adapter shows it
        assert "(3 rows, weight (4096, 64), a random adapter)" in nf4_matmul.self_check(pairs, torch.bfloat16)
        honours_adapter[0] = True
        scale[128:192] = 1.1
        assert "the kernel is off from bitsandbytes by" in nf4_matmul.self_check(pairs, torch.bfloat16)


def test_a_kernel_that_fails_leaves_the_products_to_bitsandbytes(monkeypatch, caplog):
    """At start (the check raises, or computes something else: bitsandbytes keeps every layer, with a warning) and
    mid-serving (a step that fails in the kernel runs again without it, before torch.compile or graphs are given up)."""
    pytest.importorskip("bitsandbytes")
    from generate import fast_decode, nf4_matmul
    from test_fast_decode import assert_same, make_engine, requests, run
    from tiny_checkpoint import make_tiny_checkpoint
    from utils import load_model

    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()), n_embd=64, intermediate_size=128)
    model = load_model(checkpoint, quantize="bnb.nf4").eval()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # nf4_matmul.available: as if Triton ran here

    def fails(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(nf4_matmul, "nf4_matmul", fails)
    assert fast_decode.fused_4bit_layers(model, torch.device("cpu")) == []
    assert "the kernel failed: RuntimeError: no kernel image" in caplog.text
    monkeypatch.setattr(nf4_matmul, "nf4_matmul", lambda x, packed, absmax, code, shape, *rest, **kwargs: x.new_zeros(
        (1, x.size(0), shape[0])))  # runs, but wrong
    assert fast_decode.fused_4bit_layers(model, torch.device("cpu")) == []
    assert "the kernel is off from bitsandbytes by 1.0e+00 (3 rows" in caplog.text

    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("illegal memory access")

    specs = requests(4, seed=2)
    alone = run(make_engine(checkpoint, "eager", model=model), specs, together=False)
    engine = make_engine(checkpoint, "static", model=model)
    with torch.inference_mode():
        engine._install_caches()
    engine._fast.fused = [(parent, name, layer, Failing()) for parent, name, layer, _ in nf4_matmul.fused_layers(model)]
    assert_same(run(engine, specs, together=True), alone, abs=1e-4)
    assert engine._fast.fused == [] and "decoding without the 4-bit kernel" in caplog.text
    assert not any(isinstance(m, Failing) for m in model.modules())


def test_one_row_takes_fewer_k_parts_only_where_every_sm_keeps_five_programs(monkeypatch):
    """One row's default K parts (nf4_matmul._one_row_parts): 4 for Mistral-7B's qkv and fc on an H100's 132 SMs (192
    and 448 tiles of 32 columns), 8 for proj and down (128 tiles) and on a GPU of twice the SMs, 8 off CUDA; and
    nf4_matmul takes it for one row of bf16 alone."""
    from generate import nf4_matmul

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(nf4_matmul, "_sm_count", lambda index: 132)
    assert [nf4_matmul._one_row_parts(tiles, gpu) for tiles in (192, 448, 128, 165, 164)] == [4, 4, 8, 4, 8]
    monkeypatch.setattr(nf4_matmul, "_sm_count", lambda index: 264)
    assert nf4_matmul._one_row_parts(192, gpu) == 8
    assert nf4_matmul._one_row_parts(448, torch.device("cpu")) == nf4_matmul.DEFAULT_SPLIT_K == 8

    # and nf4_matmul asks it for one row of bf16 only: more rows take 8, a split given is kept
    pytest.importorskip("triton")

    class Stop(Exception):
        pass

    asked = []

    def k_parts(K, step, split_k):
        asked.append(split_k)
        raise Stop  # before any kernel launches

    monkeypatch.setattr(nf4_matmul, "_one_row_parts", lambda tiles, device: 3)
    monkeypatch.setattr(nf4_matmul, "_k_parts", k_parts)
    N, K = 64, 128
    weight = (torch.zeros(N * K // 2, dtype=torch.uint8), torch.ones(N * K // 64), torch.zeros(16), (N, K))
    one_row = torch.randn(1, K).bfloat16()
    for x, split_k in ((one_row, None), (torch.randn(5, K), None), (one_row, 2)):
        with pytest.raises(Stop):
            nf4_matmul.nf4_matmul(x, *weight, split_k=split_k)
    assert asked == [3, 8, 2]


def check_kernel():
    import bitsandbytes.functional as BF

    from generate.nf4_matmul import kernel_table, nf4_matmul, pad_adapter, scales_of

    gen = torch.Generator().manual_seed(0)
    N, K = 80, 320  # not a multiple of the column tile (64); 5 blocks of 64 scales, split in parts of 2 blocks or 1
    for double_quant in (False, True):
        w = torch.randn(N, K, generator=gen) * 0.02
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        dequantized = BF.dequantize_4bit(packed, state)
        assert not torch.allclose(dequantized, w, atol=1e-4)  # 4-bit: the reference is the decoded weight
        absmax, nested = scales_of(state)
        assert (nested is not None) == double_quant
        for M in (1, 5, 20):
            x = torch.randn(M, K, generator=gen)
            expected = x @ dequantized.t()
            for split_k in (1, 2, 3):
                got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=64, split_k=split_k)
                assert got.shape == (M, N) and torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (M, split_k)
            # twice on the same tickets: the kernel leaves them at zero for the next call
            tickets = torch.zeros(3, dtype=torch.int32)
            for _ in range(2):
                got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=32, split_k=5, tickets=tickets)
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6) and not tickets.any(), M
            half = nf4_matmul(x.half(), packed, absmax, state.code, (N, K), nested, BN=32)
            assert torch.allclose(half.float(), expected, rtol=2e-2, atol=2e-3), (double_quant, M, "fp16")
        # one row of bf16 or fp16: gemv_kernel (no tensor-core products, so the interpreter computes it right),
        # against the rows times the weight it decodes (kernel_table's fp32 values times the block's scale), in fp32
        values = torch.tensor(kernel_table(tuple(state.code.tolist()))[:16], dtype=torch.int32).view(torch.float32)
        nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).long().reshape(N, K)
        scale = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
        gemv_w = values[nibbles] * scale.repeat_interleave(64).reshape(N, K)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(1, K, generator=gen).to(dtype)
            expected = x.float() @ gemv_w.t()
            for BN, BK, split_k in ((64, None, 8), (16, 64, 1), (32, 64, 3)):  # K = 320: steps of 64 only
                got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=BN, BK=BK, split_k=split_k)
                # the output in x's dtype: within its step of the fp32 sums (the interpreter's conversion truncates)
                assert got.dtype == dtype and torch.allclose(got.float(), expected, rtol=torch.finfo(dtype).eps,
                                                             atol=1e-6), (double_quant, dtype, BN, BK, split_k)
        assert torch.allclose(gemv_w, dequantized, rtol=2 ** -8, atol=1e-7)  # bitsandbytes' weight, nearly
        # several blocks of scales per step (BK 256 and 128, as on real models): a wider weight, 768 values a row;
        # against bitsandbytes' weight, within the output's bf16 step (the interpreter truncates) and its rounding
        wide, wide_state = BF.quantize_4bit(torch.randn(40, 768, generator=gen) * 0.02, blocksize=64,
                                            quant_type="nf4", compress_statistics=double_quant)
        wide_absmax, wide_nested = scales_of(wide_state)
        x = torch.randn(1, 768, generator=gen).bfloat16()
        expected = x.float() @ BF.dequantize_4bit(wide, wide_state).t()
        for BK, split_k in ((256, 1), (128, 2)):
            got = nf4_matmul(x, wide, wide_absmax, wide_state.code, (40, 768), wide_nested, BN=16, BK=BK,
                             split_k=split_k)
            error = ((got.float() - expected).norm() / expected.norm()).item()
            assert error < torch.finfo(torch.bfloat16).eps, (double_quant, BK, split_k, error)
        # an adapter's products in the same programs: 8 ranks padded to 16 by zeros, any number of K parts
        A, B = torch.randn(8, K, generator=gen) * 0.1, torch.randn(N, 8, generator=gen)
        lora = (*pad_adapter(A, B), 0.5)
        assert lora[0].shape == (16, K) and lora[1].shape == (N, 16) and pad_adapter(*lora[:2])[0] is lora[0]
        for M in (1, 5, 20):
            x = torch.randn(M, K, generator=gen)
            expected = x @ dequantized.t() + 0.5 * (x @ A.t()) @ B.t()
            for split_k in (1, 3):
                got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=64, split_k=split_k, lora=lora)
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (double_quant, M, split_k, "adapter")
            if M == 1:  # one 16-bit row is gemv_kernel's, which takes no adapter (below)
                continue
            # in fp16: A, B and x A x scaling rounded to it (the interpreter's fp16 products are right)
            half = nf4_matmul(x.half(), packed, absmax, state.code, (N, K), nested, BN=32, split_k=3,
                              lora=(lora[0].half(), lora[1].half(), 0.5))
            assert torch.allclose(half.float(), expected, rtol=2e-2, atol=5e-3), (double_quant, M, "fp16 adapter")
        for dtype in (torch.bfloat16, torch.float16):  # gemv_kernel takes one row of either, and no adapter
            with pytest.raises(ValueError, match="an adapter needs several rows"):
                nf4_matmul(x[:1].to(dtype), packed, absmax, state.code, (N, K), nested,
                           lora=(lora[0].to(dtype), lora[1].to(dtype), 0.5))
        with pytest.raises(ValueError, match="1 tickets for 3 tiles of 32 columns"):  # one per column tile
            nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=32, tickets=torch.zeros(1, dtype=torch.int32))


EMULATED = {"one row": 0, "tensor cores": 0}  # emulate_lookups' calls, by kernel


def emulate_lookups() -> None:
    """Triton's interpreter runs no inline PTX: from here on it runs the kernels' lookups (lookup_ptx) by run_ptx, as a
    warp would, 32 elements at a time as 32 lanes (the one-row kernel's lanes load their table entries from the address
    it passes: the interpreter's pointers are this process's addresses), the tensor-core kernel's with the table's
    quarters it passes as operands. So the kernels' side of the PTX (operands, their order, which output is which
    value) is checked here too, not only on a GPU."""
    import ctypes

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    from generate.nf4_matmul import lookup_program, lookup_ptx, shuffle_program

    class Memory:
        def __getitem__(self, address: int) -> int:
            return ctypes.c_uint32.from_address(address).value

    class Call:
        def __init__(self, results):
            self.results = results

        def get_result(self, i: int):
            return self.results[i]

    def create_inline_asm(builder, text, constraints, values, types, is_pure, pack):
        one_row = text == lookup_ptx(one_row=True)
        assert one_row or text == lookup_ptx(one_row=False), "only the kernels' lookups are emulated"
        EMULATED["one row" if one_row else "tensor cores"] += 1
        assert is_pure and pack == (1 if one_row else 4) and constraints == (
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r" if one_row else "=r,=r,=r,=r,r" + ",r" * 32), (constraints, pack)
        shape = values[0].data.shape
        data, *operands = (np.broadcast_to(v.data, shape).reshape(-1).astype(np.int64) & 0xFFFFFFFF for v in values)
        assert all((o == o[0]).all() for o in operands), "one table for the whole call"
        if one_row:
            program, source, outputs = shuffle_program(), "$8", 8
            given = {"$9": int(operands[0][0]), "$10": int(operands[1][0])}
            shuffled = warp_entries(program, given, Memory())
            words = data
        else:  # 4 elements' bytes to a register, the quarters in the first register of each operand's 4
            program, source, outputs, shuffled = lookup_program(), "$4", 4, None
            given = {f"${5 + 4 * i}": int(o[0]) for i, o in enumerate(operands)}
            data = np.concatenate([data, np.zeros(-len(data) % 4, np.int64)]).reshape(-1, 4)
            words = data @ np.array([1, 1 << 8, 1 << 16, 1 << 24], dtype=np.int64)
        out = np.zeros((len(words), outputs), dtype=np.uint32)
        for i, word in enumerate(words):
            registers = run_ptx(program, {source: int(word), **given}, i % 32, Memory(), shuffled)
            out[i] = [registers[f"${r}"] for r in range(outputs)]
        if one_row:
            return Call([interpreter.TensorHandle(out[:, r].copy().view(np.float32).reshape(shape), tl.float32)
                         for r in range(outputs)])
        # register j of a group is its byte j's
        return Call([interpreter.TensorHandle(out.reshape(-1)[:np.prod(shape)].view(np.int32).reshape(shape),
                                              tl.int32)])

    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm


def check_lookups():
    import bitsandbytes.functional as BF

    from generate.nf4_matmul import kernel_table, nf4_matmul, scales_of

    emulate_lookups()
    gen = torch.Generator().manual_seed(1)
    N, K = 72, 768  # several blocks of scales per step of the one-row kernel (BK 256 or 128), a partial column tile
    for double_quant in (False, True):
        packed, state = BF.quantize_4bit(torch.randn(N, K, generator=gen) * 0.02, blocksize=64, quant_type="nf4",
                                         compress_statistics=double_quant)
        absmax, nested = scales_of(state)
        table = torch.tensor(kernel_table(tuple(state.code.tolist())), dtype=torch.int32)
        dequantized = BF.dequantize_4bit(packed, state)
        x = torch.randn(5, K, generator=gen).half()
        expected = x.float() @ dequantized.t()
        for split_k in (1, 3):  # the tensor-core kernel in fp16 (the interpreter's fp16 products are right)
            before = dict(EMULATED)
            got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=32, split_k=split_k, lookup=True,
                             table=table)
            assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-3), (double_quant, split_k, "fp16")
            assert EMULATED["tensor cores"] > before["tensor cores"], "the byte permutes ran"  # not a gather
        values = table[:16].view(torch.float32)
        nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).long().reshape(N, K)
        scale = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
        x = torch.randn(1, K, generator=gen).bfloat16()
        expected = x.float() @ (values[nibbles] * scale.repeat_interleave(64).reshape(N, K)).t()
        for BN, BK, split_k in ((32, 256, 1), (16, 128, 2), (64, 64, 3)):
            for lookup in (True, False):
                before = dict(EMULATED)
                got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=BN, BK=BK, split_k=split_k,
                                 lookup=lookup, table=table)
                assert torch.allclose(got.float(), expected, rtol=2 ** -7, atol=1e-6), (double_quant, BN, BK, lookup)
                assert (EMULATED["one row"] > before["one row"]) == lookup, "the shuffles ran when asked, only then"
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed.reshape(-1)])[1:]  # a byte past a word
    with pytest.raises(ValueError, match="address divisible by 4"):
        nf4_matmul(x, shifted, absmax, state.code, (N, K), nested, table=table)


def check_adapter_segments():
    """qkv's adapter (q, k and v, r each) laid out by adapter_segments, each column tile reading its own part's ranks
    of A, against the plain stacked adapter (lora.place_B's block-diagonal B): in the kernel, any K split, parts on or
    off the tiles, some rows without an adapter; then a layer's FusedNF4Linear against its LoRALinear, eager and
    compiled."""
    import bitsandbytes.functional as BF

    from generate.nf4_matmul import FusedNF4Linear, adapter_segments, nf4_matmul, scales_of, segments_delta, self_check
    from lora import LoRALinear, place_B
    from quantize import quantized_layer, quantized_weight

    gen = torch.Generator().manual_seed(2)
    N, K, r = 256, 128, 8
    w = torch.randn(N, K, generator=gen) * 0.02
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax, nested = scales_of(state)
    product = lambda x: x @ BF.dequantize_4bit(packed, state).t()  # noqa: E731
    x = torch.randn(5, K, generator=gen)
    for parts, align, starts in (([(0, 128), (128, 192), (192, 256)], 64, [128, 192]),  # q, k, v on 64-column tiles
                                 ([(0, 128), (192, 256)], 64, [192]),  # q and v: k's rows have no adapter
                                 ([(0, 128), (128, 192), (192, 256)], 128, None),  # k starts off the tiles: padded
                                 ([[0, 128], [128, 256]], 128, [128])):  # parts as lists, 128-column tiles
        A = torch.randn(len(parts) * r, K, generator=gen) * 0.1
        B = place_B(torch.randn(sum(end - start for start, end in parts), r, generator=gen), parts, r, N)
        expected = product(x) + 0.5 * (x @ A.t()) @ B.t()
        seg_a, seg_b, got_starts = adapter_segments(A, B, parts, r, align)
        assert got_starts == starts, (parts, align)
        # 16 ranks a segment (8 padded), or every part's 24 padded to 32
        assert (seg_a.size(0), seg_b.size(1)) == (((len(starts) + 1) * 16, 16) if starts else (32, 32))
        assert torch.allclose(segments_delta(x, seg_a, seg_b, got_starts), (x @ A.t()) @ B.t(), atol=1e-5)
        for BN, split_k in ((align, 1), (align, 3), (32, 2)):  # tiles as wide as the alignment, or narrower
            got = nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=BN, split_k=split_k,
                             lora=(seg_a, seg_b, 0.5), lora_starts=got_starts)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (parts, align, BN, split_k)
    assert adapter_segments(A, B, [(128, 256), (0, 128)], r, 128)[2] is None  # parts out of order: padded
    with pytest.raises(ValueError, match=r"lora_starts \[64\] must be .* multiples of BN 128"):  # a tile across parts
        nf4_matmul(x, packed, absmax, state.code, (N, K), nested, BN=128, lora=(seg_a[:32], seg_b, 0.5),
                   lora_starts=[64])

    # a qkv layer with three parts, as the server holds it, its last tile of 128 columns half past the weight: the
    # kernel's product equals the adapter's layer, and the start-up check passes it
    layer = quantized_layer(nn.Linear(K, 320, bias=False), "bnb.nf4-dq", torch.float32)
    layer.weight = quantized_weight(layer, torch.randn(320, K, generator=gen) * 0.02, "cpu")
    adapter = LoRALinear(layer, r=r, alpha=2 * r, parts=[(0, 128), (128, 256), (256, 320)])
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.5, generator=gen)
        adapter.freeze(torch.float32)
    fused = FusedNF4Linear(layer, adapter)
    assert fused.lora_starts == [128, 256] and fused.lora_a.shape == (48, K)
    x = torch.randn(2, 3, K, generator=gen)
    expected = adapter(x)
    for forward in (fused, torch.compile(fused, fullgraph=True)):
        assert torch.allclose(forward(x), expected, rtol=1e-4, atol=1e-4)
    assert self_check([(adapter, fused)], torch.float32) is None


def check_fast_step():
    import bitsandbytes as bnb

    from generate import nf4_matmul
    from test_fast_decode import assert_same, make_engine, quantized_model, requests, run
    from tiny_checkpoint import make_tiny_checkpoint

    # Widths that are multiples of the 64-value scale blocks, as in every real model: the kernel takes only such rows
    # (bitsandbytes' CPU code lays out a row that ends inside a block otherwise than its GPU code does).
    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()), sliding_window=10, n_embd=64, intermediate_size=128)
    calls = []
    original = nf4_matmul.nf4_matmul

    def counted(*args, **kwargs):
        # the adapter's scaling where its products ran in the kernel (the start-up check's random adapter has its own)
        calls.append(kwargs["lora"][2] if kwargs.get("lora") is not None else None)
        return original(*args, **kwargs)

    nf4_matmul.nf4_matmul = counted

    def model(adapter: bool):
        return quantized_model(checkpoint, "bnb.nf4-dq", adapter)

    # a lone stream's step in bf16: the layer's one row through the operator and gemv_kernel, near bitsandbytes'
    import bitsandbytes.functional as BF

    layer = next(m for m in model(False).modules() if nf4_matmul.is_nf4(m))
    x = torch.randn(1, 1, layer.in_features).bfloat16()
    calls.clear()
    y = nf4_matmul.FusedNF4Linear(layer)(x)
    reference = x.float() @ BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().t()
    assert calls and y.dtype == torch.bfloat16 and y.shape == reference.shape
    # within bf16's step: the interpreter's conversion to bf16 truncates (a GPU's rounds: self_check takes half a step)
    assert ((y.float() - reference).norm() / reference.norm()).item() < torch.finfo(torch.bfloat16).eps

    specs = requests(5, seed=4)
    for adapter, decode in ((False, "static"), (True, "static"), (True, "compiled")):
        alone = run(make_engine(checkpoint, "eager", model=model(adapter)), specs, together=False)
        calls.clear()
        engine = make_engine(checkpoint, decode, model=model(adapter), fused_4bit=True)
        together = run(engine, specs, together=True)
        assert engine._fast.fused and calls, (adapter, decode)  # the kernel ran the step's products
        assert (2.0 in calls) == adapter, (adapter, decode)  # and the adapter's (alpha 8 / r 4), several rows at once
        assert_same(together, alone, abs=1e-4)
        layers = [m for m in engine.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == len(engine._fast.fused) and not any(
            isinstance(m, nf4_matmul.FusedNF4Linear) for m in engine.model.modules())  # bitsandbytes' layers back
