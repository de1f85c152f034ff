"""
The sparse FFN kernels against the plain PyTorch FFN of model.py, on the CPU: the C kernel's tuned variant
(sffn_forward) and its plain one (sffn_forward_plain), and the torch gather, at odd shapes, every dtype
(fp32, fp16, bf16, int8), sparsities 0-100% and batches on both sides of the kernel's 16 rows; the
thresholded gate g_t (relu or silu, CATS); bad inputs; int8 at huge inputs; the dense path and the
automatic choice; the dense GEMV. The fast run takes a slice of each grid (one odd shape, 0 / 50 / 100%,
batch 1 and one over 16, every dtype and backend); --full runs the whole grid.
Run: python -m pytest -q tests/test_kernels.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network. Behaviour only: no timing is asserted anywhere; bench.py prints the numbers.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as model_mod
import sparse_ffn
from testutil import (CPU_BACKENDS, CPU_DTYPES, HALF, as_stored, check_close, full_only, packed, pytest_kernel, ref_ffn,
                      ref_thresholded, rounded, set_sparsity, threshold_for)


# -----------------------------------------------------------------------------
# the sparse FFN (C tuned, C plain, torch) against the reference


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, *full_only(3), 20])  # 20 > the C kernel's 16 rows per call: split in two calls
@pytest.mark.parametrize("s", [0.0, 0.5, *full_only(0.95), 1.0])
@pytest.mark.parametrize("d,h", [(37, 101), *full_only((256, 683), (45, 515), (21, 2))])
def test_cpu_matches_reference(d, h, s, B, dtype, backend):
    seed = int(torch.randint(1 << 30, ()))  # fresh inputs each run; a failure names its seed
    gen = torch.Generator().manual_seed(seed)
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen)
    n_on = set_sparsity(ffn, x, s, gen)
    ref = rounded(ffn, dtype)
    with torch.no_grad():
        want = ref(x)
        u = x @ ref.w1.weight.T
    kernel = packed(ffn, backend, dtype=dtype, mode="sparse")
    y = kernel(x)
    assert y.shape == (B, d) and y.dtype == torch.float32
    check_close(y, want, atol=1e-5, rtol=1e-4, note=f"seed {seed}: ")
    n_ref = (u > 0).any(0).sum().item()  # int8's rounding of W1 (to 1/254 of its row's largest |w|) can
    # flip a unit that set_sparsity put near 0 at tiny d: about 1 seed in 200 at d=21
    n_kernel = kernel.last_active if B <= 16 else n_ref  # B > 16: split into calls, each with its union
    assert n_kernel == n_ref and (n_ref == n_on or dtype == torch.int8), f"seed {seed}"
    if s == 1.0:
        assert (y == 0).all()


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_is_overwritten(backend):
    ffn, x = ref_ffn(40, 97), torch.randn(5, 40)
    set_sparsity(ffn, x, 0.9, torch.Generator().manual_seed(1))
    out = torch.full((5, 40), float("nan"))
    kernel = packed(ffn, backend, mode="sparse")
    assert kernel(x, out=out) is out
    with torch.no_grad():
        check_close(out, ffn(x), atol=1e-5, rtol=1e-4)
    out_np = np.full((5, 40), np.nan, dtype=np.float32)  # numpy in and out
    kernel(x.numpy(), out=out_np)
    check_close(torch.from_numpy(out_np), out, atol=0, rtol=0)


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_per_row(backend):
    ffn, x = ref_ffn(24, 50), torch.randn(3, 24)
    x[1, 5] = float("nan")
    y = packed(ffn, backend, mode="sparse")(x)
    with torch.no_grad():
        ref = ffn(x)
    assert torch.equal(y.isnan(), ref.isnan()) and y[1].isnan().all() and not y[[0, 2]].isnan().any()


@pytest_kernel
@pytest.mark.parametrize("backend", ["c", "plain"])
def test_deterministic_and_thread_counts(backend):
    ffn, x = ref_ffn(300, 1001), torch.randn(4, 300)
    kernel = packed(ffn, backend, mode="sparse")
    y = kernel(x)
    assert torch.equal(y, kernel(x))  # same threads, same sums in the same order
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            with torch.no_grad():
                check_close(kernel(x), ffn(x), atol=1e-5, rtol=1e-4)
                assert torch.equal(kernel(x), kernel(x))
    finally:
        torch.set_num_threads(threads)


@pytest_kernel
def test_rejects_bad_inputs():
    ffn = ref_ffn(16, 40)
    kernel = sparse_ffn.SparseFFN(ffn, mode="sparse")
    x = torch.randn(2, 16)
    bad_x = [
        (torch.randn(2, 15), ValueError),  # wrong d
        (torch.randn(16), ValueError),  # 1-D
        (torch.randn(1, 2, 16), ValueError),  # 3-D
        (torch.randn(2, 32)[:, ::2], ValueError),  # non-contiguous
        (x.double(), TypeError), (x.half(), TypeError), (x.bfloat16(), TypeError),
        (torch.ones(2, 16, dtype=torch.int32), TypeError),
        (torch.empty(2, 16, device="meta"), ValueError),  # another device
        ([[0.0] * 16] * 2, TypeError),  # not a tensor
        (np.zeros((2, 16)), TypeError),  # numpy float64
    ]
    for bad, err in bad_x:
        with pytest.raises(err):
            kernel(bad)
    bad_out = [
        (torch.empty(3, 16), ValueError), (torch.empty(2, 16).double(), TypeError),
        (torch.empty(2, 32)[:, ::2], ValueError), (torch.empty(2, 16, device="meta"), ValueError),
        (x, ValueError),  # overlaps x
    ]
    for out, err in bad_out:
        with pytest.raises(err):
            kernel(x, out=out)
    with pytest.raises(ValueError):  # mismatched weight shapes
        sparse_ffn.SparseFFN(torch.randn(40, 16), torch.randn(40, 16), torch.randn(40, 16))
    with pytest.raises(TypeError):
        sparse_ffn.SparseFFN(ffn, dtype=torch.float64)
    with pytest.raises(ValueError):
        sparse_ffn.SparseFFN(ffn, backend="cuda")  # CUDA kernel for CPU weights
    for backend, variant in (("c", "fast"), ("torch", "plain")):  # the plain variant is the C backend's
        with pytest.raises(ValueError, match="variant"):
            sparse_ffn.SparseFFN(ffn, backend=backend, variant=variant)
    assert kernel(torch.empty(0, 16)).shape == (0, 16)
    # a threshold past fp32's range: refused with a clear message, not by the kernel's bare -1
    for t in (3.5e38, float("inf"), float("nan"), -1.0, True, "0.1"):
        with pytest.raises(ValueError, match="threshold t"):
            kernel(x, t=t)
    kernel(x, t=model_mod.T_MAX)  # the largest one the kernel takes


@pytest_kernel
@pytest.mark.parametrize("B", [1, 4, 16])
def test_int8_huge_inputs_overflow_only_where_the_result_does(B):
    """int8 weights scale each dot by its row's scale before g(u) multiplies it (the unscaled W3 dot times
    g(u) once overflowed to inf, and inf * 0 to nan, where the exact result is finite)."""
    a = torch.full((1, 1), 1e-3)
    y = sparse_ffn.SparseFFN(a, a, a, dtype=torch.int8, mode="sparse")(torch.full((B, 1), 1e20))
    check_close(y, torch.full((B, 1), 1e31), atol=0, rtol=1e-5)
    gen = torch.Generator().manual_seed(B)
    ffn = ref_ffn(67, 301)
    ref = rounded(ffn, torch.int8)
    kernel = sparse_ffn.SparseFFN(ffn, dtype=torch.int8, mode="sparse")
    w1, w3, w2 = (getattr(ref, n).weight.double() for n in ("w1", "w3", "w2"))
    for scale in (1e18, 1e30):
        x = torch.randn(B, 67, generator=gen) * scale
        with torch.no_grad():
            want = ref(x)  # fp32, as the kernel: finite where the result and its terms fit
            exact = (torch.relu(x.double() @ w1.T) * (x.double() @ w3.T)) @ w2.T
        y = kernel(x)
        assert torch.equal(y.isfinite(), want.isfinite()), f"scale {scale}"
        ok = want.isfinite().all(1)  # rows that fit: within fp32's rounding of the row's largest |y| (sums cancel)
        err = (y[ok].double() - exact[ok]).abs().amax(1) / exact[ok].abs().amax(1)
        assert (err < 1e-5).all(), f"scale {scale}: relative errors {err.tolist()}"


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lazy_negated_views(backend):
    """x._neg_view() keeps the un-negated values in memory: the kernel sees the negated values (x
    and weights are materialized), and an `out` that is such a view is refused."""
    ffn, x = ref_ffn(33, 70), torch.randn(3, 33)
    set_sparsity(ffn, -x, 0.8, torch.Generator().manual_seed(2))
    kernel = packed(ffn, backend, mode="sparse")
    with torch.no_grad():
        want = ffn(-x)
        neg = x._neg_view()
        assert neg.is_neg() and neg.is_contiguous()
        check_close(kernel(neg), want, atol=1e-5, rtol=1e-4)
        check_close(kernel.apply(neg), want, atol=1e-5, rtol=1e-4)
        negated = sparse_ffn.SparseFFN(ffn.w1.weight._neg_view(), ffn.w3.weight._neg_view(), ffn.w2.weight._neg_view(),
                                       backend=kernel.backend, variant=kernel.variant)  # the FFN of -x, negated
        check_close(negated(x), -want, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="lazy negated"):
            kernel(x, out=torch.empty(3, 33)._neg_view())


def _thp_mode():
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _vma_flags(addr):  # the VmFlags of the mapping that holds addr, from /proc/self/smaps
    lo = hi = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
        elif head == "VmFlags:" and lo <= addr < hi:
            return line.split()[1:]
    return None


@pytest_kernel
@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_packed_weights_ask_for_huge_pages():
    """huge_empty (the packed weights') marks its 2 MB-aligned interior MADV_HUGEPAGE before the memory is
    touched ('hg' in the mapping's VmFlags; whether the kernel then finds free huge pages is its own
    business); odd and empty shapes come back as plain tensors."""
    t = sparse_ffn.huge_empty((3 << 20,), torch.float32)  # 12 MB: five whole 2 MB pages inside at least
    assert t.shape == (3 << 20,) and t.dtype == torch.float32 and t.is_contiguous()
    mid = t.data_ptr() + t.nbytes // 2
    assert "hg" in _vma_flags(mid)
    kernel = sparse_ffn.SparseFFN(ref_ffn(1024, 1536), mode="sparse")  # 6 MB and 12 MB of packed weights
    assert all("hg" in _vma_flags(w.data_ptr() + w.nbytes // 2) for w in (kernel.w1, kernel.w32))
    assert sparse_ffn.huge_empty((0, 5), torch.int8).shape == (0, 5)
    assert sparse_ffn.huge_empty((7, 3), torch.bfloat16).shape == (7, 3)


# -----------------------------------------------------------------------------
# thresholds: the gate (relu or silu) and t, in the model, the C kernel and the torch path


def test_gate_t_matches_its_definition():
    u = torch.tensor([-1e30, -3.0, -0.2, -0.0, 0.0, 0.05, 0.3, 2.0, float("inf"), float("-inf"), float("nan")])
    for gate, g in (("relu", F.relu), ("silu", F.silu)):
        for t in (0.0, 0.1, 1.0):
            got = model_mod.gate_t(u, gate, t)
            want = g(u.clamp(min=-1e4)) if gate == "silu" else g(u)
            want = torch.where(want.abs() <= t, 0.0, want)
            assert torch.equal(got[:-1], want[:-1]) and got[-1].isnan(), (gate, t, got, want)
    assert torch.equal(model_mod.gate_t(u[:-1], "relu", 0.0), F.relu(u[:-1]))


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["relu", "silu"])
@pytest.mark.parametrize("B", [1, *full_only(5), 20])
@pytest.mark.parametrize("s", [0.0, 0.5, *full_only(0.95), 1.0])
@pytest.mark.parametrize("d,h", [(37, 101), *full_only((192, 512), (45, 515))])
def test_threshold_matches_reference(d, h, s, B, gate, dtype, backend):
    """g_t with t set for a target sparsity s (t = 0 where relu is already sparser)."""
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen)
    ref0 = rounded(ffn, dtype)
    with torch.no_grad():
        a = model_mod.gate_t(x @ ref0.w1.weight.T, gate)
    t = threshold_for(a, s)
    if gate == "relu" and (a == 0).float().mean() >= s:
        t = 0.0
    ref = ref_thresholded(ref0, gate, t)
    with torch.no_grad():
        want = ref(x)
    kernel = packed(ffn, backend, dtype=dtype, mode="sparse")
    y = kernel(x, gate=gate, t=t)
    check_close(y, want, atol=1e-5, rtol=1e-4, note=f"seed {seed}, t {t}: ")
    if B <= 16:
        assert kernel.last_active == (a.abs() > t).any(0).sum().item(), f"seed {seed}"
    if s == 1.0:
        assert (y == 0).all()


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threshold_edge_values(backend):
    """t = 0 with relu is the plain kernel bit for bit; nan still propagates through a silu gate;
    -inf in W1 x gives silu 0, not nan; bad gates and thresholds are one clear error."""
    ffn, x = ref_ffn(40, 97), torch.randn(4, 40)
    kernel = packed(ffn, backend, mode="sparse")
    assert torch.equal(kernel(x), kernel(x, gate="relu", t=0.0))
    x[2, 3] = float("nan")
    y = kernel(x, gate="silu", t=0.01)
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    big = torch.full((1, 40), -1e30)
    with torch.no_grad():
        w = ffn.w1.weight.abs().clone()
    k2 = sparse_ffn.SparseFFN(w, ffn.w3.weight, ffn.w2.weight, backend=kernel.backend, variant=kernel.variant, mode="sparse")
    assert (k2(big, gate="silu", t=0.0) == 0).all()  # W1 x = -inf everywhere: silu -> 0
    for bad in (dict(gate="gelu"), dict(t=-0.1), dict(t=float("nan")), dict(t=float("inf")), dict(t="0.1"),
                dict(t=True)):
        with pytest.raises(ValueError, match="gate|threshold"):
            kernel(x, **bad)


# -----------------------------------------------------------------------------
# the dense path (PyTorch's GEMMs on the packed weights), the automatic choice, the dense GEMV


# 16-bit weights round x to 16 bits on the dense path: a unit near t can cross it, a jump of ~t in y,
# so those are checked where g_t is continuous (t = 0)
DENSE_CASES = ([(torch.float32, g, s) for g, s in (("relu", 0.0), ("relu", 0.9), ("silu", 0.5))]
               + [(dt, g, 0.0) for dt in HALF for g in ("relu", "silu")]
               + [(torch.int8, "relu", 0.9), (torch.int8, "silu", 0.5)])  # int8: dequantized, x stays fp32


@pytest_kernel
@pytest.mark.parametrize("dtype,gate,s", DENSE_CASES, ids=str)
@pytest.mark.parametrize("B", [1, *full_only(6), 20])
def test_dense_path_matches_reference(B, dtype, gate, s):
    """mode="dense": PyTorch's GEMMs on the packed (strided) weights, any gate and threshold; 16-bit
    weights round x and y to 16 bits there, hence the looser tolerance."""
    gen = torch.Generator().manual_seed(B)
    ffn = ref_ffn(45, 515)
    x = torch.randn(B, 45, generator=gen)
    ref0 = rounded(ffn, dtype)
    with torch.no_grad():
        a = model_mod.gate_t(x @ ref0.w1.weight.T, gate)
    t = 0.0 if s == 0 else threshold_for(a, s)
    with torch.no_grad():
        want = ref_thresholded(ref0, gate, t)(x)
    kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, mode="dense")
    y = kernel(x, gate=gate, t=t)
    tol = 1e-5 if dtype not in HALF else 2e-2
    check_close(y, want, atol=tol, rtol=tol)
    n = (a.abs() > t).any(0).sum().item()  # x rounded to 16 bits moves units near t across it
    assert kernel.last_path == "dense" and abs(kernel.last_active - n) <= (10 if dtype in HALF else 0)


@pytest_kernel
def test_auto_mode_gives_the_same_bits_every_call():
    """mode="auto" (the default) picks its path from the batch size alone: the same input gives the same bits
    on every call, whatever came before (it once switched to dense after a sparse call: 30 of 200 cases
    differed). 200 random fp32 cases, d 1-300, h 1-600, batch 1-40, 1 thread and torch's own."""
    gen = torch.Generator().manual_seed(26)
    threads = torch.get_num_threads()
    try:
        for case in range(200):
            torch.set_num_threads(1 if case % 2 else threads)
            d, h, B = (int(torch.randint(1, n + 1, (), generator=gen)) for n in (300, 600, 40))
            ffn = ref_ffn(d, h)
            kernel = sparse_ffn.SparseFFN(ffn)
            assert kernel.mode == "auto"
            x = torch.randn(B, d, generator=gen)
            other = -3 * x  # a call with other units active in between: it must not change the next result
            first = kernel(x)
            assert kernel.last_path == ("sparse" if B <= sparse_ffn.SFFN_MAX_B else "dense"), (d, h, B)
            kernel(other)
            assert torch.equal(first, kernel(x)) and torch.equal(first, kernel(x)), f"case {case}: d={d} h={h} B={B}"
            with torch.no_grad():
                check_close(first, ffn(x), atol=1e-5, rtol=1e-4, note=f"case {case}: ")
    finally:
        torch.set_num_threads(threads)
    bf = sparse_ffn.SparseFFN(ref_ffn(64, 300), dtype=torch.bfloat16)  # 16-bit weights: always the kernel in auto mode
    bf(torch.randn(40, 64))
    assert bf.last_path == "sparse"
    with pytest.raises(ValueError, match="mode"):
        sparse_ffn.SparseFFN(ref_ffn(8, 8), mode="fast")


@pytest_kernel
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, *full_only(5), 20])
@pytest.mark.parametrize("n,d", [(101, 37), *full_only((512, 192), (3, 45), (1, 8))])
def test_dense_gemv_matches_linear(n, d, B, dtype):
    """The C kernel's dense GEMV (attention projections, output layer) against F.linear on the rounded weights."""
    gen = torch.Generator().manual_seed(n * d + B)
    w, x = torch.randn(n, d, generator=gen), torch.randn(B, d, generator=gen)
    lin = sparse_ffn.DenseLinear(w, dtype)
    check_close(lin(x), F.linear(x, as_stored(w, dtype)), atol=1e-5, rtol=1e-4)
    y3 = lin.apply(x.view(1, B, d).to(torch.bfloat16))  # any leading shape and dtype
    assert y3.shape == (1, B, n) and y3.dtype == torch.bfloat16
    for bad in (torch.randn(B, d + 1), torch.randn(B, d, dtype=torch.float64), torch.randn(d)):
        with pytest.raises(ValueError, match="x must be"):
            lin(bad)
    with pytest.raises(ValueError, match="non-empty"):
        sparse_ffn.DenseLinear(torch.randn(0, d))
