"""How many GPU instructions generate/nf4_matmul.py's kernel spends per weight value, found without a GPU: the kernel is
compiled ahead of time for a CUDA architecture by Triton's own compiler and ptxas (both in the triton wheel), and the
instructions of its main loop counted in the disassembly.

    python benchmarks/nf4_kernel_sass.py --arch 90 --configs 128x16x4,64x16x4
    python benchmarks/nf4_kernel_sass.py --source old_nf4_matmul.py    # another version of the file, to compare

Why: the decode step's 4-bit products were measured bound by the instructions that decode the weights, not by memory
(docs/speed/h100_2026-12-06_nf4_kernel.md): at a Mistral-7B block's size an H100 issues about 930 billion warp
instructions a second, so each instruction per weight value costs about 7 microseconds a block, against 37 for
reading the block's 4-bit bytes at the copy bandwidth. Counting them is a check anyone can re-run on a CPU; the time
itself is benchmarks/gpu_nf4_gemm.py's, on a GPU. One JSON line per configuration: loop instructions, per weight
value, registers per thread, shared memory, and the most frequent instructions.

    python benchmarks/nf4_kernel_sass.py --rounding true

instead prints what the kernel's rounding does to the server's start-up check (nf4_matmul.self_check), also without a
GPU: the tensor-core kernel rounds the code table to the model's dtype and keeps the block's scale in fp32 (the one-row
kernel keeps both in fp32), bitsandbytes rounds code x scale; the check's measure for both roundings, against the
output's rounding alone and the check's limit.
"""

import collections
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load(source: Path):
    spec = importlib.util.spec_from_file_location("nf4_source", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_instructions(sass: str) -> list:
    """The instructions of the longest backward branch's body: the kernel's main loop."""
    code = [(int(m.group(1), 16), m.group(2)) for line in sass.splitlines()
            if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line))]
    index = {address: i for i, (address, _) in enumerate(code)}
    loops = [(index[target], i) for i, (address, text) in enumerate(code) if "BRA" in text
             for target in [int(t, 16) for t in re.findall(r"0x([0-9a-f]+)", text)[-1:]]
             if target < address and target in index]
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    return [text.split()[1] if text.startswith("@") else text.split()[0] for _, text in code[first:last + 1]]


def rounding_error(size: int = 4096) -> None:
    """self_check's measure (relative error against the rows times bitsandbytes' dequantized weight, in fp32) for a
    random size x size NF4-dq weight, computed as the kernel computes: the code table in the dtype, the block's scale
    and the sums in fp32, the output rounded to the dtype."""
    import bitsandbytes.functional as BF

    torch.manual_seed(0)
    packed, state = BF.quantize_4bit(torch.randn(size, size) * 0.02, blocksize=64, quant_type="nf4",
                                     compress_statistics=True)
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).long().reshape(size, size)
    scales = (BF.dequantize_blockwise(state.absmax, state.state2) + state.offset).repeat_interleave(64)
    scales = scales.reshape(size, size)
    for dtype in (torch.bfloat16, torch.float16):
        bitsandbytes_w = (state.code[nibbles] * scales).to(dtype).float()  # its dequantize: code x scale, rounded
        kernel_w = state.code.to(dtype).float()[nibbles] * scales
        for rows in (3, 17):  # as self_check
            x = torch.randn(rows, size).to(dtype).float()
            expected = x @ bitsandbytes_w.t()

            def error(y: torch.Tensor) -> float:
                return round(((y.to(dtype).float() - expected).norm() / expected.norm()).item(), 6)

            print(json.dumps({"dtype": str(dtype), "rows": rows, "weight": [size, size],
                              "kernel_rounding": error(x @ kernel_w.t()), "output_rounding_alone": error(expected),
                              "limit": torch.finfo(dtype).eps / 2}))


def ptx(nf4, code: tuple, one_row: bool):
    """The lookup's PTX text, as each version of the file makes it (older ones: none, one per table and dtype, or
    byte permutes into fp32 for one row)."""
    if not hasattr(nf4, "lookup_ptx"):
        return None
    if not hasattr(nf4, "kernel_table"):
        return nf4.lookup_ptx(code, torch.bfloat16)
    if "fp32" in inspect.signature(nf4.lookup_ptx).parameters:
        return nf4.lookup_ptx(fp32=one_row)
    return nf4.lookup_ptx(one_row)


def main(source: Path = Path("generate/nf4_matmul.py"), arch: int = 90, configs: str = "128x16x4,64x16x4",
         stages: int = 4, rounding: bool = False, one_row: bool = False, adapter_rank: int = 0,
         maxnreg: Optional[int] = None) -> None:
    """Args:
        source: the nf4_matmul.py whose kernel() is compiled.
        arch: CUDA compute capability times ten (80 A100, 89 L4 / RTX 4090, 90 H100).
        configs: BNxBMxWARPS, comma-separated: columns of W per program, rows of x (16 is the fewest a product
            takes), warps.
        stages: software pipeline stages.
        rounding: instead of counting, print the start-up check's measure under the kernel's rounding.
        one_row: count gemv_kernel (one row of bf16) instead; configs are then BNxBKxWARPS (BK: values of K per
            step).
        adapter_rank: with an adapter's products in the kernel, of this many ranks (a power of 2, 16 or more).
        maxnreg: the most registers per thread ptxas may use (nf4_matmul's maxnreg; None: its own choice).
    """
    if rounding:
        return rounding_error()
    import bitsandbytes.functional
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    nf4 = load(source)
    kernel = nf4.gemv_kernel() if one_row else nf4.kernel()
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    nf4_code = tuple(bitsandbytes.functional.get_4bit_type("nf4", device="cpu").tolist())
    pointers = {"x": "*bf16", "packed": "*u8", "absmax": "*u8", "code": "*fp32", "table": "*i32", "absmax2": "*fp32",
                "code2": "*fp32", "offset": "*fp32", "lora_a": "*bf16", "lora_b": "*bf16", "out": "*bf16",
                "parts": "*fp32", "tickets": "*i32"}
    pointers = {name: kind for name, kind in pointers.items() if name in kernel.arg_names}
    signature = {**pointers, **{n: "i32" for n in ("seg1", "seg2", "M", "N", "K", "K_PART", "N_PARTS")
                                if n in kernel.arg_names},
                 **({"scaling": "fp32"} if "scaling" in kernel.arg_names else {})}
    for config in configs.split(","):
        BN, BM, warps = (int(v) for v in config.split("x"))  # BM is BK for one_row
        # the constants each version of the kernel takes (older ones: a K step BK and an IEEE switch)
        known = {"BM": BM, "BN": BN, "BK": BM if one_row else 128, "BLOCKSIZE": 64, "BLOCKSIZE2": 256,
                 "NESTED": True, "IEEE": False, "PRECISION": "tf32", "SWAP": True,
                 "PTX": ptx(nf4, nf4_code, one_row), "TABLE_AT": getattr(nf4, "TABLE_AT", {torch.bfloat16: 24})[
                     torch.bfloat16], "R": adapter_rank}
        constants = {name: known[name] for name in kernel.arg_names if name in known}
        # what a launch specializes: pointers and sizes divisible by 16 (N, K and the K part are, in every model)
        divisible = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]]
                     for n in [*pointers, "N", "K", "K_PART"]}
        compiled = triton.compile(
            ASTSource(fn=kernel, signature={**signature, **{n: "constexpr" for n in constants}}, constexprs=constants,
                      attrs=divisible),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True,
                     **({} if maxnreg is None else {"maxnreg": maxnreg})})
        with tempfile.TemporaryDirectory() as folder:  # a file of its own: the tests run this script too
            cubin = Path(folder) / f"nf4_kernel_sm{arch}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True,
                                  check=True).stdout
            usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                                   text=True, check=True).stdout
        loop = loop_instructions(sass)
        # values a thread decodes per loop step: the step's BN x (K step) weights over the program's threads
        values = BN * (BM if one_row else constants.get("BK", 64)) // (32 * warps)
        print(json.dumps({"source": str(source), "arch": arch, "BN": BN, "BM": BM, "warps": warps, "stages": stages,
                          "loop_instructions": len(loop), "per_value": round(len(loop) / values, 1),
                          "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                          "shared_bytes": compiled.metadata.shared,
                          "most_frequent": collections.Counter(loop).most_common(8)}), flush=True)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
