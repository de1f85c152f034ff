"""
The reader's test: the method and its fast paths in the order README.md reads the code, each checked against
the plain PyTorch of model.py. Read it as a second walkthrough:

    1. StochA: x for x >= 0; for x < 0, silu(x) with probability p, else 0 (relu), and the gradient of the draw
    2. Swi+FT: train.py trains with StochA, then with RELU for the last alpha of the steps
    3. gather_ffn: the sparse FFN in four torch lines equals the dense FeedForward
    4. the C kernels, plain and tuned, equal FeedForward at any sparsity, batch and odd size
    5. one C decode step (decode.c) gives GPT.forward's logits

    python -m pytest -q test_all.py        # ~10 s; tests/ holds the rest (every dtype, shape, edge and bad input)
"""

import math

import pytest
import torch
import torch.nn.functional as F

import build
import decode
import sparse_ffn
import train
from model import GPT, FeedForward, GPTConfig, stoch_act


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)

# -----------------------------------------------------------------------------
# 1. StochA


def test_stoch_p0_is_relu_and_p1_is_silu_on_the_negative_side():
    x = torch.randn(4096, dtype=torch.float64, requires_grad=True)
    y0 = stoch_act(x, 0.0)
    assert torch.equal(y0, F.relu(x))
    (g0,) = torch.autograd.grad(y0.sum(), x)
    assert torch.equal(g0, (x > 0).double())
    y1 = stoch_act(x, 1.0)
    assert torch.allclose(y1, torch.where(x >= 0, x, F.silu(x)))
    (g1,) = torch.autograd.grad(y1.sum(), x)
    s = torch.sigmoid(x)
    assert torch.allclose(g1, torch.where(x > 0, torch.ones_like(x), s * (1 + x * (1 - s))))


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_stoch_draw_rate_and_gradient_follow_the_draw(p):
    n = 200_000
    x = -torch.rand(n, dtype=torch.float64).add(0.01).requires_grad_()  # all negative
    y = stoch_act(x, p)
    drawn_silu = y != 0
    rate = drawn_silu.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), rate  # binomial, 5 sigma
    assert torch.allclose(y[drawn_silu], F.silu(x[drawn_silu]))
    (g,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(x)
    assert torch.allclose(g, torch.where(drawn_silu, s * (1 + x * (1 - s)), torch.zeros_like(x)))
    # fresh draws at every call, reproducible with a seeded generator
    assert not torch.equal(stoch_act(x, p) != 0, drawn_silu)
    a = stoch_act(x, p, torch.Generator().manual_seed(3))
    b = stoch_act(x, p, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)

# -----------------------------------------------------------------------------
# 2. Swi+FT: the switch


def test_swift_trains_with_relu_after_the_switch(tmp_path, monkeypatch):
    """Every training forward's FFN activation, seen where it is computed: StochA before the switch (some
    negative inputs pass as silu), RELU from it on (every negative input exactly 0); evaluation forwards,
    which run without gradients, are not counted."""
    import model
    seen = []
    def spy(x, act, p=0.0, generator=None):
        y = act_fn(x, act, p, generator)
        if torch.is_grad_enabled():
            seen.append((act, bool(((x < 0) & (y != 0)).any())))
        return y
    act_fn = model.act_fn
    monkeypatch.setattr(model, "act_fn", spy)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("Romeo loves Juliet in act 2.\nHamlet greets Ophelia in act 3.\n" * 400)
    tiny = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--vocab=1024", "--eval_iters=1", "--final_eval_iters=1", "--compile=False"]
    s = train.main([f"--data={corpus}", f"--data_root={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                    "--max_iters=8", "--alpha=0.5", "--p=0.5", "--eval_interval=8"] + tiny)
    assert s["switch_iter"] == 4
    assert seen == [("stoch", True)] * (4 * 2) + [("relu", False)] * (4 * 2)  # 2 layers per step

# -----------------------------------------------------------------------------
# 3-4. the sparse FFN: gather_ffn, then the plain and the tuned C kernel, against FeedForward


def relu_ffn(d, h, x, s):
    """A relu FeedForward (d, h) with a fraction s of its units zero for every row of x (x > 0 elementwise):
    a zero unit's W1 row is <= 0, an active one's > 0, so exactly h - round(s * h) units fire, on every row."""
    config = GPTConfig(act="relu")
    config.n_embd, config.ffn_hidden = d, h  # FeedForward reads only these: any d, even one no head size divides
    ffn = FeedForward(config).eval()
    off = torch.randperm(h)[:round(s * h)]
    with torch.no_grad():
        ffn.w1.weight.abs_()[off] *= -1
    return ffn


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0])
def test_gather_ffn_equals_the_dense_ffn(s):
    x = torch.rand(3, 37)
    ffn = relu_ffn(37, 101, x, s)
    y, n = sparse_ffn.gather_ffn(x, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)
    with torch.no_grad():
        torch.testing.assert_close(y, ffn(x), atol=1e-6, rtol=1e-5)
    assert n == 101 - round(s * 101)


@pytest.fixture(scope="module")
def c_kernel():
    ok, msg = build.ensure_c()
    assert ok, f"the C kernel must build here: {msg}"


@pytest.mark.parametrize("variant", ["plain", "tuned"])
@pytest.mark.parametrize("B", [1, 3, 20])  # 20: more rows than one call of the C kernel takes (16)
@pytest.mark.parametrize("s", [0.0, 0.5, 1.0])
def test_c_kernels_equal_the_dense_ffn(c_kernel, s, B, variant):
    x = torch.rand(B, 37)  # d = 37: not a multiple of any SIMD width
    ffn = relu_ffn(37, 101, x, s)
    kernel = sparse_ffn.SparseFFN(ffn, backend="c", variant=variant, mode="sparse")
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), ffn(x), atol=1e-5, rtol=1e-4)
    if B <= 16:
        assert kernel.last_active == 101 - round(s * 101)

# -----------------------------------------------------------------------------
# 5. one C decode step against GPT.forward


@pytest.mark.parametrize("B", [1, 3])
def test_a_c_decode_step_gives_the_forward_logits(c_kernel, B):
    """The prompt, then one new token, through decode.c's step (its own KV cache): the logits of GPT.forward
    over the whole sequence, recomputed from scratch, at the last position."""
    config = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=3, n_kv_head=1, n_embd=36, ffn_hidden=101,
                       act="relu")  # d = 36, head size 12, one key/value head for three query heads
    model = GPT(config).eval()
    decode.attach_engine(model)
    prompt, new = torch.randint(97, (B, 7)), torch.randint(97, (B, 1))
    session = model.engine.start(model, B, 8)
    try:
        with torch.no_grad():
            got = [session(prompt, start_pos=0)[0][:, -1], session(new, start_pos=7)[0][:, -1]]
            want = [model(prompt)[0][:, -1], model(torch.cat([prompt, new], 1))[0][:, -1]]
    finally:
        session.close()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
