"""The decode step's 4-bit matrix products as one Triton kernel that decodes NF4 inside its tiles (`--fused_4bit`).

A decode step reads every weight once. bitsandbytes multiplies a 4-bit weight by one row through its gemv_4bit kernel
and by more rows by dequantizing the whole weight to bf16 first (writing and reading a bf16 copy of every weight per
step); the serving table measured both far from the bandwidth bound of the 4-bit bytes (docs/serving.md). Here each
program holds a BN-column slice of W and one of `split_k` parts of K; per step it loads one block of scales' worth of
bytes (BN x 32 for blocks of 64), turns them into the code table's values in x's dtype, multiplies them with the rows
of x on the tensor cores (W's tile as the wide operand; rows padded to 16), and scales the product's sums by the
block's scale (double-quantized scales decoded in the kernel too). Splitting K gives a product with few rows enough
programs to keep the memory system busy; the last program of a column tile to finish sums the parts (`steps`).
One row of bf16 or fp16 (a lone stream's step) runs gemv_kernel instead, on the CUDA cores, where the tensor cores'
tiles would be 15/16 padding; one row of fp32 stays with bitsandbytes' gemv_4bit.

A first design, which read the table with tl.gather and scaled every weight, was bound by the instructions that decode
the weights and ran at 15-23% of an H100's bandwidth (docs/speed/h100_2026-12-06_nf4_kernel.md). Now on a GPU the scale
is applied once per block and output, and the table read by byte permutes in the tensor-core kernel (`lookup_program`:
6.5 instructions per weight value in its main loop, against 23; benchmarks/nf4_kernel_sass.py, compiled for sm_90 on a
CPU) and by warp shuffles in the one-row kernel (`shuffle_program`: 4.0). On an H100 a block's products at 32 rows then
take as long as cuBLAS's on bf16 weights, half bitsandbytes' time, still about a fifth of the bandwidth. Shuffles cut
the one-row kernel's time by 15%; in the tensor-core kernel they counted fewer instructions too (5.2) but took 3-10%
more time. Hardware counters say why fewer instructions stopped paying (benchmarks/nf4_kernel_ncu.py): neither kernel is
bound by issue or by one pipe any more (issue slots 33-37% busy, no pipe above half its rate); their warps wait on
loads, barriers and fixed latencies, and too few are resident to hide it (registers and shared memory allow 19-25%
occupancy, 16-22% achieved). Register caps of 64-96 for the one-row kernel were never among its fastest
configurations (at K in 8 parts; why is not measured); fewer, longer programs were, for the widest weights (K in 4
parts, _one_row_parts). Loads in flight and the per-program work around the loop are what to change next, not the
instruction count (docs/serving.md).
The tensor-core kernel rounds the table's values to x's dtype before the scale rather than after it, as bitsandbytes
does, and the one-row kernel keeps them in fp32: differences of rounding, within the start-up check's limit.

The layout is bitsandbytes' (`Params4bit` data and `QuantState`): the flattened (out, in) weight two codes per byte,
high nibble first, one scale per block of `blocksize` consecutive values. Checked against dequantize-then-matmul in
Triton's CPU interpreter (tests/test_nf4_matmul.py; the PTX lookups by simulating their instructions there) and, on
a GPU, by `self_check` before use; timed against bitsandbytes by benchmarks/gpu_nf4_gemm.py.
"""
import functools
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


def available(device: torch.device) -> bool:
    """Triton runs on CUDA GPUs, and on the CPU in its interpreter (TRITON_INTERPRET=1, set before triton's import)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def lookup_program() -> List[Tuple[str, ...]]:
    """The 16-entry code table as byte permutes (the tensor-core kernel's): PTX instructions (op, destination, sources)
    that turn one 32-bit register of 4 weight bytes ($4) into one 32-bit register per byte ($0-$3): its high nibble's
    16-bit table word in the low half, its low nibble's in the high half (W[n, 2c], W[n, 2c + 1], in the order a
    product reads them). `prmt` picks 4 bytes out of 8 by 4 selectors of 3 bits: a nibble's low 3 bits select among
    entries 0-7 and among 8-15 of one byte plane of the table (its words' low or high bytes), its top bit picks between
    the two. About 3 instructions per value, where a gather costs a shuffle and its bounds checks. The table's 8
    quarters (plane 0's 4 registers, then plane 1's: kernel_table) are operands after the bytes' register, 4 apart
    (pack=4 passes 4 registers per 32-bit argument; the first is used): the compiler keeps them in registers across the
    kernel's loop, where as immediates it re-made them at every use (7.5 instructions per value in the loop, against
    6.5). Checked on the CPU by simulating these instructions (tests/test_nf4_matmul.py), on a GPU by `self_check`."""
    # the source's nibbles, low to high: l0 h0 l1 h1 | l2 h2 l3 h3 (byte j = h_j << 4 | l_j); group a is the low half
    program = [("and.b32", "sa", "$4", "0x7777"), ("shr.b32", "sb", "$4", "16"), ("and.b32", "sb", "sb", "0x7777")]
    for g, shift in (("a", "1"), ("b", "17")):  # per byte: 4 + position when the nibble's top bit is set, else position
        program += [("shr.b32", f"h{g}", "$4", shift), ("and.b32", f"h{g}", f"h{g}", "0x4444"),
                    ("or.b32", f"h{g}", f"h{g}", "0x3210")]
    for p in range(2):
        program += [("mov.b32", f"t{r}", f"${5 + 4 * (4 * p + r)}") for r in range(4)]
        for g in "ab":  # g{p}: byte p of the group's 4 values, in its nibbles' order
            program += [("prmt.b32", "lo", "t0", "t1", f"s{g}"), ("prmt.b32", "hi", "t2", "t3", f"s{g}"),
                        ("prmt.b32", f"{g}{p}", "lo", "hi", f"h{g}")]
    for g, byte in (("a", 0), ("b", 2)):  # per byte, its words from the two planes: value 2j + 1 is h_j, 2j is l_j
        for j in (byte, byte + 1):
            h, l = 2 * (j - byte) + 1, 2 * (j - byte)
            program += [("prmt.b32", f"${j}", f"{g}0", f"{g}1", f"0x{4 + l}{l}{4 + h}{h}")]
    return program


def shuffle_program() -> List[Tuple[str, ...]]:
    """The 16-entry code table read by warp shuffles (gemv_kernel's): PTX instructions (op, destination, sources) that
    turn one 32-bit register of 4 weight bytes ($8) into their 8 values in fp32 ($0-$7), in K's order (byte j = h << 4
    | l holds W[n, 2j] in h, W[n, 2j + 1] in l). Lane i of the warp loads the table's entry i mod 16 from the address
    given as two 32-bit halves ($9, $10); each value is then a shuffle from the lane its nibble names:
    `shfl.sync.idx` reads the lane from the low 5 bits of its index, so the register shifted to put the nibble lowest
    will do, whatever bit lies above it. A shift and a shuffle per value, where byte permutes into fp32 took 6.3
    instructions per value in the kernel's loop and these 4.0; the entry is loaded inside the PTX because a lane's
    value made outside it can be moved to another thread's register by a change of the tensor's layout. Every lane of
    the warp must run each shuffle: the kernel calls it outside any branch that differs between lanes. Checked on the
    CPU by simulating these instructions (tests/test_nf4_matmul.py), on a GPU by `self_check`."""
    program = [("mov.u32", "i", "%laneid"), ("and.b32", "i", "i", "15"), ("mul.wide.u32", "a", "i", "4"),
               ("mov.b64", "t", "{$9, $10}"), ("add.s64", "a", "a", "t"), ("ld.global.nc.b32", "e", "[a]")]
    for j in range(4):
        for r, shift in ((2 * j, 8 * j + 4), (2 * j + 1, 8 * j)):
            if shift:
                program.append(("shr.b32", "s", "$8", str(shift)))
            program.append(("shfl.sync.idx.b32", f"${r}", "e", "s" if shift else "$8", "31", "-1"))
    return program


def table_words(code: List[float], dtype: torch.dtype) -> List[int]:
    """The code table in a 16-bit dtype, as the bits of each value."""
    return torch.tensor(code, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32).bitwise_and(
        0xFFFF).tolist()


# where each 16-bit dtype's 8 quarters start in kernel_table, after the 16 fp32 values
TABLE_AT = {dtype: 16 + 8 * i for i, dtype in enumerate((torch.bfloat16, torch.float16))}


@functools.lru_cache(maxsize=None)
def kernel_table(code: Tuple[float, ...]) -> Tuple[int, ...]:
    """The kernels' `table` argument, int32: the 16 values in fp32 (gemv_kernel's), then the 8 quarters of the table
    in bf16 and in fp16 (the tensor-core kernel's byte permutes' operands, at TABLE_AT[dtype]). Made once per code
    table, which every NF4 layer of a model shares."""
    def quarters(words: List[int]) -> List[int]:
        return [sum(((words[4 * r + e] >> 8 * p) & 0xFF) << 8 * e for e in range(4))
                for p in range(2) for r in range(4)]

    table = torch.tensor(code, dtype=torch.float32).view(torch.int32).tolist() + [
        q for dtype in TABLE_AT for q in quarters(table_words(list(code), dtype))]
    return tuple(v - (1 << 32) if v >= 1 << 31 else v for v in table)


@functools.lru_cache(maxsize=None)
def lookup_ptx(one_row: bool = False) -> str:
    """The text of one inline-asm block, the same for every table: shuffle_program for the one-row kernel, else
    lookup_program."""
    return ptx_text(shuffle_program() if one_row else lookup_program())


def ptx_text(program: List[Tuple[str, ...]]) -> str:
    names = sorted({r for _, *regs in program for r in regs if r[0].isalpha()})
    wide = sorted({regs[0] for op, *regs in program if op.endswith("64") or ".wide." in op})  # 64-bit results
    return " ".join(["{", f".reg .b32 {', '.join(n for n in names if n not in wide)};",
                     *([f".reg .b64 {', '.join(wide)};"] if wide else []),
                     *(f"{op} {', '.join(regs)};" for op, *regs in program), "}"])


# steps()'s functions: the kernels call them by these global names (the interpreter sees no closures)
address = block_scale = finish = None


@functools.lru_cache(maxsize=None)
def steps():
    """The steps both kernels share. block_scale: the scales of W's blocks at `block` (QLoRA's double quantization:
    8-bit codes of the scales, one fp32 scale per BLOCKSIZE2 of them). finish: a program's fp32 sums over its part of
    K, `acc`, at `offsets` of the (M, N) output. With K in parts, each program writes its part to `parts` and takes a
    ticket for its column tile; the last of the tile's programs to arrive adds the parts in their order and writes the
    output in its dtype, then resets the ticket to 0 for the next call (a CUDA graph's replay included). Written and
    read at once, the parts stay in the L2 cache, where a sum by the caller wrote and read every product's output in
    fp32 once per part through memory (docs/serving.md). address: a pointer as the two 32-bit halves shuffle_program
    takes."""
    import triton
    import triton.language as tl

    global address, block_scale, finish

    @triton.jit
    def address_fn(pointer):
        where = pointer.to(tl.int64, bitcast=True)
        return where.to(tl.int32), (where >> 32).to(tl.int32)

    @triton.jit
    def block_scale_fn(absmax, absmax2, code2, offset, block, mask, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
        if NESTED:
            scale = tl.load(code2 + tl.load(absmax + block, mask=mask, other=0).to(tl.int32))
            scale = scale * tl.load(absmax2 + block // BLOCKSIZE2, mask=mask, other=0.0) + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=mask, other=0.0)
        return scale

    @triton.jit
    def store_sum_fn(acc, out, parts, tickets, tile, offsets, mask, part, n_parts, size):
        if n_parts == 1:
            tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)
        else:
            tl.store(parts + part * size + offsets, acc, mask=mask)
            tl.debug_barrier()  # every thread's part written before the ticket releases it to the other programs
            if tl.atomic_add(tickets + tile, 1, sem="acq_rel") == n_parts - 1:
                total = tl.zeros_like(acc)
                for p in range(n_parts):  # from the L2 cache: an SM's L1 may hold an earlier call's parts
                    total += tl.load(parts + p * size + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out + offsets, total.to(out.dtype.element_ty), mask=mask)
                tl.atomic_xchg(tickets + tile, 0)

    address, block_scale, finish = address_fn, block_scale_fn, store_sum_fn


@functools.lru_cache(maxsize=None)
def kernel():
    """Defined on first call, so that a process started with TRITON_INTERPRET=1 runs it on the CPU."""
    import triton
    import triton.language as tl

    steps()

    @triton.jit
    def nf4_matmul_kernel(x, packed, absmax, code, table, absmax2, code2, offset, lora_a, lora_b, scaling, seg1, seg2,
                          out, parts, tickets, M, N, K, K_PART, N_PARTS,
                          BM: tl.constexpr, BN: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                          NESTED: tl.constexpr, PRECISION: tl.constexpr, PTX: tl.constexpr, TABLE_AT: tl.constexpr,
                          R: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)  # output columns = rows of W
        part = tl.program_id(1)
        rows = tl.arange(0, BM)
        acc = tl.zeros((BN, BM), dtype=tl.float32)  # W's tile is the wide operand of the product (BN >= 64 rows)
        if R > 0:  # an adapter's A times this part of K of x, beside the weight's product on the same tiles of x
            ranks = tl.arange(0, R)
            # the tile's segment of columns (adapter_segments; seg1 = seg2 = N without): its own R rows of A
            segment = (tl.program_id(0) * BN >= seg1).to(tl.int32) + (tl.program_id(0) * BN >= seg2).to(tl.int32)
            a_rows = segment * R + ranks
            xa = tl.zeros((R, BM), dtype=tl.float32)
        if PTX is None:  # the gather's table in registers
            values = tl.broadcast_to(tl.load(code + tl.arange(0, 16)).to(x.dtype.element_ty)[None, :], (BN, 16))
        else:  # the table's quarters in x's dtype, loaded once: the byte permutes' operands
            quarters = [tl.load(table + TABLE_AT + i) for i in (0, 1, 2, 3, 4, 5, 6, 7)]
        # One block of scales per step: rows are whole blocks (K % BLOCKSIZE == 0), so no step runs past K
        for k0 in range(part * K_PART, tl.minimum((part + 1) * K_PART, K), BLOCKSIZE):
            ks = k0 + tl.arange(0, BLOCKSIZE)
            xs = tl.load(x + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
            half = k0 // 2 + tl.arange(0, BLOCKSIZE // 2)  # byte c of a row holds W[n, 2c] (high nibble), W[n, 2c + 1]
            byte = tl.load(packed + cols[:, None].to(tl.int64) * (K // 2) + half[None, :], mask=cols[:, None] < N,
                           other=0)
            scale = block_scale(absmax, absmax2, code2, offset, (cols.to(tl.int64) * K + k0) // BLOCKSIZE, cols < N,
                                NESTED, BLOCKSIZE2)
            if PTX is not None:  # the table as byte permutes (lookup_ptx), 4 bytes per call
                pair = tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r" + ",r" * 32,
                                                 [byte] + [tl.full(byte.shape, q, tl.int32) for q in quarters],
                                                 dtype=tl.int32, is_pure=True, pack=4)
                hi = pair.to(tl.int16).to(xs.dtype, bitcast=True)
                lo = (pair >> 16).to(tl.int16).to(xs.dtype, bitcast=True)
            else:
                hi = tl.gather(values, byte.to(tl.int32) >> 4, axis=1)
                lo = tl.gather(values, byte.to(tl.int32) & 15, axis=1)
            w = tl.interleave(hi, lo)  # (BN, BLOCKSIZE), k in order: the code values, in x's dtype
            # the block's scale applied to the product's sums: once per column and row instead of once per weight
            acc += tl.dot(w, tl.trans(xs), input_precision=PRECISION) * scale[:, None]
            if R > 0:
                xa += tl.dot(tl.load(lora_a + a_rows[:, None] * K + ks[None, :]), tl.trans(xs),
                             input_precision=PRECISION)
        if R > 0:  # B's tile times this part's scaling A x, rounded to x's dtype once (unfused: A x, then the scaling)
            b = tl.load(lora_b + cols[:, None] * R + ranks[None, :], mask=cols[:, None] < N, other=0.0)
            acc += tl.dot(b, (xa * scaling).to(b.dtype), input_precision=PRECISION)
        finish(acc, out, parts, tickets, tl.program_id(0), rows[None, :] * N + cols[:, None],
               (rows[None, :] < M) & (cols[:, None] < N), part, N_PARTS, M * N)

    return nf4_matmul_kernel


@functools.lru_cache(maxsize=None)
def gemv_kernel():
    """One row of bf16 or fp16 x: each program holds BN rows of W and one K part, and per step decodes BK values of each
    row, 8 from each 32-bit word of W's bytes, by warp shuffles from the fp32 table (lookup_ptx(one_row=True); without
    PTX, loads of the same values), multiplying them with x on the CUDA cores. Each thread keeps a sum per word
    position, scaled by its block's scale, and adds them up once, after the loop. The tensor cores' tiles would need 16
    rows, 15 of them padding here."""
    import triton
    import triton.language as tl

    steps()

    @triton.jit
    def nf4_gemv_kernel(x, packed, absmax, table, absmax2, code2, offset, out, parts, tickets, N, K, K_PART, N_PARTS,
                        BN: tl.constexpr,
                        BK: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                        PTX: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        part = tl.program_id(1)
        words = packed.to(tl.pointer_type(tl.int32))  # rows of K // 8 words: K is whole blocks of 64
        acc = tl.zeros((BN, BK // 8), dtype=tl.float32)
        low, high = address(table)  # the fp32 values: where the shuffles' lanes load their entries
        for k0 in range(part * K_PART, tl.minimum((part + 1) * K_PART, K), BK):  # K_PART and K are whole steps
            w = k0 // 8 + tl.arange(0, BK // 8)
            word = tl.load(words + cols[:, None].to(tl.int64) * (K // 8) + w[None, :], mask=cols[:, None] < N, other=0)
            # W[n, 8w + i] times x[8w + i]: value i is byte i // 2's high nibble (even i) or its low one
            if PTX is not None:  # not under a per-lane branch: the shuffles need the whole warp
                values = tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                                   [word, tl.full(word.shape, low, tl.int32),
                                                    tl.full(word.shape, high, tl.int32)],
                                                   dtype=(tl.float32,) * 8, is_pure=True, pack=1)
                prod = values[0] * tl.load(x + 8 * w).to(tl.float32)[None, :]
                for i in tl.static_range(1, 8):
                    prod += values[i] * tl.load(x + 8 * w + i).to(tl.float32)[None, :]
            else:
                prod = tl.zeros((BN, BK // 8), dtype=tl.float32)
                for i in tl.static_range(8):
                    nibble = (word >> (8 * (i // 2) + 4 - 4 * (i % 2))) & 15
                    prod += (tl.load(table + nibble).to(tl.float32, bitcast=True)
                             * tl.load(x + 8 * w + i).to(tl.float32)[None, :])
            block = (cols[:, None].to(tl.int64) * K + k0) // BLOCKSIZE + tl.arange(0, BK // BLOCKSIZE)[None, :]
            scale = block_scale(absmax, absmax2, code2, offset, block, cols[:, None] < N, NESTED, BLOCKSIZE2)
            acc += prod * tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, BK // BLOCKSIZE, BLOCKSIZE // 8)),
                                     (BN, BK // 8))
        finish(tl.sum(acc, axis=1), out, parts, tickets, tl.program_id(0), cols, cols < N, part, N_PARTS, N)

    return nf4_gemv_kernel


DEFAULT_SPLIT_K = 8
DEFAULT_BN = 128  # the tensor cores' kernel's columns per program; adapter_segments aligns its parts to it


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               shape: Tuple[int, int], nested: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = None,
               BN: Optional[int] = None, split_k: Optional[int] = None, num_warps: Optional[int] = None,
               num_stages: Optional[int] = None,
               lookup: bool = False, BK: Optional[int] = None, table: Optional[torch.Tensor] = None,
               tickets: Optional[torch.Tensor] = None,
               lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
               lora_starts: Optional[Sequence[int]] = None, maxnreg: Optional[int] = None) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, for a bitsandbytes 4-bit W of `shape` (N, K): `packed` its bytes, `absmax`
    its block scales (fp32, or their 8-bit codes when `nested` = (absmax2, code2, offset, blocksize2) holds the double
    quantization), `code` its 16-value table (in x's dtype in the tensor cores' kernel, in fp32 in the one-row kernel).
    One row of bf16 or fp16 runs gemv_kernel, more rows or fp32 the tensor cores' kernel. BN: columns of W per program,
    num_warps, num_stages (defaults 32, 2, 3 for one row, 128, 4, 4 for more, 2 stages with an adapter of 64 ranks or
    more); BK: values of K per step of the one-row kernel (default the most of 256, 128 or 64 that divide K); split_k: K
    parts, each summed by its own programs (default 8, for one row _one_row_parts; benchmarks/gpu_nf4_gemm.py times the
    choices; the kernel sums the parts, steps). lookup: decode the nibbles by byte permutes, for one row by warp
    shuffles (CUDA only: lookup_ptx; 16-bit x only, fp32 rows take the gather), else by a gather (one row: loads of the
    table). table: kernel_table(code) as an int32 tensor on x's device (made here if None, which reads `code` back to
    the host: pass it when capturing a graph). tickets: int32 zeros, one per tile of BN columns or more, that the kernel
    leaves at zero (made here if None). lora: an adapter's (A, B, scaling) added in the tensor cores' kernel, x @ W^T +
    scaling * (x @ A^T) @ B^T: A (R, K) and B (N, R) in x's dtype, R a power of 2 of at least 16 (pad_adapter); not for
    one row of bf16 or fp16. lora_starts: where the adapter's 2nd and 3rd segments of columns start (adapter_segments:
    then A is (segments x R, K) and each column uses its own segment's R rows); multiples of BN. maxnreg: the most
    registers a thread may use (ptxas' own choice if None or 0): at 168 ptxas keeps the table's quarters in registers
    where by its own choice it copies them from uniform registers before each use (benchmarks/nf4_kernel_sass.py
    --maxnreg)."""
    import triton

    N, K = shape
    M = x.size(0)
    blocksize = N * K // absmax.numel()
    if K % blocksize:
        raise ValueError(f"nf4_matmul: rows of {K} values must be whole blocks of {blocksize}")
    one_row = _one_row(M, x.dtype)
    step = (BK or _gemv_step(K, blocksize)) if one_row else blocksize
    if K % step or step % blocksize:
        raise ValueError(f"nf4_matmul: BK {step} must be whole blocks of {blocksize} and divide rows of {K} values")
    R = 0 if lora is None else lora[1].size(-1)
    starts = list(lora_starts or [])
    if lora is not None and (one_row or R < 16 or R & (R - 1) or lora[0].shape != ((len(starts) + 1) * R, K)
                             or lora[1].shape != (N, R) or {lora[0].dtype, lora[1].dtype} != {x.dtype}):
        raise ValueError(f"nf4_matmul: an adapter needs several rows, A ({len(starts) + 1} x {R}, {K}) and B ({N}, "
                         f"{R}) in {x.dtype} with R a power of 2 of at least 16; got A {tuple(lora[0].shape)}, B "
                         f"{tuple(lora[1].shape)}, {M} rows of {x.dtype}")
    if one_row and packed.data_ptr() % 4:  # gemv_kernel reads the bytes as 32-bit words
        raise ValueError("nf4_matmul: one row needs the packed weight at an address divisible by 4; pass a copy")
    # An adapter of 64 ranks (qkv with r 16 on q, k and v) makes each pipeline stage's tiles of A as large as W's: at
    # four stages shared memory leaves room for two programs per SM, which slowed the product far more than the
    # adapter's own work (docs/serving.md, benchmarks/gpu_nf4_gemm.py --adapter_rank 16); 32 ranks are unmeasured.
    # adapter_segments gives Mistral's and Llama's qkv 16 ranks a tile instead (R is per segment)
    BN, num_warps, num_stages = [given or default for given, default in zip(
        (BN, num_warps, num_stages), (32, 2, 3) if one_row else (DEFAULT_BN, 4, 4 if R < 64 else 2))]
    if len(starts) > 2 or starts != sorted(set(starts)) or any(not 0 < s < N or s % BN for s in starts):
        raise ValueError(f"nf4_matmul: lora_starts {starts} must be at most 2 increasing columns inside {N}, "
                         f"multiples of BN {BN} (a tile's columns in one segment)")
    tiles = triton.cdiv(N, BN)
    if split_k is None:
        split_k = _one_row_parts(tiles, x.device) if one_row else DEFAULT_SPLIT_K
    k_part, n_parts = _k_parts(K, step, split_k)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    parts = torch.empty((n_parts if n_parts > 1 else 0, M, N), device=x.device, dtype=torch.float32)
    absmax2, code2, offset, blocksize2 = nested if nested is not None else (absmax, code, code, 1)
    if table is None:
        table = torch.tensor(kernel_table(tuple(code.tolist())), dtype=torch.int32, device=x.device)
    if tickets is None:
        tickets = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    if tickets.numel() < tiles:  # one per column tile: fewer would let programs count on another tile's ticket
        raise ValueError(f"nf4_matmul: {tickets.numel()} tickets for {tiles} tiles of {BN} columns")
    # the byte permutes' words are 16-bit: fp32 rows read the table by gather (before, they failed to compile and the
    # start-up check left their products to bitsandbytes)
    lookup = lookup and x.dtype in TABLE_AT
    # fused multiply-adds asked for, not left to Triton's default, which 3.10 turns off (the counts assume them)
    common = dict(BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested is not None, num_warps=num_warps,
                  num_stages=num_stages, PTX=lookup_ptx(one_row) if lookup else None, enable_fp_fusion=True,
                  **({"maxnreg": maxnreg} if maxnreg else {}))
    if one_row:
        gemv_kernel()[(tiles, n_parts)](
            x.contiguous(), packed.reshape(-1), absmax, table, absmax2.float(),
            code2.float(), offset.float(), out, parts, tickets, N, K, k_part, n_parts, BN=BN, BK=step, **common)
    else:
        lora_a, lora_b, scaling = lora if lora is not None else (x, x, 0.0)  # unread when R is 0
        kernel()[(tiles, n_parts)](
            x.contiguous(), packed.reshape(-1), absmax, code.float(), table, absmax2.float(), code2.float(),
            offset.float(), lora_a.contiguous(), lora_b.contiguous(), float(scaling), *(starts + [N, N])[:2], out,
            parts, tickets, M, N, K,
            k_part, n_parts, BM=max(16, triton.next_power_of_2(M)), BN=BN, R=R,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", TABLE_AT=TABLE_AT.get(x.dtype, 0), **common)
    return out


def _one_row(rows: int, dtype: torch.dtype) -> bool:
    """Whether gemv_kernel takes the product: its table is fp32 and it reads x in fp32, so any 16-bit x will do (timed
    in bf16 only, docs/serving.md). One fp32 row stays with bitsandbytes' gemv."""
    return rows == 1 and dtype in (torch.bfloat16, torch.float16)


def _gemv_step(K: int, blocksize: int) -> int:
    return next((step for step in (256, 128, 64) if K % step == 0 and step % blocksize == 0), blocksize)


def _one_row_parts(tiles: int, device: torch.device) -> int:
    """K parts for one row: 4 where that still gives every SM 5 programs, else 8. On an H100 (132 SMs; docs/serving.md)
    4 parts took 6-12% less time than 8 for Mistral-7B's qkv and fc (192 and 448 tiles of 32 columns, 5.8 and 13.6
    programs an SM), and more for proj and down (128 tiles, 3.9 programs an SM); the threshold of 5 lies between, and
    the reason is inferred: fewer parts make longer programs, each with the same work before and after its loop, and
    fewer parts to sum, while too few programs leave SMs idle. Other GPUs and shapes are unmeasured."""
    if device.type != "cuda":
        return DEFAULT_SPLIT_K
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 if tiles * 4 >= 5 * _sm_count(index) else DEFAULT_SPLIT_K


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _k_parts(K: int, step: int, split_k: int) -> Tuple[int, int]:
    """K per part (whole steps) and how many parts: at most split_k."""
    k_part = -(-K // max(1, min(split_k, K // step)) // step) * step
    return k_part, -(-K // k_part)


# An operator of its own, so that torch.compile treats the kernel launch as one opaque call with a known output shape.
# `tickets` is written during the call but left as it was (zeros), so the operator declares no mutation.
@torch.library.custom_op("oneday::nf4_matmul", mutates_args=())
def nf4_matmul_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                  n: int, k: int, blocksize2: int, lookup: bool, table: torch.Tensor, tickets: torch.Tensor,
                  lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                  scaling: float = 0.0, lora_starts: Optional[List[int]] = None) -> torch.Tensor:
    nested = (absmax2, code2, offset, blocksize2) if absmax2 is not None else None
    lora = (lora_a, lora_b, scaling) if lora_a is not None else None
    return nf4_matmul(x, packed, absmax, code, (n, k), nested, lookup=lookup, table=table, tickets=tickets, lora=lora,
                      lora_starts=lora_starts)


@nf4_matmul_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, n, k, blocksize2, lookup, table, tickets, lora_a=None,
      lora_b=None, scaling=0.0, lora_starts=None):
    return x.new_empty((x.size(0), n))


def scales_of(state) -> Tuple[torch.Tensor, Optional[tuple]]:
    """nf4_matmul's `absmax` and `nested` for a bitsandbytes QuantState: the fp32 block scales and None, or with
    double quantization their 8-bit codes and (absmax2, code2, offset, blocksize2)."""
    if not state.nested:
        return state.absmax.float(), None
    state2 = state.state2
    return state.absmax, (state2.absmax.float(), state2.code.float(), state.offset.float().reshape(1), state2.blocksize)


def padded_rank(r: int) -> int:
    """r ranks padded to a power of 2 of at least 16: the tensor cores' smallest product."""
    return max(16, 1 << (r - 1).bit_length())


def pad_adapter(A: torch.Tensor, B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A (R, K) and B (N, R) with zero ranks added up to padded_rank(R); the same tensors when R is one already."""
    R = A.size(0)
    padded = padded_rank(R)
    if padded == R:
        return A, B
    return torch.cat([A, A.new_zeros(padded - R, A.size(1))]), torch.cat([B, B.new_zeros(B.size(0), padded - R)], 1)


def adapter_segments(A: torch.Tensor, B: torch.Tensor, parts: Sequence[Tuple[int, int]], r: int,
                     align: int = DEFAULT_BN) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[int]]]:
    """A frozen adapter's A (n_parts x r, K) and placed B (N, n_parts x r; block-diagonal over its parts, lora.place_B)
    as the tensor cores' kernel takes them: (A, B, lora_starts). Each column uses only its own part's r ranks, so where
    the 2nd and 3rd parts start, in order, at multiples of `align` (whole tiles of the kernel's columns), part i gets a
    segment of its own: A's rows i x R to (i + 1) x R, and B (N, R) holds each column's own ranks, R =
    padded_rank(r). A tile then reads R rows of A instead of every part's: for q, k and v at r 16, 16
    instead of 48 padded to 64, whose tiles filled shared memory at four pipeline stages (docs/serving.md). Elsewhere
    (one part, or parts off the tiles, as SmolLM2's 576 q rows): pad_adapter's layout, and no starts."""
    firsts = [start for start, _ in parts]
    starts = firsts[1:]
    if not 1 < len(parts) <= 3 or any(start % align for start in starts) or firsts != sorted(set(firsts)):
        return (*pad_adapter(A, B), None)
    R = padded_rank(r)
    segments, compact = A.new_zeros(len(parts) * R, A.size(1)), B.new_zeros(B.size(0), R)
    for i, (start, end) in enumerate(parts):
        segments[i * R:i * R + r] = A[i * r:(i + 1) * r]
        compact[start:end, :r] = B[start:end, i * r:(i + 1) * r]
    return segments, compact, starts


def segments_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, starts: Optional[Sequence[int]]) -> torch.Tensor:
    """(x A^T) B^T in adapter_segments' layout, plainly: each segment's columns from its own rows of A."""
    edges, R = [0, *(starts or []), B.size(0)], B.size(1)
    return torch.cat([(x @ A[i * R:(i + 1) * R].t()) @ B[start:end].t()
                      for i, (start, end) in enumerate(zip(edges, edges[1:]))], dim=-1)


class FusedNF4Linear(nn.Module):
    """A bitsandbytes NF4 Linear4bit's forward through nf4_matmul_op, on the same bytes (nothing copied but the small
    code tables, in fp32). The fast decode step puts it in the layer's place for the step (generate/fast_decode.py).

    With `adapter`, a frozen LoRALinear (lora.freeze_lora) over `layer`, it stands in for the adapter's layer: several
    rows in the frozen dtype take the adapter's products inside the kernel, where two small matrix products of their
    own per layer and step, each a launch and a pass over the output, cost a 30-stream step much of its time
    (docs/serving.md); one row, or another dtype, adds the adapter's delta as LoRALinear does."""

    def __init__(self, layer: nn.Module, adapter: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.adapter = adapter
        if adapter is not None:
            lora_a, lora_b, self.lora_starts = adapter_segments(adapter.served_A, adapter.served_B, adapter.parts,
                                                                adapter.r)
            self.register_buffer("lora_a", lora_a, persistent=False)
            self.register_buffer("lora_b", lora_b, persistent=False)
        state = layer.weight.quant_state
        absmax, nested = scales_of(state)
        absmax2, code2, offset, self.blocksize2 = nested if nested is not None else (None, None, None, 1)
        self.register_buffer("packed", layer.weight.data, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("code", state.code.float(), persistent=False)
        self.register_buffer("absmax2", absmax2, persistent=False)
        self.register_buffer("code2", code2, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.bias, self.quant_state, self.compute_dtype = layer.bias, state, layer.compute_dtype
        self.out_features, self.in_features = layer.out_features, layer.in_features
        # the PTX lookups where they can run (the CPU interpreter runs no PTX); the table made once, here: reading the
        # code back from the GPU at every call would stop a CUDA graph's capture
        self.lookup = self.packed.is_cuda
        self.register_buffer("table", torch.tensor(kernel_table(tuple(state.code.tolist())), dtype=torch.int32,
                                                   device=self.packed.device), persistent=False)
        self.register_buffer("tickets", torch.zeros(-(-self.out_features // 16), dtype=torch.int32,
                                                    device=self.packed.device), persistent=False)

    def product(self, rows: torch.Tensor,
                lora: Optional[Tuple[torch.Tensor, torch.Tensor, float, Optional[List[int]]]] = None):
        """rows @ W^T through the kernel, plus an adapter's (A, B, scaling, starts) product (nf4_matmul's lora and
        lora_starts)."""
        return nf4_matmul_op(rows, self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset,
                             self.out_features, self.in_features, self.blocksize2, self.lookup, self.table,
                             self.tickets, *(lora or ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        rows = x.reshape(-1, x.size(-1))
        inside = self.adapter is not None and rows.size(0) > 1 and rows.dtype == self.lora_a.dtype
        if rows.size(0) == 1 and not _one_row(1, rows.dtype):  # fp32: gemv_kernel is for 16-bit rows
            # bitsandbytes' gemv_4bit, as Linear4bit.forward calls it: in the layer's compute dtype, the output back in
            # the input's
            y = bnb.matmul_4bit(rows.to(self.compute_dtype or rows.dtype), self.packed.t(),
                                quant_state=self.quant_state).to(x.dtype)
        else:
            y = self.product(rows, (self.lora_a, self.lora_b, self.adapter.scaling, self.lora_starts) if inside
                             else None)
        y = y.view(*x.shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y + self.adapter.lora_delta(x) if self.adapter is not None and not inside else y


def is_nf4(layer: nn.Module) -> bool:
    """A bitsandbytes NF4 layer whose rows are whole blocks of scales (every real model's are)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return (state is not None and getattr(state, "quant_type", None) == "nf4" and layer.weight.dim() == 2
            and layer.in_features % state.blocksize == 0)


def self_check(layers: List[Tuple[nn.Module, "FusedNF4Linear"]], dtype: torch.dtype) -> Optional[str]:
    """None if the kernel agrees with bitsandbytes on this device, else why not: (layer, its FusedNF4Linear) pairs, one
    of each shape checked, at 1, 3 and 17 rows in `dtype` (one row: gemv_kernel in bf16 and fp16, else bitsandbytes' own
    gemv), against the same rows times bitsandbytes' dequantized weight in fp32. Both sum in fp32; they differ by
    rounding: the output's to `dtype` (1.7e-3 in bf16) and the weights' (bitsandbytes rounds code x scale to `dtype`,
    the tensor-core kernel the code before the scale, the one-row kernel neither: together 2.7e-3 in bf16 on an H100 for
    every Mistral-7B shape, benchmarks/gpu_nf4_gemm.py, as simulated on a CPU by benchmarks/nf4_kernel_sass.py
    --rounding true), so the limit is half the dtype's epsilon (3.9e-3 in bf16): a misread nibble or scale throughout is
    off by about 1, one wrong tile of 64 columns in the widest weight (14336) by a few 1e-2. A layer with an adapter
    adds its delta, in fp32, to what is expected; as a trained adapter's delta may be too small to tell, the kernel's
    adapter products are checked again with a random adapter of the same ranks and layout (adapter_segments) whose
    delta is as large as the weight's product. Triton's CPU interpreter computes bf16 products wrongly (2026-12,
    Triton 3.9): there a bf16 model fails the check."""
    import bitsandbytes.functional as BF

    limit = 1e-3 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    shapes = {(m.out_features, m.in_features, f.adapter is not None and (f.lora_a.size(0), str(f.lora_starts))): (m, f)
              for m, f in layers}
    for layer, fused in shapes.values():
        nf4 = layer.base if fused.adapter is not None else layer
        w = BF.dequantize_4bit(nf4.weight.data, nf4.weight.quant_state)
        for rows in (1, 3, 17):
            x = torch.randn(rows, nf4.in_features, device=w.device).to(dtype)
            # fp32 a slice of W at a time: a whole fp32 copy of the widest weight would raise the server's start-up
            # peak by hundreds of MB, on a card that may have no more to spare
            product = torch.cat([x.float() @ part.float().t() for part in w.split(1024)], dim=-1)
            expected = product + (0 if nf4.bias is None else nf4.bias.float())
            if fused.adapter is not None:
                expected = expected + fused.adapter.lora_delta(x.float())
            got = [("", fused(x), expected)]
            if fused.adapter is not None and rows > 1:
                A, B = torch.randn_like(fused.lora_a), torch.randn_like(fused.lora_b)
                delta = segments_delta(x.float(), A.float(), B.float(), fused.lora_starts)
                scaling = (product.norm() / delta.norm()).item()
                got.append((", a random adapter", fused.product(x, (A, B, scaling, fused.lora_starts)),
                            product + scaling * delta))
            for what, y, reference in got:
                error = ((y.float() - reference).norm() / reference.norm()).item()
                if not error < limit:
                    return (f"the kernel is off from bitsandbytes by {error:.1e} ({rows} rows, weight "
                            f"{tuple(w.shape)}{what})")
    return None


def fused_layers(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module, FusedNF4Linear]]:
    """(parent, attribute, layer, its FusedNF4Linear) for every bitsandbytes NF4 layer of `model`; where the layer has
    a frozen, unmerged adapter (a LoRALinear over it, lora.freeze_lora), the adapter's layer in its place."""
    from lora import LoRALinear

    def frozen(layer: nn.Module) -> bool:
        return (isinstance(layer, LoRALinear) and layer.served_A is not None and not layer.merged
                and is_nf4(layer.base))

    return [(parent, name, layer, FusedNF4Linear(layer.base, layer) if frozen(layer) else FusedNF4Linear(layer))
            for parent in model.modules() if not frozen(parent) for name, layer in parent.named_children()
            if frozen(layer) or is_nf4(layer)]
