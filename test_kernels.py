"""
The tests of the sparse FFN kernels: sparse_ffn.c (every SIMD path this machine can build), sparse_ffn.cu
(skipped without a GPU; its nvcc compile without one) and the torch fallback, each against the plain
PyTorch FFN of model.py, and their place in the model (attach, thresholds, int8). Part of the suite:
python -m pytest -q test_all.py test_kernels.py

CPU only, no network. Behaviour only: no timing is asserted anywhere; bench.py prints the numbers.
"""

import copy
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attach as attach_mod
import build
import model as model_mod
import sparse_ffn
from model import GPT, FeedForward, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# the sparse FFN kernels (sparse_ffn.c, sparse_ffn.cu, the torch fallback) against model.FeedForward

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + HALF
CPU_DTYPES = DTYPES + (torch.int8,)  # int8 weights: the CPU kernel only


@pytest.fixture(scope="module")
def c_kernel():
    """The C kernel must build here (CI has gcc): built now if it is missing or stale."""
    ok, msg = build.ensure_c()
    assert ok, f"the C kernel must build here: {msg}"
    assert sparse_ffn.backends()["c"] is True, sparse_ffn.backends()["c"]


def ref_ffn(d, h, device="cpu"):
    """The reference relu FFN at any (d, h): FeedForward only reads n_embd and ffn_hidden, so an odd d
    that GPTConfig's head-size checks would refuse is set after its validation."""
    config = GPTConfig(act="relu")
    config.n_embd, config.ffn_hidden = d, h
    return FeedForward(config).to(device).eval()


def set_sparsity(ffn, x, s, gen, fire_rate=0.5):
    """Rewrite w1 so that round(s * h) units are zero for every row of x (the union is 1 - s active),
    each active unit firing on a random nonempty subset of the rows (each row with fire_rate). W1 x hits chosen targets
    exactly (least squares in fp64), kept away from 0 so rounding cannot flip a unit."""
    h, B = ffn.w1.weight.shape[0], x.shape[0]
    X, W = x.double().cpu(), ffn.w1.weight.double().cpu()
    n_on = h - round(s * h)
    on = torch.randperm(h, generator=gen)[:n_on]
    fire = torch.rand(n_on, B, generator=gen) < fire_rate
    fire[torch.arange(n_on), torch.randint(B, (n_on,), generator=gen)] = True
    sign = -torch.ones(h, B, dtype=torch.float64)
    sign[on] = fire.double() * 2 - 1
    scale = (W @ X.T).abs().mean()
    target = sign * scale * (0.2 + torch.rand(h, B, generator=gen, dtype=torch.float64))
    W = W - (W @ X.T - target) @ torch.linalg.solve(X @ X.T, X)
    with torch.no_grad():
        ffn.w1.weight.copy_(W.float())
    return n_on


def as_stored(w, dtype, rows_of_t=False):
    """w rounded to dtype and back: what a kernel with dtype weights computes with. int8: per-row
    quantized and dequantized (rows_of_t: per row of w.T, as W2 is stored, transposed)."""
    if dtype == torch.int8:
        return sparse_ffn.dequantized(w.t()).t() if rows_of_t else sparse_ffn.dequantized(w)
    return w.to(dtype).float()


def rounded(ffn, dtype):
    """The reference on the weights as a dtype kernel stores them: what a half-precision or int8 kernel computes."""
    ref = ref_ffn(ffn.w1.in_features, ffn.w1.out_features, ffn.w1.weight.device)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(ref, name).weight.copy_(as_stored(getattr(ffn, name).weight, dtype, rows_of_t=name == "w2"))
    return ref


def check_close(y, ref, atol, rtol, note=""):
    err = (y.float() - ref.float()).abs()
    bad = err > atol + rtol * ref.float().abs()
    assert not bad.any(), (f"{note}{int(bad.sum())} mismatches, max |diff| {err.max().item():.3g}; first: "
                           f"{[(tuple(i), y[tuple(i)].item(), ref[tuple(i)].item()) for i in bad.nonzero()[:5].tolist()]}")


# -----------------------------------------------------------------------------
# CPU: the C kernel and the torch fallback against the reference


pytest_kernel = pytest.mark.usefixtures("c_kernel")
CPU_BACKENDS = ["c", "plain", "torch"]  # plain: the C backend's plain kernel (sffn_forward_plain)


def packed(ffn, backend, **kw):
    """SparseFFN on one of CPU_BACKENDS."""
    plain = backend == "plain"
    return sparse_ffn.SparseFFN(ffn, backend="c" if plain else backend, variant="plain" if plain else "tuned", **kw)


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 20])  # 20 > the C kernel's 16 rows per call: split in two calls
@pytest.mark.parametrize("s", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("d,h", [(37, 101), (256, 683), (45, 515), (21, 2)])
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
    kernel(x, t=sparse_ffn.T_MAX)  # the largest one the kernel takes


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
    for scale in (1e18, 1e30):
        x = torch.randn(B, 67, generator=gen) * scale
        with torch.no_grad():
            want = ref(x.double().float())  # fp32, as the kernel: finite where the exact result fits
        y = kernel(x)
        assert torch.equal(y.isfinite(), want.isfinite()), f"scale {scale}"
        ok = want.isfinite()
        check_close(y[ok], want[ok], atol=0, rtol=1e-3, note=f"scale {scale}: ")


def test_c_kernel_is_built_on_first_use_and_rebuilt_when_stale(tmp_path):
    """A fresh checkout: the first use of sparse_ffn builds the C kernel (one line), the next
    reuses it, and a newer sparse_ffn.c or header triggers a rebuild."""
    import shutil
    for f in ("sparse_ffn.py", "model.py", "build.py") + build.C_SOURCES:
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    use = lambda: subprocess.run([sys.executable, "-c", "import sparse_ffn; print(sparse_ffn.backends()['c'])"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300)
    first = use()
    assert first.stdout.strip() == "True" and "building the C kernel once" in first.stderr, first.stderr
    again = use()
    assert again.stdout.strip() == "True" and again.stderr == ""
    for i, f in enumerate(("sparse_ffn.c", "sparse_ffn_tuned.h")):
        later = time.time() + 5 * (i + 1)
        os.utime(tmp_path / f, (later, later))
        rebuilt = use()
        assert rebuilt.stdout.strip() == "True" and "building the C kernel once" in rebuilt.stderr, f


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


def ref_thresholded(ffn, gate, t):
    """The reference FFN with act = gate and threshold t: FeedForward's own thresholded path."""
    ref = ref_ffn(ffn.w1.in_features, ffn.w1.out_features)
    ref.load_state_dict(ffn.state_dict())
    ref.act, ref.threshold = gate, t
    return ref


def threshold_for(a, s):
    """A t between two of the sorted |a| values, so that a fraction ~s of |a| falls below it and no
    value sits within float rounding of it (the kernels sum in another order than torch)."""
    v = a.abs().flatten().sort().values
    k = round(s * v.numel())
    if k == 0:
        return 0.0
    if k == v.numel():
        return v[-1].item() * 2 + 1
    lo, hi = max(1, k - v.numel() // 100), min(v.numel() - 1, k + v.numel() // 100)  # the widest gap near k
    k = lo + int((v[lo:hi + 1] - v[lo - 1:hi]).argmax())
    return (v[k - 1].item() + v[k].item()) / 2


def test_gated_matches_its_definition():
    u = torch.tensor([-1e30, -3.0, -0.2, -0.0, 0.0, 0.05, 0.3, 2.0, float("inf"), float("-inf"), float("nan")])
    for gate, g in (("relu", F.relu), ("silu", F.silu)):
        for t in (0.0, 0.1, 1.0):
            got = model_mod.gated(u, gate, t)
            want = g(u.clamp(min=-1e4)) if gate == "silu" else g(u)
            want = torch.where(want.abs() <= t, 0.0, want)
            assert torch.equal(got[:-1], want[:-1]) and got[-1].isnan(), (gate, t, got, want)
    assert torch.equal(model_mod.gated(u[:-1], "relu", 0.0), F.relu(u[:-1]))


@pytest_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["relu", "silu"])
@pytest.mark.parametrize("B", [1, 5, 20])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("d,h", [(37, 101), (192, 512), (45, 515)])
def test_threshold_matches_reference(d, h, s, B, gate, dtype, backend):
    """g_t with t set for a target sparsity s (t = 0 where relu is already sparser)."""
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen)
    ref0 = rounded(ffn, dtype)
    with torch.no_grad():
        a = model_mod.gated(x @ ref0.w1.weight.T, gate)
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


# 16-bit weights round x to 16 bits on the dense path: a unit near t can cross it, a jump of ~t in y,
# so those are checked where g_t is continuous (t = 0)
DENSE_CASES = ([(torch.float32, g, s) for g, s in (("relu", 0.0), ("relu", 0.9), ("silu", 0.5))]
               + [(dt, g, 0.0) for dt in HALF for g in ("relu", "silu")]
               + [(torch.int8, "relu", 0.9), (torch.int8, "silu", 0.5)])  # int8: dequantized, x stays fp32


@pytest_kernel
@pytest.mark.parametrize("dtype,gate,s", DENSE_CASES, ids=str)
@pytest.mark.parametrize("B", [1, 6, 20])
def test_dense_path_matches_reference(B, dtype, gate, s):
    """mode="dense": PyTorch's GEMMs on the packed (strided) weights, any gate and threshold; 16-bit
    weights round x and y to 16 bits there, hence the looser tolerance."""
    gen = torch.Generator().manual_seed(B)
    ffn = ref_ffn(45, 515)
    x = torch.randn(B, 45, generator=gen)
    ref0 = rounded(ffn, dtype)
    with torch.no_grad():
        a = model_mod.gated(x @ ref0.w1.weight.T, gate)
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
def test_custom_ops_share_scratch_in_any_order():
    """The custom ops' shared scratch is sized by each call's own need: the GEMV (which needs no per-thread
    partial y's) first, then the FFN at the same d, once overran it (a heap overflow that killed compiled
    decoding with attach(linear=True)). Also the kernel itself refuses a scratch smaller than a call needs."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        attach_mod._OP_SCRATCH = sparse_ffn._Scratch()  # as in a fresh process
        d, h = 192, 512
        lin = sparse_ffn.DenseLinear(torch.randn(d, d))
        ffn = ref_ffn(d, h)
        packed = sparse_ffn.SparseFFN(ffn, mode="sparse")
        for B in (1, 16, 40):
            x = torch.randn(B, d)
            check_close(attach_mod.c_gemv_op(x, lin.w, None), F.linear(x, lin.w), atol=1e-5, rtol=1e-4)
            with torch.no_grad():
                check_close(attach_mod.c_ffn_op(x, packed.w1, packed.w32, None, 0, 0.0), ffn(x), atol=1e-5, rtol=1e-4)
        attach_mod._OP_SCRATCH = sparse_ffn._Scratch()
        attach_mod.c_ffn_op(torch.randn(16, d), packed.w1, packed.w32, None, 0, 0.0)
        check_close(attach_mod.c_gemv_op(x[:1], lin.w, None), F.linear(x[:1], lin.w), atol=1e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)
    mod = sparse_ffn._mods["c"]
    ffi, lib = mod.ffi, mod.lib
    x, y = torch.randn(4, d), torch.empty(4, d)
    need = lib.sffn_scratch_floats(4, d, 2)
    scratch = torch.empty(need)
    p = lambda t: ffi.cast("float *", t.data_ptr())
    args = (p(x), 4, d, h, ffi.cast("void *", packed.w1.data_ptr()), ffi.cast("void *", packed.w32.data_ptr()), 0,
            ffi.NULL, 0, 0.0, p(y), p(scratch))
    assert lib.sffn_forward(*args, need - 1, 2) == -1
    assert lib.sffn_forward(*args, need, 2) >= 0
    need = lib.sffn_plain_scratch_floats(4, d, h, 2)
    scratch = torch.empty(need)
    args = args[:-1] + (p(scratch),)
    assert lib.sffn_forward_plain(*args, need - 1, 2) == -1
    assert lib.sffn_forward_plain(*args, need, 2) >= 0
    need = lib.sffn_scratch_floats(4, d, 0)
    assert lib.sffn_gemv(p(x), 4, d, d, ffi.cast("void *", lin.w.data_ptr()), 0, ffi.NULL, p(y), p(scratch), need - 1, 2) == -1


@pytest_kernel
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_attach_with_thresholds_matches_model(act, monkeypatch):
    """A thresholded model (CATS for silu) gives the same logits and greedy tokens through the kernel."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act=act)).eval()
    idx = torch.randint(97, (2, 20))
    model.calibrate_thresholds([torch.randint(97, (4, 40))], 0.85)
    with torch.no_grad():
        want, _ = model(idx, targets=idx)
        want_tokens = model.generate(idx[:1, :8], 12, temperature=0)
        attach_mod.attach(model)
        calls, call = [], sparse_ffn.SparseFFN.__call__
        monkeypatch.setattr(sparse_ffn.SparseFFN, "__call__",
                            lambda k, x, out=None, gate="relu", t=0.0: calls.append((k, gate, t)) or call(k, x, out, gate, t))
        got, _ = model(idx, targets=idx)
        tokens = model.generate(idx[:1, :8], 12, temperature=0)
    thresholds = {id(b.ffn.kernel): b.ffn.threshold for b in model.blocks}
    assert len(calls) >= 2 and all(g == act and t == thresholds[id(k)] for k, g, t in calls)
    check_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, want_tokens)


@pytest_kernel
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 5, 20])
@pytest.mark.parametrize("n,d", [(101, 37), (512, 192), (3, 45), (1, 8)])
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


@pytest_kernel
def test_attach_linear_matches_model():
    """attach(linear=True): projections and output layer through the C GEMV; fp32 gives the same logits
    and greedy tokens, bf16 close ones; training and autograd keep nn.Linear; detaching restores it."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act="relu")).eval()
    idx = torch.randint(97, (2, 20))
    with torch.no_grad():
        want, _ = model(idx, targets=idx)
        want_tokens = model.generate(idx[:1, :8], 12, temperature=0)
        attach_mod.attach(model, linear=True)
        assert all("forward" in l.__dict__ for l in (model.blocks[0].attn.wq, model.lm_head))
        got, _ = model(idx, targets=idx)
        tokens = model.generate(idx[:1, :8], 12, temperature=0)
        attach_mod.attach(model, dtype=torch.bfloat16, linear=True)
        half, _ = model(idx, targets=idx)
    check_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, want_tokens)
    check_close(half, want, atol=5e-2, rtol=5e-2)
    model.train()  # training: nn.Linear's own forward, with gradients
    loss = model(idx, targets=idx)[1]
    loss.backward()
    assert model.blocks[0].attn.wq.weight.grad is not None
    attach_mod.detach(model)
    assert not any("forward" in l.__dict__ for l in (model.blocks[0].attn.wq, model.lm_head))


# the same source built for the SIMD paths this machine's native build skips: AVX-512 without VNNI and AMX
# (int8 weights widened to fp32, bf16 batches on FMAs), AVX2 (on an AVX-512 CPU) and the portable loops;
# each must match the reference
VARIANTS = {"avx512": ["-O3", "-march=native", "-mno-avx512vnni", "-mno-amx-tile", "-fopenmp"],
            "avx2": ["-O3", "-march=native", "-mno-avx512f", "-fopenmp"], "portable": ["-O3", "-fopenmp"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def c_variant(request, tmp_path_factory, c_kernel):
    import importlib.util
    name = f"_sparse_ffn_c_{request.param}"
    where = str(tmp_path_factory.mktemp(name))
    ok, msg = build.build_c(flag_sets=[(VARIANTS[request.param], ["-fopenmp"], "")], name=name, dest_dir=where)
    assert ok, msg
    so = next(os.path.join(where, f) for f in os.listdir(where) if f.startswith(name) and f.endswith(".so"))
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = {"avx512": 2, "avx2": 1, "portable": 0}[request.param]
    if request.param != "portable" and mod.lib.sffn_simd() != want:
        pytest.skip(f"no {request.param} build here (simd {mod.lib.sffn_simd()})")
    assert mod.lib.sffn_simd() == want
    return mod


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_simd_variants_match_reference(c_variant, dtype, monkeypatch):
    """The AVX2 and portable builds of sparse_ffn.c: the sparse FFN (relu and silu with a threshold, odd
    sizes, batches, 0-100% sparsity) and the dense GEMV against the reference."""
    monkeypatch.setitem(sparse_ffn._mods, "c", c_variant)
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    for d, h in ((37, 101), (256, 683), (45, 515)):
        for s in (0.0, 0.5, 0.95, 1.0):
            for B in (1, 5, 16):
                ffn = ref_ffn(d, h)
                x = torch.randn(B, d, generator=gen)
                n_on = set_sparsity(ffn, x, s, gen)
                ref = rounded(ffn, dtype)
                kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, backend="c", mode="sparse")
                plain = sparse_ffn.SparseFFN(ffn, dtype=dtype, backend="c", mode="sparse", variant="plain")
                with torch.no_grad():
                    check_close(kernel(x), ref(x), atol=1e-5, rtol=1e-4, note=f"seed {seed}, {d}x{h} B={B} s={s}: ")
                    check_close(plain(x), ref(x), atol=1e-5, rtol=1e-4, note=f"plain, seed {seed}, {d}x{h} B={B} s={s}: ")
                    assert kernel.last_active == ((x @ ref.w1.weight.T > 0).any(0).sum() if dtype == torch.int8 else n_on)
                    a = model_mod.gated(x @ ref.w1.weight.T, "silu")
                    t = threshold_for(a, s)
                    want = ref_thresholded(ref, "silu", t)(x)
                check_close(kernel(x, gate="silu", t=t), want, atol=1e-5, rtol=1e-4, note=f"seed {seed}, silu t={t}: ")
                lin = sparse_ffn.DenseLinear(ffn.w1.weight, dtype)
                check_close(lin(x), F.linear(x, as_stored(ffn.w1.weight, dtype)), atol=1e-5, rtol=1e-4)


@pytest_kernel
def test_generate_compiled_matches_eager():
    """generate(compile=True): torch.compile'd decode steps give eager's greedy tokens, dense and with the C
    kernels attached (their custom ops inside the graph: FFN fp32 and int8, the GEMV with linear=True)."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act="relu")).eval()
    prompt = torch.randint(97, (1, 8))
    for dtype, linear in ((None, False), (torch.float32, False), (torch.int8, True)):
        if dtype is not None:
            attach_mod.attach(model, dtype=dtype, linear=linear)
        torch._dynamo.reset()
        want = model.generate(prompt, 12, temperature=0)
        assert torch.equal(model.generate(prompt, 12, temperature=0, compile=True), want), (dtype, linear)
        attach_mod.detach(model)
    x = torch.randn(3, 64)  # the ops themselves, called directly, against the eager kernels
    k = sparse_ffn.SparseFFN(model.blocks[0].ffn, dtype=torch.int8, mode="sparse")
    check_close(attach_mod.c_ffn_op(x, k.w1, k.w32, k.scales, 0, 0.0), k(x), atol=0, rtol=0)
    lin = sparse_ffn.DenseLinear(model.lm_head.weight, torch.bfloat16)
    check_close(attach_mod.c_gemv_op(x, lin.w, lin.scales), lin(x), atol=0, rtol=0)


@pytest_kernel
def test_int8_quantization_and_attach():
    """quantize_rows: q in [-127, 127], each row's largest |w| maps to 127, |w - q scale| <= scale / 2,
    zero rows stay zero, nan is refused. attach(dtype=int8, linear=True) gives the logits of the model
    whose every weight is dequantized (W2 per column: its rows as packed), and the same greedy tokens."""
    w = torch.randn(7, 33) * torch.logspace(-3, 2, 7)[:, None]
    w[3] = 0
    q, scale = sparse_ffn.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (7,) and q.abs().max() <= 127 and scale[3] == 0
    assert (q[[0, 1, 2, 4, 5, 6]].abs().amax(1) == 127).all() and (q[3] == 0).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="finite"):
        sparse_ffn.quantize_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="CPU only"):
        sparse_ffn.SparseFFN(ref_ffn(8, 16), dtype=torch.int8, device="cuda")
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act="relu")).eval()
    twin = GPT(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.dim() == 2 and "tok_emb" not in name:
                p.copy_(as_stored(p, torch.int8, rows_of_t=name.endswith("w2.weight")))
        twin.lm_head.weight = torch.nn.Parameter(as_stored(model.lm_head.weight, torch.int8))  # untied: the
        # output layer reads int8, the embedding lookup stays as it is
    for name, p in attach_mod.int8_twin(model, linear=True).named_parameters():  # the library's own copy
        assert torch.equal(p, dict(twin.named_parameters())[name]), name
    assert torch.equal(attach_mod.int8_twin(model).blocks[0].attn.wq.weight, model.blocks[0].attn.wq.weight)
    idx = torch.randint(97, (2, 20))
    with torch.no_grad():
        want, _ = twin(idx, targets=idx)
        want_tokens = twin.generate(idx[:1, :8], 12, temperature=0)
        attach_mod.attach(model, dtype=torch.int8, linear=True)
        got, _ = model(idx, targets=idx)
        tokens = model.generate(idx[:1, :8], 12, temperature=0)
    check_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, want_tokens)


@pytest_kernel
@pytest.mark.parametrize("scale", [0.0, 1e-15, 1e-3, 1.0, 1e10])
@pytest.mark.parametrize("d,h,B", [(203, 300, 6), (256, 1000, 9)])  # 1000: chunks of 16+ units (tiles)
def test_int8_x_at_every_scale(scale, d, h, B):
    """int8 weights take x as a 24-bit integer scaled to its largest |x| at batch 1 (VNNI, where built) and,
    row by row, in the FFN's W1 pass for 5+ rows with d a multiple of 64 (AMX-INT8, where built): at every
    magnitude of x, a row of zeros and a row with one entry 1e4 times the rest, the FFN and the GEMV are
    within fp32's own error of the fp64 reference (per row: 3e-6 of its largest |y|; PyTorch's fp32 is at
    ~7e-7); nan / inf in a row take the fp32 path and propagate in that row only."""
    gen = torch.Generator().manual_seed(7)
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen)
    set_sparsity(ffn, x, 0.7, gen)
    x = x * scale
    x[1] = 0
    x[2, 5] = x[2].abs().max() * 1e4 if scale else 1.0
    ref = rounded(ffn, torch.int8)
    ref64 = copy.deepcopy(ref).double()
    kernel = sparse_ffn.SparseFFN(ffn, dtype=torch.int8, backend="c", mode="sparse")
    lin = sparse_ffn.DenseLinear(ffn.w1.weight, torch.int8)

    def near(y, want64):  # row by row, against the row's largest |y|
        bound = 3e-6 * want64.abs().amax(1, keepdim=True)
        assert ((y.double() - want64).abs() <= bound).all(), (scale, ((y.double() - want64).abs() / bound).max())

    for xs in (x, x[:1], x[2:3]):
        with torch.no_grad():
            want64 = ref64(xs.double())
            near(ref(xs), want64)  # the bound holds for PyTorch's fp32 FFN too
        near(kernel(xs), want64)
        near(lin(xs), xs.double() @ ref.w1.weight.double().T)
    assert (kernel(x)[1] == 0).all()
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 7] = bad
        y = kernel(xb)
        with torch.no_grad():
            want = ref(xb)
            assert torch.equal(y.isnan(), want.isnan()) and y[3].isnan().any()
            assert torch.equal(kernel(xb[3:4]).isnan(), want[3:4].isnan())  # batch 1: the VNNI path's input
            keep = [b for b in range(B) if b != 3]
            near(y[keep], ref64(xb[keep].double()))


@pytest_kernel
@pytest.mark.parametrize("dtype", HALF + (torch.int8,), ids=str)
@pytest.mark.parametrize("B", [8, 16])
@pytest.mark.parametrize("fire_rate", [0.1, 0.5])
def test_batches_whose_units_fire_on_few_rows(fire_rate, B, dtype):
    """16-bit and int8 batches of 8+ rows whose active units fire on few rows each (as on real text) take
    pass 2 batch row by batch row; on many rows, unit by unit: both match the reference."""
    check_batch_case(96, 1000, B, 0.6, fire_rate, dtype)


def check_batch_case(d, h, B, s, fire_rate, dtype):
    """A random batch whose units fire with fire_rate (set_sparsity) through the C kernel with dtype weights,
    against the reference; returns the kernel, x and the seed for further checks."""
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen)
    set_sparsity(ffn, x, s, gen, fire_rate=fire_rate)
    ref = rounded(ffn, dtype)
    kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, backend="c", mode="sparse")
    with torch.no_grad():
        want, u = ref(x), x @ ref.w1.weight.T
    check_close(kernel(x), want, atol=1e-5, rtol=1e-4, note=f"seed {seed}: ")
    assert kernel.last_active == (u > 0).any(0).sum().item(), f"seed {seed}"
    return kernel, x, seed


@pytest_kernel
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF + (torch.int8,), ids=str)
@pytest.mark.parametrize("B", [2, 4, 8, 13, 16])
@pytest.mark.parametrize("d,h,s", [(37, 300, 0.0), (96, 1000, 0.3), (200, 77, 0.5)])
def test_batches_whose_units_fire_on_most_rows(d, h, s, B, dtype):
    """Batches whose units fire on at least half the rows (16-bit and int8 from 2 rows, fp32 from 8) take
    the blocked pass 2, UB units at a time with g = 0 where a unit is off; the others the unit-by-unit
    loop: both match the reference, odd d (the tails) and a row with nan (it stays in its row) included."""
    kernel, x, seed = check_batch_case(d, h, B, s, 0.8, dtype)
    x[B // 2, d // 3] = float("nan")
    y = kernel(x)
    assert y[B // 2].isnan().all() and not y[torch.arange(B) != B // 2].isnan().any(), f"seed {seed}"


@pytest_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("gate", ["relu", "silu"])
@pytest.mark.parametrize("B", [5, 8, 11, 16])
@pytest.mark.parametrize("d,h", [(64, 50), (96, 1000), (256, 683)])
def test_batches_on_amx_tiles(d, h, B, gate, dtype):
    """bf16 batches of 8+ rows with d a multiple of 32, and int8 batches of 5+ rows with d a multiple of 64,
    run their W1 pass on AMX tiles (where built and allowed; elsewhere, and for the other cases here, this
    is the AVX-512 / AVX2 path): within fp32's error of the fp64 reference, silu thresholds included; units
    past the last full tile of 16 in a chunk go through the vector path; a row with inf or nan sends the
    whole call to the vector path, nan staying in its row."""
    seed = int(torch.randint(1 << 30, ()))
    gen = torch.Generator().manual_seed(seed)
    ffn = ref_ffn(d, h)
    x = torch.randn(B, d, generator=gen)
    set_sparsity(ffn, x, 0.7, gen)
    ref = rounded(ffn, dtype)
    kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, backend="c", mode="sparse")
    with torch.no_grad():
        a = model_mod.gated(x @ ref.w1.weight.T, gate)
        t = 0.0 if gate == "relu" else threshold_for(a, 0.8)
        want = ref_thresholded(ref, gate, t)(x)
    check_close(kernel(x, gate=gate, t=t), want, atol=1e-5, rtol=1e-4, note=f"seed {seed}: ")
    assert kernel.last_active == (a.abs() > t).any(0).sum().item(), f"seed {seed}"
    x[2, 3] = float("nan")
    x[B - 1, 1] = float("inf")
    y = kernel(x, gate=gate, t=t)
    with torch.no_grad():
        want = ref_thresholded(ref, gate, t)(x)
    assert torch.equal(y.isnan(), want.isnan()) and y[2].isnan().all(), f"seed {seed}"
    keep = [b for b in range(B) if b not in (2, B - 1)]
    check_close(y[keep], want[keep], atol=1e-5, rtol=1e-4, note=f"seed {seed}, nan/inf rows: ")


@pytest.mark.skipif(not shutil.which("nvcc"), reason="no nvcc")
def test_cuda_source_compiles(tmp_path):
    """sparse_ffn.cu compiles with nvcc against this (CPU) torch's headers, so an interface change
    that breaks it fails here even on machines without a GPU. The one header a CPU torch lacks,
    c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build), is stubbed."""
    from torch.utils import cpp_extension
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig
    cmd = ["nvcc", "-c", os.path.join(HERE, "sparse_ffn.cu"), "-o", str(tmp_path / "sffn.o"), "-std=c++20",
           f"-I{tmp_path}", *[f"-I{p}" for p in cpp_extension.include_paths()], f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_sparse_ffn_cuda", "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "sparse_ffn.cu" in line]
    assert r.returncode == 0 and not ours, "\n".join(ours) or (r.stdout + r.stderr)[-3000:]


@pytest_kernel
@pytest.mark.parametrize("variant", sparse_ffn.VARIANTS)
def test_attach_matches_model(variant):
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    config = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act="relu")
    model = GPT(config).eval()
    idx = torch.randint(97, (2, 20))
    with torch.no_grad():
        want, _ = model(idx, targets=idx)  # all positions, plain FeedForward
        model.setup_cache(2, 21)
        model(idx, start_pos=0)
        want_step, _ = model(idx[:, :1], start_pos=20)  # one decode step through the KV cache
        with model.ffn_stats() as want_stats:
            model(idx)
        assert attach_mod.attach(model, variant=variant) == 2
        with model.ffn_stats() as stats:  # counting zeros takes the plain path, kernel or not
            model(idx)
        assert stats == want_stats
        assert all(b.ffn.kernel is not None for b in model.blocks)
        got, _ = model(idx, targets=idx)  # 40 tokens per FFN call: the kernel splits them
        model.setup_cache(2, 21)
        model(idx, start_pos=0)
        got_step, _ = model(idx[:, :1], start_pos=20)
        check_close(got, want, atol=1e-4, rtol=1e-4)
        check_close(got_step, want_step, atol=1e-4, rtol=1e-4)
        model.set_act("silu")  # the kernel runs silu only with a threshold: plain silu takes the plain path
        silu, _ = model(idx, targets=idx)
        attach_mod.detach(model)
        assert all(b.ffn.kernel is None for b in model.blocks)
        silu_plain, _ = model(idx, targets=idx)
        assert torch.equal(silu, silu_plain)


@pytest_kernel
def test_autograd_and_deepcopy():
    import copy
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, act="relu")
    model = GPT(config).eval()
    idx = torch.randint(97, (1, 12))
    _, want = model(idx, targets=idx)
    want.backward()
    grad = model.blocks[0].ffn.w1.weight.grad.clone()
    model.zero_grad()
    attach_mod.attach(model)
    _, loss = model(idx, targets=idx)  # autograd on: the module's own ops, so the FFN gets its gradients
    loss.backward()
    check_close(loss, want, atol=1e-6, rtol=1e-6)
    check_close(model.blocks[0].ffn.w1.weight.grad, grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError):  # the kernel itself has no backward: it says so
        model.blocks[0].ffn.kernel(torch.randn(2, 32, requires_grad=True))
    with torch.no_grad():
        want = model(idx)[0]  # the kernels have run: their weight pointers and scratch exist
    twin = copy.deepcopy(model)  # packed weights are plain tensors: a model with kernels copies
    k, k2 = model.blocks[0].ffn.kernel, twin.blocks[0].ffn.kernel
    assert k2 is not k and k2.w1.data_ptr() != k.w1.data_ptr() and "_cargs" not in k2.__dict__  # its own pointers
    assert twin.blocks[0].ffn.forward.__self__ is twin.blocks[0].ffn  # the attached forward rebound to the copy
    del model, k
    with torch.no_grad():
        check_close(twin(idx)[0], want, atol=0, rtol=0)
        assert k2._cargs[2] == sparse_ffn._ptr(k2.w1)


@pytest_kernel
def test_backends_and_build_report():
    b = sparse_ffn.backends()
    assert set(b) >= {"c", "cuda", "torch"} and b["torch"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in b.values())
    assert sparse_ffn.c_info()["max_batch"] >= 1
    if torch.version.cuda is None:  # a CPU-only torch: the CUDA build says why it skips
        ok, msg = build.build_cuda()
        assert ok is None and "CPU-only" in msg


@pytest_kernel
def test_bench_smoke(tmp_path):
    """bench.py's main path at its smallest (tiny sizes, few reps, a 16 MiB roof): every row it should print is
    printed and written, as strict JSON; the numbers are checked for sense, never for speed."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--sizes=40x72,24x50", "--batches=1,3", "--sparsities=0,90",
                        "--dtypes=float32,int8", "--min_time=0.001", "--min_reps=2", "--rotate_mb=1", "--roof_mb=16",
                        "--e2e=False", "--gather=True", f"--json={out}"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    def no_constant(c):
        raise ValueError(f"not strict JSON: {c}")
    report = json.loads(out.read_text(), parse_constant=no_constant)
    rows = report["rows"]
    assert report["threads"] == torch.get_num_threads() and report["cpu"]
    want = {("torch dense", "float32", d, B, None) for d in (40, 24) for B in (1, 3)}
    want |= {(impl, dt, d, B, s) for d in (40, 24) for B in (1, 3) for s in (0.0, 90.0)
             for impl, dt in (("C tuned", "float32"), ("C tuned", "int8"), ("C plain", "float32"), ("C plain", "int8"),
                              ("torch gather", "float32"))}
    got = {(r_["impl"], r_["dtype"], r_["d"], r_["B"], r_["s"]) for r_ in rows}
    assert want <= got, sorted(want - got)
    for row in rows:
        assert row["time_ms"] > 0 and row["GBps"] > 0 and row["roof_GBps"] > 0, row
        assert f"{row['impl']:13s} {row['dtype']:8s} {row['d']:5d}" in r.stdout, row
        if row["impl"] != "torch dense":
            assert row["speedup"] > 0, row
        if row["impl"] in ("C tuned", "C plain") and row["dtype"] == "float32":  # dense bytes / these bytes, W1 in full
            n_on = row["h"] - round(row["s"] / 100 * row["h"])
            assert row["ideal"] == pytest.approx(3 / (1 + 2 * n_on / row["h"]), rel=1e-6), row


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
@pytest.mark.parametrize("d,h", [(37, 101), (256, 683), (2048, 8192)])
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
                    a = model_mod.gated(x.float() @ ref0.w1.weight.T, gate)
                    t = 0.0 if gate == "relu" and (a == 0).float().mean() >= s else threshold_for(a, s)
                    want = ref_thresholded(ref0, gate, t)(x.float())
                kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, device="cuda")
                out = torch.full((B, d), float("nan"), dtype=dtype, device="cuda")
                y = kernel(x.cuda(), out=out, gate=gate, t=t)
                check_cuda(y, want, dtype, note=f"seed {seed}, d={d}, s={s}, B={B}, t={t}: ")
                if s == 1.0:
                    assert (y == 0).all()
