"""benchmarks/gpu_nf4_gemm.py's prototype kernel (NF4 decoded inside the tiles of a small-M matrix product) in Triton's
CPU interpreter: the same product as x @ W^T with W dequantized by bitsandbytes, for plain and double-quantized
scales, partial tiles in every direction, one row and several, with K split or not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_fused_nf4_matmul_equals_dequantize_then_matmul():
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", "import test_nf4_gemm; test_nf4_gemm.check()"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def check():
    import bitsandbytes.functional as BF

    from benchmarks.gpu_nf4_gemm import kernels, scales_of

    nf4_matmul = kernels()
    gen = torch.Generator().manual_seed(0)
    N, K = 80, 320  # neither a multiple of the column tile (64) nor of the K step (128)
    for nested in (False, True):
        w = torch.randn(N, K, generator=gen) * 0.02
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        dequantized = BF.dequantize_4bit(packed, state)
        assert not torch.allclose(dequantized, w, atol=1e-4)  # 4-bit: the reference is the decoded weight
        for M in (1, 5, 20):
            x = torch.randn(M, K, generator=gen)
            expected = x @ dequantized.t()
            for split_k in (1, 2, 3):
                got = nf4_matmul(x, packed, scales_of(state), state.code, (N, K), BN=64, BK=128, split_k=split_k)
                assert got.shape == (M, N) and torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (nested, M, split_k)
            half = nf4_matmul(x.half(), packed, scales_of(state), state.code, (N, K), BN=32, BK=128)
            assert torch.allclose(half.float(), expected, rtol=2e-2, atol=2e-3), (nested, M, "fp16")
