"""
Switching a model onto the sparse kernels, from outside: model.py stays the plain reference.

    from lib.attach import attach, detach
    attach(model)                     # every FeedForward of an eval-mode model runs sparse_ffn's kernel
    attach(model, dtype=torch.int8)   # its weights packed as int8 (per-row scales), bf16, fp16 or fp32
    attach(model, linear=True)        # the attention projections and the output layer through the C GEMV too
    detach(model)                     # back to the module's own forward

attach() packs each FFN once (sparse_ffn.SparseFFN: a snapshot; after training, attach again) and gives the
module a forward that calls it where it computes exactly the module's function: eval mode, act relu (or silu
with a threshold, CATS), no autograd, no statistics being counted; elsewhere the module's own forward runs.
Under torch.compile (model.generate(..., compile=True)) the C kernels run as the custom ops below, always
sparse. int8_twin(model) is the plain-PyTorch model with the weights an int8 kernel computes with.
"""

import copy
import types

import torch
import torch.nn.functional as F

import sparse_ffn
from model import Attention, FeedForward
from model import check_threshold
from sparse_ffn import DTYPE_CODES, GATES, DenseLinear, SparseFFN, _Scratch, _ptr, dequantized

# -----------------------------------------------------------------------------
# the forwards that attach() gives a module


def _ffn_forward(m, x):
    """FeedForward.forward through m.kernel where that is the same function; else the module's own."""
    if (m.training or m.stats is not None or (x.requires_grad and torch.is_grad_enabled())
            or not (m.act == "relu" or m.act == "silu" and m.threshold > 0)):
        return FeedForward.forward(m, x)
    k = m.kernel
    x2 = x.reshape(-1, k.d).to(k.in_dtype).contiguous()
    if torch.compiler.is_compiling() and k.backend == "c":
        y = c_ffn_op(x2, k.w1, k.w32, k.scales, GATES[m.act], float(m.threshold))
    else:
        y = k(x2, gate=m.act, t=m.threshold)
    return y.view(x.shape).to(x.dtype)


def _linear_forward(m, x):
    """nn.Linear's forward through the C GEMV (m.dense_kernel) at inference, else its own."""
    if m.training or (x.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, m.weight, m.bias)
    k = m.dense_kernel
    if torch.compiler.is_compiling():
        y = c_gemv_op(x.reshape(-1, k.d).to(torch.float32).contiguous(), k.w, k.scales)
        return y.view(*x.shape[:-1], k.n).to(x.dtype)
    return k.apply(x)


def attach(model, enable=True, dtype=None, backend=None, linear=False, variant="tuned"):
    """Pack every FeedForward of `model` (m.kernel = SparseFFN(m, dtype, backend, variant=variant)) and give it
    the forward above. dtype: how the weights are stored (default: the model's); backend: as in SparseFFN.
    linear=True (CPU): the attention projections and the output layer also run through the C kernel's
    dense GEMV, in the same dtype. attach(model, False) undoes it. Returns the number of FFNs touched."""
    n = 0
    for m in model.modules():
        if isinstance(m, FeedForward):
            if enable:
                m.kernel = SparseFFN(m, dtype=dtype, backend=backend, variant=variant)
                m.forward = types.MethodType(_ffn_forward, m)  # a bound method: deepcopy rebinds it to the copy
            else:
                m.__dict__.pop("kernel", None)
                m.__dict__.pop("forward", None)
            n += 1
    heads = [l for a in model.modules() if isinstance(a, Attention) for l in (a.wq, a.wk, a.wv, a.wo)]
    heads += [model.lm_head] if hasattr(model, "lm_head") else []
    for l in heads:
        if enable and linear and l.bias is None:
            l.dense_kernel = DenseLinear(l.weight, dtype)
            l.forward = types.MethodType(_linear_forward, l)
        elif "forward" in l.__dict__:  # detach: back to nn.Linear's own forward
            del l.forward, l.dense_kernel
    return n


def detach(model):
    return attach(model, False)


# -----------------------------------------------------------------------------
# the C kernels as torch custom ops: opaque to torch.compile, so a compiled decode step keeps them in one
# graph instead of breaking it at every cffi call. Defined with torch.library.Library and a CPU kernel rather
# than @torch.library.custom_op: a call costs ~8 us against ~15 us (measured on the 2-core Xeon), which
# matters at ~40 calls per decoded token on a small model

_OP_SCRATCH = _Scratch()  # shared by both ops: each call grows it to its own need


def _op_args(op, x, w, scales, n_scales):
    """The ops are public (torch.ops.sparse_ffn.*) and hand raw pointers to C: x and the scales are checked here
    (the weights by _check_w), and x made contiguous, so a wrong tensor gets a ValueError, never a read past a
    buffer. scales: None, or for int8 weights n_scales fp32 values per row of w. Returns x as C reads it."""
    cpu = lambda t: t.device.type == "cpu"
    if not (cpu(x) and x.dtype == torch.float32 and x.dim() == 2):
        raise ValueError(f"{op}: x must be a (N, d) float32 CPU tensor, got {tuple(x.shape)} {x.dtype} on {x.device}")
    want_s = (n_scales, w.shape[0]) if n_scales > 1 else (w.shape[0],)
    if w.dtype == torch.int8:
        if scales is None or not (cpu(scales) and scales.dtype == torch.float32 and tuple(scales.shape) == want_s
                                  and scales.is_contiguous()):
            raise ValueError(f"{op}: int8 weights need contiguous float32 CPU scales of shape {want_s}")
    elif scales is not None:
        raise ValueError(f"{op}: scales are for int8 weights only, the weights are {w.dtype}")
    return x.resolve_neg().resolve_conj().contiguous()


def _check_w(op, name, w, shape):
    if not (w.device.type == "cpu" and w.dtype in DTYPE_CODES and tuple(w.shape) == shape and w.is_contiguous()):
        raise ValueError(f"{op}: {name} must be a contiguous CPU tensor of shape {shape} in one of "
                         f"{list(DTYPE_CODES)}, got {tuple(w.shape)} {w.dtype} on {w.device}")


def _c_ffn_cpu(x, w1, w32, scales, gate, t):
    if w1.dim() != 2:
        raise ValueError(f"c_ffn: w1 must be (h, d), got {tuple(w1.shape)}")
    (h, d) = w1.shape
    _check_w("c_ffn", "w1", w1, (h, d))
    _check_w("c_ffn", "w32", w32, (h, 2 * d))
    if w32.dtype != w1.dtype or x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"c_ffn: x must be (N, {d}) and w32 {w1.dtype} like w1, got x {tuple(x.shape)}, "
                         f"w32 {w32.dtype}")
    if gate not in GATES.values():
        raise ValueError(f"c_ffn: gate must be one of {GATES}, got {gate}")
    check_threshold(t, "c_ffn: t")
    x = _op_args("c_ffn", x, w1, scales, 3)
    lib = sparse_ffn._mods["c"].lib
    out = torch.empty_like(x)
    _OP_SCRATCH.run_c(lib.sffn_forward, lambda B, T: lib.sffn_scratch_floats(B, d, T), x, out,
                      d, h, _ptr(w1), _ptr(w32), DTYPE_CODES[w1.dtype], _ptr(scales, "float *"), gate, t)
    return out


def _c_gemv_cpu(x, w, scales):
    if w.dim() != 2:
        raise ValueError(f"c_gemv: w must be (n, d), got {tuple(w.shape)}")
    (n, d) = w.shape
    _check_w("c_gemv", "w", w, (n, d))
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"c_gemv: x must be (N, {d}), got {tuple(x.shape)}")
    x = _op_args("c_gemv", x, w, scales, 1)
    lib = sparse_ffn._mods["c"].lib
    out = x.new_empty(x.shape[0], n)
    _OP_SCRATCH.run_c(lib.sffn_gemv, lambda B, T: lib.sffn_scratch_floats(B, d, 0), x, out,
                      d, n, _ptr(w), DTYPE_CODES[w.dtype], _ptr(scales, "float *"))
    return out


_OPS = torch.library.Library("sparse_ffn", "DEF")  # kept alive for the process: it owns the definitions
_OPS.define("c_ffn(Tensor x, Tensor w1, Tensor w32, Tensor? scales, int gate, float t) -> Tensor")
_OPS.define("c_gemv(Tensor x, Tensor w, Tensor? scales) -> Tensor")
_OPS.impl("c_ffn", _c_ffn_cpu, "CPU")
_OPS.impl("c_gemv", _c_gemv_cpu, "CPU")
torch.library.register_fake("sparse_ffn::c_ffn", lambda x, w1, w32, scales, gate, t: torch.empty_like(x), lib=_OPS)
torch.library.register_fake("sparse_ffn::c_gemv", lambda x, w, scales: x.new_empty(x.shape[0], w.shape[0]), lib=_OPS)
c_ffn_op = torch.ops.sparse_ffn.c_ffn  # (x (N, d) fp32 contiguous, SparseFFN's w1, w32, scales, GATES code, t)
c_gemv_op = torch.ops.sparse_ffn.c_gemv  # (x (N, d) fp32 contiguous, DenseLinear's w, scales): x W^T

# -----------------------------------------------------------------------------


def int8_twin(model, linear=False):
    """A copy of `model` whose FFN weights (and with linear=True, its attention projections and output
    layer) are what the int8 kernels compute with: per-row quantized and dequantized, W2 per column
    (as packed). Plain PyTorch, any device: how int8 weights change the loss and the sparsity.
    The tied output layer gets its own weight; the embedding lookup keeps the original."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, FeedForward):
                m.w1.weight.copy_(dequantized(m.w1.weight))
                m.w3.weight.copy_(dequantized(m.w3.weight))
                m.w2.weight.copy_(dequantized(m.w2.weight.t()).t())
            elif isinstance(m, Attention) and linear:
                for l in (m.wq, m.wk, m.wv, m.wo):
                    l.weight.copy_(dequantized(l.weight))
        if linear and hasattr(twin, "lm_head"):
            twin.lm_head.weight = torch.nn.Parameter(dequantized(twin.lm_head.weight))
    return twin
