"""
The helpers the test files share (their fixtures are in tests/conftest.py): a tiny model and corpus for the
model and training tests, the reference FFN and its comparisons for the kernel tests, and full_only(),
which marks parametrize cases as part of the full grid (run with --full).
"""

import os
import random

import pytest
import torch

import sparse_ffn
from model import FeedForward, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def full_only(*cases):
    """Parametrize cases that run only with --full: a tuple per case for several argnames, a value for one."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.full) for c in cases]

# -----------------------------------------------------------------------------
# a tiny model and corpus

TINY = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--final_eval_iters=4", "--lr=3e-3", "--min_lr=3e-4", "--warmup_iters=5",
        "--vocab=1024", "--compile=False"]  # eager: the compiled path has tests of its own


def tiny_config(**kw):
    return GPTConfig(**dict(dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32), **kw))


def write_corpus(folder, n_docs=12, seed=0):
    """Small documents with learnable structure, so a tiny model's loss drops fast."""
    rng = random.Random(seed)
    names = ["Romeo", "Juliet", "Hamlet", "Ophelia", "Lear", "Cordelia"]
    verbs = ["loves", "greets", "follows", "answers", "leaves"]
    os.makedirs(folder, exist_ok=True)
    for d in range(n_docs):
        lines = [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(names)} in act {rng.randint(1, 5)}."
                 for _ in range(60)]
        with open(os.path.join(folder, f"doc{d:02d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder

# -----------------------------------------------------------------------------
# the kernels (sparse_ffn.c, sparse_ffn.cu, the torch fallback) against model.FeedForward

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + HALF
CPU_DTYPES = DTYPES + (torch.int8,)  # int8 weights: the CPU kernel only
CPU_BACKENDS = ["c", "plain", "torch"]  # plain: the C backend's plain kernel (sffn_forward_plain)
pytest_kernel = pytest.mark.usefixtures("c_kernel")  # tests/conftest.py's: the C kernel built, or the test fails


def packed(ffn, backend, **kw):
    """SparseFFN on one of CPU_BACKENDS."""
    plain = backend == "plain"
    return sparse_ffn.SparseFFN(ffn, backend="c" if plain else backend, variant="plain" if plain else "tuned", **kw)


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


def check_close(y, ref, atol, rtol, note=""):
    err = (y.float() - ref.float()).abs()
    bad = err > atol + rtol * ref.float().abs()
    assert not bad.any(), (f"{note}{int(bad.sum())} mismatches, max |diff| {err.max().item():.3g}; first: "
                           f"{[(tuple(i), y[tuple(i)].item(), ref[tuple(i)].item()) for i in bad.nonzero()[:5].tolist()]}")
