"""
The tuned C kernel's own paths, each against the reference: int8 weights with x at every scale (the VNNI /
AMX-INT8 input path where built), batches whose units fire on few or most rows (pass 2 row by row, unit by
unit, blocked), the W1 pass on AMX tiles; the same source built for every SIMD path (AVX-512 without VNNI /
AMX, AVX2, portable: --full, a build each); the build on first use and the rebuild when stale; each C header
compiling on its own.

Run: python -m pytest -q tests/test_kernels_tuned.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network. Behaviour only: no timing is asserted anywhere; bench.py prints the numbers.
"""

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import build
import model as model_mod
import sparse_ffn
from testutil import (CPU_DTYPES, HALF, ROOT, as_stored, check_close, full_only, pytest_kernel, ref_ffn, ref_thresholded,
                      rounded, set_sparsity, threshold_for)


# -----------------------------------------------------------------------------
# int8 weights: x at every scale (the VNNI and AMX paths where built)


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


# -----------------------------------------------------------------------------
# batches: pass 2 row by row, unit by unit, blocked; the W1 pass on AMX tiles


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
@pytest.mark.parametrize("B", [2, *full_only(4), 8, *full_only(13), 16])
@pytest.mark.parametrize("d,h,s", [(37, 300, 0.0), (96, 1000, 0.3), *full_only((200, 77, 0.5))])
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
@pytest.mark.parametrize("B", [5, *full_only(8, 11), 16])
@pytest.mark.parametrize("d,h", [(64, 50), (96, 1000), *full_only((256, 683))])
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
        a = model_mod.gate_t(x @ ref.w1.weight.T, gate)
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


# -----------------------------------------------------------------------------
# every SIMD build of the same source; the build itself


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


@pytest.mark.full  # a build of sparse_ffn.c each, ~50 s on 2 cores; the fast run tests the native build
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
                    a = model_mod.gate_t(x @ ref.w1.weight.T, "silu")
                    t = threshold_for(a, s)
                    want = ref_thresholded(ref, "silu", t)(x)
                check_close(kernel(x, gate="silu", t=t), want, atol=1e-5, rtol=1e-4, note=f"seed {seed}, silu t={t}: ")
                lin = sparse_ffn.DenseLinear(ffn.w1.weight, dtype)
                check_close(lin(x), F.linear(x, as_stored(ffn.w1.weight, dtype)), atol=1e-5, rtol=1e-4)


@pytest.mark.full  # three builds from scratch, ~3 min on 2 cores; the fast run has the test after it
def test_c_kernel_is_built_on_first_use_and_rebuilt_when_stale(tmp_path):
    """A fresh checkout: the first use of sparse_ffn builds the C kernel (one line), the next
    reuses it, and a newer sparse_ffn.c or header triggers a rebuild."""
    import shutil
    for f in ("sparse_ffn.py", "model.py", "build.py") + build.C_SOURCES:
        (tmp_path / f).parent.mkdir(exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    use = lambda: subprocess.run([sys.executable, "-c", "import sparse_ffn; print(sparse_ffn.backends()['c'])"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300)
    first = use()
    assert first.stdout.strip() == "True" and "building the C kernel once" in first.stderr, first.stderr
    again = use()
    assert again.stdout.strip() == "True" and again.stderr == ""
    for i, f in enumerate(("sparse_ffn.c", "kernels/sparse_ffn_simd.h")):
        later = time.time() + 5 * (i + 1)
        os.utime(tmp_path / f, (later, later))
        rebuilt = use()
        assert rebuilt.stdout.strip() == "True" and "building the C kernel once" in rebuilt.stderr, f


@pytest_kernel
def test_c_kernel_once_built_is_reused_and_a_newer_source_makes_it_stale(tmp_path, monkeypatch):
    """The fast run's share of the test above, compiling nothing: a checkout with its kernel built (this
    one's, copied after the sources) imports it without building, and ensure_c() finds it up to date; a
    newer sparse_ffn.c, header or build.py makes it stale (the rebuild that follows: the test above)."""
    import shutil
    for f in ("sparse_ffn.py", "model.py", "build.py") + build.C_SOURCES:
        (tmp_path / f).parent.mkdir(exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    so = tmp_path / os.path.basename(sparse_ffn._mods["c"].__file__)
    shutil.copy(sparse_ffn._mods["c"].__file__, so)
    r = subprocess.run([sys.executable, "-c", "import build, sparse_ffn; print(sparse_ffn.backends()['c'], build.ensure_c())"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "True (True, 'up to date')" and r.stderr == "", (r.stdout, r.stderr)
    monkeypatch.setattr(build, "HERE", str(tmp_path))
    built = os.path.getmtime(so)
    sources = build.C_SOURCES + ("build.py",)
    for f in sources:
        os.utime(tmp_path / f, (built - 1, built - 1))
    assert not build.c_is_stale()
    for f in sources:
        os.utime(tmp_path / f, (built + 5, built + 5))
        assert build.c_is_stale(), f
        os.utime(tmp_path / f, (built - 1, built - 1))


def test_every_c_header_compiles_on_its_own():
    """Each C header has an include guard and includes what it uses: included twice and alone, it compiles
    under every flag set build.py may fall back to (with and without -march=native, -fopenmp). A header that
    leans on names its includer happened to define first breaks as soon as someone reorders the includes."""
    import glob
    import shlex
    from concurrent.futures import ThreadPoolExecutor
    cc = build.find_c_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    headers = sorted(glob.glob(os.path.join(ROOT, "*.h")) + glob.glob(os.path.join(ROOT, "kernels", "*.h")))
    assert len(headers) >= 4, headers

    def cc_run(flags, header=None):  # the header included twice, from stdin; None: an empty file
        src = f'#include "{header}"\n#include "{header}"\n' if header else ""
        dirs = ["-I" + os.path.dirname(header)] if header else []
        return subprocess.run(shlex.split(cc) + ["-fsyntax-only", "-x", "c", *flags, *dirs, "-I" + ROOT, "-"],
                              input=src, capture_output=True, text=True, timeout=60)

    sets = [[f for f in cflags if f != "-O3"] for cflags, _, _ in build.C_FLAG_SETS]
    sets = [s for s in sets if cc_run(s).returncode == 0]  # e.g. -march=native where the compiler rejects it
    assert [] in sets
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        runs = list(pool.map(lambda c: (c, cc_run(*c)), [(s, h) for s in sets for h in headers]))
    failed = [f"{os.path.relpath(h, ROOT)} {' '.join(s)}:\n{r.stderr[:600]}" for (s, h), r in runs if r.returncode]
    assert not failed, "\n".join(failed)


@pytest_kernel
def test_backends_and_build_report():
    b = sparse_ffn.backends()
    assert set(b) >= {"c", "cuda", "torch"} and b["torch"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in b.values())
    assert sparse_ffn.c_info()["max_batch"] >= 1
    if torch.version.cuda is None:  # a CPU-only torch: the CUDA build says why it skips
        ok, msg = build.build_cuda()
        assert ok is None and "CPU-only" in msg


@pytest.mark.full  # the builds above, reused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_simd_variants_decode(c_variant, dtype, monkeypatch):
    """decode.c in the same AVX2 / AVX-512 / portable builds: every step's logits against the reference
    (the fp32 model itself; bf16 and int8 against the twin holding the weights as stored)."""
    import decode
    from test_decode import check_engine, random_model, stored_twin
    monkeypatch.setitem(sparse_ffn._mods, "c", c_variant)
    for ffn in ("sparse", "dense"):
        model = random_model(n_embd=36, n_head=2, n_kv_head=1, ffn_hidden=77)
        decode.attach_engine(model, dtype=dtype, ffn=ffn)
        ref = model if dtype == torch.float32 else stored_twin(model, dtype, sparse=ffn == "sparse")
        check_engine(model, ref, torch.randint(97, (2, 5)), 8)
