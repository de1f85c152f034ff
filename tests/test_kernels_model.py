"""
The kernels in the model: attach() (every FFN on the C kernel, tuned or plain, thresholds included; with
linear=True the projections and the output layer on the C GEMV; autograd and deepcopy), int8 weights
(quantize_rows, int8_twin, attach(dtype=int8)), compiled decoding (generate(compile=True) with the C kernels
as custom ops) and the custom ops' shared scratch.

Run: python -m pytest -q tests/test_kernels_model.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network. Behaviour only: no timing is asserted anywhere; bench.py prints the numbers.
"""

import pytest
import torch
import torch.nn.functional as F

from lib import attach as attach_mod
import sparse_ffn
from model import GPT, GPTConfig
from testutil import as_stored, check_close, full_only, pytest_kernel, ref_ffn


# -----------------------------------------------------------------------------
# attach(): the model's FFNs (and with linear=True its projections) on the kernels


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
        assert all(not hasattr(b.ffn, "kernel") for b in model.blocks)
        silu_plain, _ = model(idx, targets=idx)
        assert torch.equal(silu, silu_plain)


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
        assert k2._cargs[2][2] == sparse_ffn._ptr(k2.w1)  # (kernel, need, args): args[2] is W1


# -----------------------------------------------------------------------------
# int8 weights in the model


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


# -----------------------------------------------------------------------------
# compiled decoding: the C kernels as custom ops, their shared scratch


@pytest_kernel
@pytest.mark.parametrize("dtype,linear", [*full_only((None, False), (torch.float32, False)), (torch.int8, True)],
                         ids=["dense", "fp32", "int8-linear"])  # a compile each, ~4 s: int8-linear has both ops
def test_generate_compiled_matches_eager(dtype, linear):
    """generate(compile=True): torch.compile'd decode steps give eager's greedy tokens, dense and with the C
    kernels attached (their custom ops inside the graph: FFN fp32 and int8, the GEMV with linear=True)."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act="relu")).eval()
    prompt = torch.randint(97, (1, 8))
    if dtype is not None:
        attach_mod.attach(model, dtype=dtype, linear=linear)
    torch._dynamo.reset()
    want = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, temperature=0, compile=True), want), (dtype, linear)
    attach_mod.detach(model)


@pytest_kernel
def test_custom_ops_match_the_eager_kernels():
    """The custom ops a compiled decode step calls (FFN int8, GEMV bf16), called directly: the eager kernels' bits."""
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act="relu")).eval()
    x = torch.randn(3, 64)
    k = sparse_ffn.SparseFFN(model.blocks[0].ffn, dtype=torch.int8, mode="sparse")
    check_close(attach_mod.c_ffn_op(x, k.w1, k.w32, k.scales, 0, 0.0), k(x), atol=0, rtol=0)
    lin = sparse_ffn.DenseLinear(model.lm_head.weight, torch.bfloat16)
    check_close(attach_mod.c_gemv_op(x, lin.w, lin.scales), lin(x), atol=0, rtol=0)


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
def test_empty_batches_and_bad_tensors_into_the_ops():
    """A batch of 0 rows runs through every C entry (it once raised 'min() arg is an empty sequence'); the public
    custom ops check what they hand to C: a bf16 or too narrow x once read past its buffer (AddressSanitizer), a
    strided x gave wrong results silently (max error 29), so x is checked or made contiguous, and the weights
    and scales checked."""
    d, h = 40, 72
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=d, ffn_hidden=h,
                          act="relu")).eval()
    k = sparse_ffn.SparseFFN(model.blocks[0].ffn, mode="sparse")
    k8 = sparse_ffn.SparseFFN(model.blocks[0].ffn, dtype=torch.int8, mode="sparse")
    lin, lin8 = sparse_ffn.DenseLinear(model.lm_head.weight), sparse_ffn.DenseLinear(model.lm_head.weight, torch.int8)
    empty = torch.empty(0, d)
    assert lin(empty).shape == (0, 128) and k(empty).shape == (0, d)
    assert attach_mod.c_ffn_op(empty, k.w1, k.w32, None, 0, 0.0).shape == (0, d)
    assert attach_mod.c_gemv_op(empty, lin.w, None).shape == (0, 128)
    attach_mod.attach(model, linear=True)
    with torch.no_grad():
        assert model.blocks[0].ffn(torch.empty(0, 3, d)).shape == (0, 3, d)
        assert model.lm_head(torch.empty(0, d)).shape == (0, 128)
    attach_mod.detach(model)
    x = torch.randn(6, 2 * d)
    strided = x[:, ::2]  # (6, d), not contiguous: the ops read it as C would see it contiguous
    check_close(attach_mod.c_ffn_op(strided, k.w1, k.w32, None, 0, 0.0), k(strided.contiguous()), atol=0, rtol=0)
    check_close(attach_mod.c_gemv_op(strided, lin.w, None), lin(strided.contiguous()), atol=0, rtol=0)
    xs = torch.randn(3, d)
    bad_ffn = [  # (x, w1, w32, scales, gate, t, message)
        (xs.bfloat16(), k.w1, k.w32, None, 0, 0.0, "x must be a .N, d. float32"),
        (xs[:, :d - 8], k.w1, k.w32, None, 0, 0.0, r"x must be \(N, 40\)"),
        (xs[0], k.w1, k.w32, None, 0, 0.0, r"x must be \(N, 40\)"),
        (xs, k.w1, k.w32[:, :d], None, 0, 0.0, "w32 must be"),
        (xs, k.w1[:-1], k.w32, None, 0, 0.0, "w32 must be"),
        (xs, k.w1.t(), k.w32, None, 0, 0.0, "w1 must be a contiguous"),
        (xs, k.w1.double(), k.w32.double(), None, 0, 0.0, "w1 must be"),
        (xs, k.w1, k.w32.half(), None, 0, 0.0, "like w1"),
        (xs, k8.w1, k8.w32, None, 0, 0.0, "int8 weights need"),
        (xs, k8.w1, k8.w32, k8.scales[:2], 0, 0.0, "int8 weights need"),
        (xs, k.w1, k.w32, k8.scales, 0, 0.0, "scales are for int8"),
        (xs, k.w1, k.w32, None, 2, 0.0, "gate must be"),
        (xs, k.w1, k.w32, None, 0, float("nan"), "t must be a number"),
        (xs, k.w1, k.w32, None, 0, -1.0, "t must be a number"),
    ]
    for x_, w1, w32, s, g, t, msg in bad_ffn:
        with pytest.raises(ValueError, match=msg):
            attach_mod.c_ffn_op(x_, w1, w32, s, g, t)
    bad_gemv = [(xs.bfloat16(), lin.w, None, "float32"), (xs[:, :8], lin.w, None, r"x must be \(N, 40\)"),
                (xs, lin.w[:, :8].contiguous(), None, r"x must be \(N, 8\)"), (xs, lin.w.t(), None, "contiguous"),
                (xs, lin8.w, None, "int8 weights need"), (xs, lin8.w, lin8.scales[:5], "int8 weights need"),
                (xs, lin.w, lin8.scales, "scales are for int8")]
    for x_, w, s, msg in bad_gemv:
        with pytest.raises(ValueError, match=msg):
            attach_mod.c_gemv_op(x_, w, s)
