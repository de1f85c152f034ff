"""
The sparse FFN for inference: y = W2 (g_t(W1 x) * (W3 x)), reading W3 rows and W2 columns only for the
active hidden units. g_t(u) = g(u) where |g(u)| > t, else 0, with the gate g = relu (the method: t = 0 is
plain relu) or silu (CATS-style thresholding of a SILU model, Lee et al. 2024); t >= 0 is per call.

    import sparse_ffn
    y, n = sparse_ffn.gather_ffn(x, w1, w3, w2)        # the idea in four torch lines (any device, autograd too)
    ffn = sparse_ffn.SparseFFN(model.blocks[0].ffn)    # the weights packed once for a kernel (a copy)
    y = ffn(x)                                         # x: (B, d) fp32 on CPU, or the weight dtype on CUDA
    y = ffn(x, gate="silu", t=0.05)                    # CATS: units with |silu(W1 x)| <= 0.05 are skipped
    plain = sparse_ffn.SparseFFN(ffn_module, variant="plain")  # the plain C kernel, beside the tuned one
    from lib.attach import attach; attach(model)       # every FFN of an eval-mode model through its kernel
    sparse_ffn.backends()                              # {"c": True or why not, "cuda": ..., "torch": True}

Backends: the C kernel (_sparse_ffn_c: sparse_ffn.c, its plain and tuned kernels) on CPU, built with cffi on
first use (or by `python build.py`) and rebuilt when its source changes; the CUDA extension (_sparse_ffn_cuda,
`python build.py`) on GPU; and the torch gather wherever no compiled kernel is present. Importing this file
compiles nothing and needs no network. Packed weights are a snapshot: after training, attach again.

The path depends on the batch size only, so the same input gives the same bits on every call (mode="auto", the
default): batches of at most SFFN_MAX_B rows (decoding) run the sparse kernel; larger ones (a prompt's prefill,
where the union of active units covers nearly every unit) run PyTorch's dense GEMMs on the packed fp32 weights,
which read each weight once for the whole batch. mode="sparse" / "dense" force one path.
"""

import sys
import threading

import numpy as np
import torch
import torch.nn.functional as F

from model import check_threshold, gate_t

_c_lock = threading.Lock()
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}  # as in sparse_ffn.c
GATES = {"relu": 0, "silu": 1}  # as in sparse_ffn.c and sparse_ffn.cu
MODES = ("auto", "sparse", "dense")
VARIANTS = ("tuned", "plain")  # the C kernel: sffn_forward, or sffn_forward_plain (the reference C, timed beside it)
CUDA_MAX_BATCH = 16  # rows per launch of sparse_ffn.cu (its kMaxBatch); larger batches are split
SFFN_MAX_B = 16  # rows per call of sparse_ffn.c (its SFFN_MAX_B, checked when it loads); larger batches are split

# -----------------------------------------------------------------------------
# the idea, in torch


def gather_ffn(x, w1, w3, w2, gate="relu", t=0.0):
    """The sparse FFN as the kernels compute it, in torch: x (B, d); w1, w3 (h, d) and w2 (d, h), as nn.Linear
    holds them. W1 is read in full; of W3 and W2 only the rows / columns of the units active for some row of
    the batch. Returns (y (B, d), the number of active units). Equals FeedForward with act=gate, threshold t."""
    a = gate_t(x @ w1.T, gate, t)  # (B, h): g_t(W1 x)
    idx = (a != 0).any(0).nonzero().squeeze(1)  # the union of the active units (nan counts as active)
    g = a[:, idx] * (x @ w3[idx].T)  # (B, n): W3 rows of the active units only
    return g @ w2[:, idx].T, idx.numel()  # W2 columns of the active units only


# -----------------------------------------------------------------------------
# loading the compiled kernels (lazily, so that build.py can build them first in the same process)

_mods, _why = {}, {}


def _load():
    if _mods or _why:
        return
    try:  # built on first use, and rebuilt when sparse_ffn.c or build.py is newer (cffi, as build.py)
        import build
        if build.c_is_stale():
            print("sparse_ffn: building the C kernel once (python build.py does the same) ...", file=sys.stderr)
            ok, msg = build.ensure_c()
            print(f"sparse_ffn: {msg}" + ("" if ok else "; the torch path runs instead"), file=sys.stderr)
    except ImportError:
        pass
    try:
        import _sparse_ffn_c
        if _sparse_ffn_c.lib.sffn_max_batch() != SFFN_MAX_B:
            raise ImportError(f"it takes {_sparse_ffn_c.lib.sffn_max_batch()} rows a call, this file {SFFN_MAX_B}")
        _mods["c"] = _sparse_ffn_c
    except ImportError as e:
        _why["c"] = f"_sparse_ffn_c not built ({e}); `python build.py -v` shows why"
    try:
        import _sparse_ffn_cuda  # a torch extension: needs torch imported first, done above
        _mods["cuda"] = _sparse_ffn_cuda
    except ImportError as e:
        _why["cuda"] = f"_sparse_ffn_cuda not built ({e}); `python build.py` on a machine with CUDA torch and nvcc"
    except OSError as e:  # built against another torch / CUDA
        _why["cuda"] = f"_sparse_ffn_cuda failed to load: {e}"


def backends():
    """name -> True if usable here, else the reason why not."""
    _load()
    out = {"c": "c" in _mods or _why["c"], "cuda": "cuda" in _mods or _why["cuda"], "torch": True}
    if out["cuda"] is True and not torch.cuda.is_available():
        out["cuda"] = "built, but torch.cuda.is_available() is False"
    return out


def c_info():
    """How the C kernel was compiled: simd path, OpenMP threads (0 = none), largest batch per call."""
    _load()
    if "c" not in _mods:
        return None
    lib = _mods["c"].lib
    return dict(simd={3: "avx512+vnni", 2: "avx512", 1: "avx2+fma+f16c"}.get(lib.sffn_simd(), "portable"),
                amx=bool(lib.sffn_amx()), openmp=lib.sffn_openmp(), max_batch=lib.sffn_max_batch())

# -----------------------------------------------------------------------------
# the packed weights, and running a C kernel on them


def huge_empty(shape, dtype=torch.float32, device="cpu"):
    """torch.empty, on transparent huge pages where Linux gives them (asked for before the memory is touched).
    On the 2-core Xeon a 1 GiB read runs 20-35% faster from them (fewer TLB misses); PyTorch's own allocator
    asks only under THP_MEM_ALLOC_ENABLE=1. Without the C kernel, or off Linux, plain torch.empty."""
    t = torch.empty(shape, dtype=dtype, device=device)
    _load()
    if "c" in _mods and t.device.type == "cpu" and t.numel():
        _mods["c"].lib.sffn_advise_hugepages(_mods["c"].ffi.cast("void *", t.data_ptr()), t.numel() * t.element_size())
    return t


def quantize_rows(w):
    """Symmetric per-row int8: w ~ q * scale[:, None], q in [-127, 127], scale = max|row| / 127 (fp32).
    A row of zeros gets scale 0 and q 0; a row with nan or inf cannot be quantized (ValueError)."""
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("int8 weights need finite values: this weight has nan or inf")
    scale = w.abs().amax(1) / 127
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantized(w):
    """The weight an int8 kernel computes with: quantize_rows(w), multiplied back (fp32)."""
    q, scale = quantize_rows(w)
    return q.float() * scale[:, None]


def _as_tensor(a, name):
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)  # shares memory, so `out` works for arrays too
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    return a


def _ptr(t, kind="void *"):
    return _mods["c"].ffi.NULL if t is None else _mods["c"].ffi.cast(kind, t.data_ptr())


class _Scratch:
    """The C kernels' scratch memory (x padded, per-thread partial y's), grown to each call's need; one per
    SparseFFN / DenseLinear, and one shared by the custom ops (all used under _c_lock)."""

    def __init__(self):
        self._scratch, self._scratch_p = torch.empty(0), None

    def __getstate__(self):  # a copy gets scratch and weight pointers of its own (cffi pointers do not copy)
        return {k: v for k, v in self.__dict__.items() if k not in ("_scratch", "_scratch_p", "_cargs")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        _Scratch.__init__(self)

    def run_c(self, fn, need, x, out, *args):
        """fn(x, rows, *args, out, scratch, n_scratch, threads), a C kernel, over x (N, d) -> out (N, d_out) in calls
        of at most SFFN_MAX_B rows, with this scratch grown to need(rows, threads) floats (the kernel checks the
        size it is given). Returns the largest result of a call (sffn_forward: the union of active units)."""
        T = torch.get_num_threads()  # torch's thread count, so the kernel shares torch's cores
        (N, d), d_out = x.shape, out.shape[1]
        if N == 0:  # an empty batch: nothing to compute, no call
            return 0
        with _c_lock:  # cffi releases the GIL during the call, and the scratch is shared by this owner's calls
            floats = need(min(N, SFFN_MAX_B), T)  # this call's own need: no cache key stands in for it
            if self._scratch.numel() < floats:
                self._scratch = torch.empty(floats)
                self._scratch_p = _ptr(self._scratch, "float *")
            px, py, have = _ptr(x, "float *"), _ptr(out, "float *"), self._scratch.numel()
            rs = [fn(px + b0 * d, min(SFFN_MAX_B, N - b0), *args, py + b0 * d_out, self._scratch_p, have, T)
                  for b0 in range(0, N, SFFN_MAX_B)]
        if min(rs) < 0:  # the Python checks make this unreachable
            raise RuntimeError(f"the C kernel rejected its arguments ({fn})")
        return max(rs)


class SparseFFN(_Scratch):
    """The weights of one gated FFN, packed once for the sparse kernels (a copy: a snapshot).

    SparseFFN(ffn) takes a model.FeedForward; SparseFFN(w1, w3, w2) takes nn.Linear-layout weights
    w1, w3: (h, d), w2: (d, h). dtype: how the weights are stored (default: theirs); fp16 / bf16
    halve the bytes read, int8 quarter them. device: where (default: theirs). backend: "c", "cuda" or "torch"
    (default: the compiled kernel for the device if there is one, else "torch"). variant (backend "c"):
    "tuned" (sffn_forward) or "plain" (sffn_forward_plain). mode: see the module's docstring.
    Inputs: x (B, d), contiguous, on `device`; fp32 on CPU (any weight dtype), the weight dtype on CUDA.
    """

    def __init__(self, w1, w3=None, w2=None, dtype=None, device=None, backend=None, mode="auto", variant="tuned"):
        if w3 is None and w2 is None and hasattr(w1, "w1"):
            w1, w3, w2 = w1.w1.weight, w1.w3.weight, w1.w2.weight
        w1, w3, w2 = (_as_tensor(w, n) for w, n in ((w1, "w1"), (w3, "w3"), (w2, "w2")))
        if w1.dim() != 2 or w3.shape != w1.shape or w2.shape != w1.shape[::-1]:
            raise ValueError(f"expected w1, w3 (h, d) and w2 (d, h), got {tuple(w1.shape)}, "
                             f"{tuple(w3.shape)}, {tuple(w2.shape)}")
        self.h, self.d = w1.shape
        if self.h == 0 or self.d == 0:
            raise ValueError(f"empty weights: h={self.h}, d={self.d}")
        self.dtype = w1.dtype if dtype is None else dtype
        if self.dtype not in DTYPE_CODES:
            raise TypeError(f"weight dtype must be one of {list(DTYPE_CODES)}, got {self.dtype}")
        self.device = torch.device(device) if device is not None else w1.device
        if self.dtype == torch.int8 and self.device.type != "cpu":
            raise TypeError("int8 weights run on the CPU only (the C kernel, or the torch path)")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.in_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        avail = backends()
        native = {"cpu": "c", "cuda": "cuda"}.get(self.device.type)
        if backend is None:
            backend = native if native and avail[native] is True else "torch"
        if backend not in ("c", "cuda", "torch") or (backend != "torch" and backend != native):
            raise ValueError(f"backend {backend!r} does not run on device {self.device}")
        if avail[backend] is not True:
            raise ValueError(f"backend {backend!r} is not available: {avail[backend]}")
        self.backend = backend
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if variant not in VARIANTS or (variant == "plain" and backend != "c"):
            raise ValueError(f"variant must be one of {VARIANTS} (plain: backend 'c' only), got {variant!r}")
        self.variant = variant
        # the per-batch-size choice, for fp32 weights in the C kernel only: with 16-bit weights the kernel reads half
        # the bytes of fp32 dense, and PyTorch's 16-bit GEMMs on the CPU would round x and y to 16 bits
        self._auto = mode == "auto" and backend == "c" and self.dtype == torch.float32
        self.last_active = None  # active units (union over the batch) of the last call, when known
        self.last_path = None  # "sparse" or "dense": what the last call ran

        packed = lambda shape: huge_empty(shape, self.dtype, self.device)

        h, d = self.h, self.d
        self.scales = None  # int8: the per-row scales of W1, W3 and W2^T, (3, h) fp32
        with torch.no_grad():
            if self.dtype == torch.int8:  # quantized once, here: a row of W1, W3 or W2^T has one scale
                (q1, s1), (q3, s3), (q2, s2) = (quantize_rows(w) for w in (w1, w3, w2.t()))
                self.scales = torch.stack([s1, s3, s2]).contiguous()
                w1, w3, w2 = q1, q3, q2.t()
            self.w1 = packed((h, d))
            self.w1.copy_(w1)
            if self.device.type == "cpu":  # row j = [W3_j | W2^T_j]: one contiguous read per active unit
                self.w32 = packed((h, 2 * d))
                self.w32[:, :d].copy_(w3)
                self.w32[:, d:].copy_(w2.t())
                self.w3, self.w2t = self.w32[:, :d], self.w32[:, d:]  # views, for the torch path
            else:
                self.w3 = packed((h, d))
                self.w3.copy_(w3)
                self.w2t = packed((h, d))
                self.w2t.copy_(w2.t())
        _Scratch.__init__(self)

    def _c_kernel(self):
        """The C kernel of this variant, its scratch need and its arguments past x and the row count: made once
        (the weights' cffi pointers are not copied with the object: see __getstate__)."""
        if "_cargs" not in self.__dict__:
            lib, d, h = _mods["c"].lib, self.d, self.h
            args = (d, h, _ptr(self.w1), _ptr(self.w32), DTYPE_CODES[self.dtype], _ptr(self.scales, "float *"))
            if self.variant == "plain":
                self._cargs = lib.sffn_forward_plain, lambda B, T: lib.sffn_plain_scratch_floats(B, d, h, T), args
            else:
                self._cargs = lib.sffn_forward, lambda B, T: lib.sffn_scratch_floats(B, d, T), args
        return self._cargs

    def __repr__(self):
        v = f", variant={self.variant}" if self.backend == "c" else ""
        return f"SparseFFN(d={self.d}, h={self.h}, dtype={self.dtype}, device={self.device}, backend={self.backend}{v})"

    def _check(self, t, name, B=None):
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, the weights on {self.device}")
        if t.dtype != self.in_dtype:
            raise TypeError(f"{name} must be {self.in_dtype} for {self}, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != self.d or (B is not None and t.shape[0] != B):
            want = f"({'B' if B is None else B}, {self.d})"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")
        if t.is_neg() or t.is_conj():  # its raw memory holds the un-negated values: writing there is wrong
            raise ValueError(f"{name} is a lazy negated or conjugated view: pass a plain tensor "
                             "(.resolve_neg() / .resolve_conj() give one)")

    def __call__(self, x, out=None, gate="relu", t=0.0):
        """y = W2 (g_t(W1 x) * (W3 x)) for x (B, d). out: an optional (B, d) buffer, overwritten.
        gate: "relu" or "silu"; t: the threshold, a float in [0, T_MAX] (0 with relu: plain relu)."""
        code = GATES.get(gate) if isinstance(gate, str) else None
        if code is None:
            raise ValueError(f"gate must be one of {list(GATES)}, got {gate!r}")
        check_threshold(t)
        t = float(t)
        if not self._plain(x):  # the checks one by one, for their messages (and numpy arrays, lazy views)
            x = _as_tensor(x, "x")
            if x.is_neg() or x.is_conj():  # a lazy view: the kernels read raw memory, so materialize it
                x = x.resolve_neg().resolve_conj()
            self._check(x, "x")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("the sparse kernels compute no gradients: call under torch.no_grad() "
                             "(attach() falls back to the module's own ops when autograd is on)")
        B = x.shape[0]
        if out is None:
            out = torch.empty_like(x)
        else:
            if not self._plain(out) or out.shape[0] != B:
                out = _as_tensor(out, "out")
                self._check(out, "out", B)
            n = B * self.d * x.element_size()
            if B and out.data_ptr() < x.data_ptr() + n and x.data_ptr() < out.data_ptr() + n:
                raise ValueError("out must not overlap x")
        if B == 0:
            return out
        if self._choose(B) == "dense":
            self._dense(x, out, gate, t)
        elif self.backend == "c":
            fn, need, args = self._c_kernel()
            self.last_active = self.run_c(fn, need, x, out, *args, code, t)
        elif self.backend == "cuda":
            for b0 in range(0, B, CUDA_MAX_BATCH):  # no host sync: the launches queue on the stream
                _mods["cuda"].forward(x[b0:b0 + CUDA_MAX_BATCH], self.w1, self.w3, self.w2t,
                                      out[b0:b0 + CUDA_MAX_BATCH], code, t)
        else:
            self._torch(x, out, gate, t)
        return out

    def _plain(self, t):
        """t is a plain tensor that _check would pass: the common case, tested in one expression."""
        return (type(t) is torch.Tensor and t.dtype == self.in_dtype and t.device == self.device and t.dim() == 2
                and t.shape[1] == self.d and t.is_contiguous() and not t.is_neg() and not t.is_conj())

    def _choose(self, B):
        """auto: the sparse kernel for a batch it takes in one call, dense GEMMs past that. A function of B
        alone, never of timings or of earlier calls: a model, an input and a thread count give one result."""
        if self._auto:
            self.last_path = "dense" if B > SFFN_MAX_B else "sparse"
        else:
            self.last_path = "dense" if self.mode == "dense" else "sparse"
        return self.last_path

    def _weights(self):
        """w1, w3, w2t as torch computes with them: the packed tensors, or for int8 their dequantized fp32 copies."""
        ws = (self.w1, self.w3, self.w2t)
        return ws if self.scales is None else tuple(w.float() * s[:, None] for w, s in zip(ws, self.scales))

    def _dense(self, x, out, gate, t):
        """The dense FFN with PyTorch's GEMMs on the packed weights (W3 and W2^T are strided views of
        the packed rows: BLAS reads them in place, no copy). With 16-bit weights (mode="dense" only),
        x and the result are rounded to the weights' dtype; int8 weights are dequantized (a copy)."""
        w1, w3, w2t = self._weights()
        xd = x if x.dtype == w1.dtype else x.to(w1.dtype)
        a = gate_t(F.linear(xd, w1), gate, t)
        self.last_active = int((a != 0).any(0).sum())
        y = torch.matmul(a * F.linear(xd, w3), w2t)
        out.copy_(y)

    def _torch(self, x, out, gate, t):
        """The torch backend: gather_ffn on the packed weights (int8: dequantized)."""
        w1, w3, w2t = (w if w.dtype == x.dtype else w.to(x.dtype) for w in self._weights())
        y, self.last_active = gather_ffn(x, w1, w3, w2t.T, gate, t)
        out.copy_(y)

    def apply(self, x, gate="relu", t=0.0):
        """Any (N, d) x: converts dtype and layout as needed and returns y in x's dtype."""
        y = self(x.to(self.in_dtype).contiguous(), gate=gate, t=t)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class DenseLinear(_Scratch):
    """y = x W^T by the C kernel's dense GEMV, W packed once in `dtype` (a copy): with 16-bit weights the
    attention projections and the output layer read half the bytes, as the FFN does. x: (N, d) fp32 on
    the CPU, N rows in calls of at most 16."""

    def __init__(self, weight, dtype=None):
        weight = _as_tensor(weight, "weight")
        if weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"weight must be a non-empty (n, d) matrix, got {tuple(weight.shape)}")
        if weight.device.type != "cpu":
            raise ValueError(f"DenseLinear runs on the CPU, the weight is on {weight.device}")
        if backends()["c"] is not True:
            raise ValueError(f"the C kernel is not available: {backends()['c']}")
        self.dtype = weight.dtype if dtype is None else dtype
        if self.dtype not in DTYPE_CODES:
            raise TypeError(f"weight dtype must be one of {list(DTYPE_CODES)}, got {self.dtype}")
        self.n, self.d = weight.shape
        self.scales = None
        with torch.no_grad():
            if self.dtype == torch.int8:
                self.w, self.scales = quantize_rows(weight)
            else:
                self.w = weight.detach().to(self.dtype, copy=True).contiguous()
        _Scratch.__init__(self)

    def __repr__(self):
        return f"DenseLinear(d={self.d}, n={self.n}, dtype={self.dtype})"

    def __call__(self, x):
        x = _as_tensor(x, "x")
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must be a (N, {self.d}) float32 CPU tensor, got {tuple(x.shape)} {x.dtype} on {x.device}")
        x = x.resolve_neg().resolve_conj().contiguous()
        out = torch.empty(x.shape[0], self.n)
        lib, code = _mods["c"].lib, DTYPE_CODES[self.w.dtype]
        self.run_c(lib.sffn_gemv, lambda B, T: lib.sffn_scratch_floats(B, self.d, 0), x, out,
                   self.d, self.n, _ptr(self.w), code, _ptr(self.scales, "float *"))
        return out

    def apply(self, x):
        """Any (..., d) x: y in x's dtype and shape (..., n)."""
        y = self(x.reshape(-1, self.d).to(torch.float32))
        return y.view(*x.shape[:-1], self.n).to(x.dtype)
