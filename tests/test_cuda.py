"""
The CUDA kernel (sparse_ffn.cu) and the torch path on a GPU against the reference: dtypes, shapes up to
Llama-3-8B's FFN, unaligned rows, nan, bad inputs, side streams and CUDA graphs, thresholds. Skipped without
a GPU. Also: sparse_ffn.cu compiles with nvcc against this torch's headers (--full; skipped without nvcc).

Run: python -m pytest -q tests/test_cuda.py   (the whole suite: python -m pytest -q; with the full grid: --full)
No network. Behaviour only: no timing is asserted anywhere; bench.py prints the numbers.
"""

import os
import shutil
import subprocess

import pytest
import torch

import build
import model as model_mod
import sparse_ffn
from testutil import DTYPES, ROOT, check_close, full_only, ref_ffn, ref_thresholded, rounded, set_sparsity, threshold_for


# -----------------------------------------------------------------------------
# CUDA (skipped without a GPU): x, out and the weights share one dtype


@pytest.fixture(scope="module")
def cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    if sparse_ffn.backends()["cuda"] is not True:  # on a GPU machine the extension must build
        ok, msg = build.build_cuda()
        assert ok, f"the CUDA kernel must build on a GPU machine: {msg}"
        sparse_ffn._mods.clear(), sparse_ffn._why.clear()  # load what was just built
    assert sparse_ffn.backends()["cuda"] is True, sparse_ffn.backends()["cuda"]
    return sparse_ffn._mods["cuda"]


def cuda_case(d, h, B, s, dtype, gen):
    """A reference FFN with sparsity s for x, the x rounded to dtype, and the reference output."""
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen).to(dtype)  # rounded first: the reference sees the same x
    set_sparsity(ffn, x.float(), s, gen)
    with torch.no_grad():
        want = rounded(ffn, dtype)(x.float())
    return ffn, x, want


def check_cuda(y, want, dtype, note=""):
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # a half output keeps 3 (bf16) or 4 digits
    check_close(y.float().cpu(), want, atol=tol * want.abs().max().item() + 1e-6, rtol=tol, note=note)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,h", [(37, 101), *full_only((256, 683)), (2048, 8192)])
def test_cuda_matches_reference(cuda_ext, d, h, dtype, backend):
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    for s in (0.0, 0.5, 0.95, 1.0):
        for B in (1, 3, 4, 16, 20):  # 3: rounded up to a kernel's batch; 20: split into two launches
            ffn, x, want = cuda_case(d, h, B, s, dtype, gen)
            kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, device="cuda", backend=backend)
            out = torch.full((B, d), float("nan"), dtype=dtype, device="cuda")
            y = kernel(x.cuda(), out=out)
            assert y is out and y.dtype == dtype
            check_cuda(y, want, dtype, note=f"seed {seed}, s={s}, B={B}: ")
            if s == 1.0:
                assert (y == 0).all()
    with pytest.raises(TypeError):
        kernel(x.cuda().double())
    with pytest.raises(ValueError):
        kernel(x)  # on the CPU


def test_cuda_llama3_8b_size_and_unaligned_rows(cuda_ext):
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    ffn, x, want = cuda_case(4096, 14336, 1, 0.9, torch.bfloat16, gen)
    check_cuda(sparse_ffn.SparseFFN(ffn, dtype=torch.bfloat16, device="cuda")(x.cuda()), want, torch.bfloat16)
    for dtype in DTYPES:  # d = 2052: rows of 16 bytes in fp32 only; an offset x is never 16-byte aligned
        ffn, x, want = cuda_case(2052, 300, 2, 0.5, dtype, gen)
        kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, device="cuda")
        check_cuda(kernel(x.cuda()), want, dtype)
        buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        x_off = buf[1:].view_as(x)
        x_off.copy_(x)
        out = torch.full_like(x_off, float("nan"))
        cuda_ext.forward(x_off, kernel.w1, kernel.w3, kernel.w2t, out)
        check_cuda(out, want, dtype)


def test_cuda_nan_empty_and_bad_inputs(cuda_ext):
    gen = torch.Generator().manual_seed(0)
    ffn, x, _ = cuda_case(64, 96, 2, 0.5, torch.bfloat16, gen)
    k = sparse_ffn.SparseFFN(ffn, dtype=torch.bfloat16, device="cuda")
    x = x.cuda()
    bad_x = x.clone()
    bad_x[0, 3] = float("nan")
    y = k(bad_x)
    assert y[0].isnan().all() and not y[1].isnan().any()  # as in torch: per row
    w = torch.empty(0, 64, dtype=torch.bfloat16, device="cuda")  # h = 0: y = 0, written
    out = torch.full_like(x, float("nan"))
    cuda_ext.forward(x, w, w, w, out)
    assert (out == 0).all()
    good = dict(x=x, w1=k.w1, w3=k.w3, w2t=k.w2t, out=torch.empty_like(x))
    bad = [dict(x=x[0]), dict(x=x[None]), dict(x=x[:, :-1].contiguous()), dict(w1=k.w1[:, :-1].contiguous()),
           dict(w3=k.w3[:-1]), dict(w2t=k.w2t.t().contiguous()), dict(out=good["out"][:-1]), dict(w1=k.w1.float()),
           dict(out=good["out"].float()), {n: v.double() for n, v in good.items()}, dict(x=x.cpu()),
           dict(out=good["out"].cpu()), dict(x=torch.empty(2, 128, dtype=x.dtype, device="cuda")[:, ::2]),
           dict(x=torch.randn(17, 64, device="cuda").bfloat16(), out=torch.empty(17, 64, device="cuda").bfloat16())]
    for change in bad:  # the raw extension checks its inputs too: an exception, never a crash
        args = {**good, **change}
        with pytest.raises((RuntimeError, ValueError, TypeError), match="sparse_ffn"):
            cuda_ext.forward(args["x"], args["w1"], args["w3"], args["w2t"], args["out"])


def test_cuda_side_stream_and_graph_replay(cuda_ext):
    gen = torch.Generator().manual_seed(2)
    ffn, x, want = cuda_case(1024, 4096, 2, 0.9, torch.bfloat16, gen)
    k = sparse_ffn.SparseFFN(ffn, dtype=torch.bfloat16, device="cuda")
    static_x, out = x.cuda(), torch.full((2, 1024), float("nan"), dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the current stream, whichever it is; also the warm-up before capture
        for _ in range(2):
            k(static_x, out=out)
    torch.cuda.current_stream().wait_stream(side)
    check_cuda(out, want, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k(static_x, out=out)
    for _ in range(3):  # new inputs, other active sets: nothing data-dependent was baked into the graph
        x_new = torch.randn(2, 1024, generator=gen).bfloat16()
        static_x.copy_(x_new)
        out.fill_(float("nan"))
        graph.replay()
        with torch.no_grad():
            check_cuda(out, rounded(ffn, torch.bfloat16)(x_new.float()), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["relu", "silu"])
def test_cuda_threshold_matches_reference(cuda_ext, gate, dtype):
    """The CUDA kernel's gate and threshold against FeedForward's thresholded path (CATS on a GPU)."""
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    for d, h in ((37, 101), (256, 683)):
        for s in (0.0, 0.5, 0.95, 1.0):
            for B in (1, 4, 20):
                ffn = ref_ffn(d, h)
                x = torch.randn(B, d, generator=gen).to(dtype)
                ref0 = rounded(ffn, dtype)
                with torch.no_grad():
                    a = model_mod.gate_t(x.float() @ ref0.w1.weight.T, gate)
                    t = 0.0 if gate == "relu" and (a == 0).float().mean() >= s else threshold_for(a, s)
                    want = ref_thresholded(ref0, gate, t)(x.float())
                kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, device="cuda")
                out = torch.full((B, d), float("nan"), dtype=dtype, device="cuda")
                y = kernel(x.cuda(), out=out, gate=gate, t=t)
                check_cuda(y, want, dtype, note=f"seed {seed}, d={d}, s={s}, B={B}, t={t}: ")
                if s == 1.0:
                    assert (y == 0).all()


# -----------------------------------------------------------------------------
# the CUDA source compiles, GPU or not


@pytest.mark.full  # ~65 s on 2 cores; on a GPU machine cuda_ext above builds it anyway
@pytest.mark.skipif(not shutil.which("nvcc"), reason="no nvcc")
def test_cuda_source_compiles(tmp_path):
    """sparse_ffn.cu (with kernels/sparse_ffn_kernels.cuh) compiles with nvcc against this (CPU) torch's headers, so an interface change
    that breaks it fails here even on machines without a GPU. The one header a CPU torch lacks,
    c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build), is stubbed."""
    from torch.utils import cpp_extension
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig
    cmd = ["nvcc", "-c", os.path.join(ROOT, "sparse_ffn.cu"), "-o", str(tmp_path / "sffn.o"), "-std=c++20",
           f"-I{tmp_path}", *[f"-I{p}" for p in cpp_extension.include_paths()], f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_sparse_ffn_cuda", "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "sparse_ffn" in line]  # the .cu and its .cuh
    assert r.returncode == 0 and not ours, "\n".join(ours) or (r.stdout + r.stderr)[-3000:]
