"""
The C decode engine (decode.c, decode.py) against the PyTorch reference (model.py): the logits of every step,
teacher-forced on the same tokens, on random models of odd sizes (n_kv_head 1 and n_head, d not a multiple of 8,
odd h), prompts of 1 token and of block_size - 1, batches on both sides of the kernels' 16 rows, every act the
engine runs (relu, silu, thresholds, the FFN sparse or dense), on the trained checkpoint, and with bf16 / fp16 /
int8 weights against a twin that holds the weights as stored. Then greedy decoding, the refusals, and memory.
"""

import copy
import gc

import pytest
import torch

import decode
import model as model_mod
import sparse_ffn
from model import GPT
from testutil import as_stored, check_close, full_only, pytest_kernel, tiny_config

pytestmark = pytest_kernel
TOL = 1e-4  # fp32: |logit - reference| <= TOL * max(1, the largest |reference logit|) at every step


def random_model(act="relu", threshold=0.0, **kw):
    model = GPT(tiny_config(act=act, **kw)).eval()
    if threshold:
        model.set_thresholds([threshold] * model.config.n_layer)
    return model


def step_logits(model, prompt, cont, engine):
    """(B, 1 + steps, V): the last position's logits after the prompt, then after each token of cont
    (teacher-forced), through one engine: the reference's KV cache, or a C engine session."""
    B, T = prompt.shape
    n = T + cont.shape[1]
    if engine == "torch":
        model.setup_cache(B, n)
        step = model
    else:
        step = model.engine.start(model, B, n)
    with torch.no_grad():
        try:
            out = [step(prompt, start_pos=0)[0][:, -1]]
            out += [step(cont[:, i:i + 1], start_pos=T + i)[0][:, -1] for i in range(cont.shape[1])]
        finally:
            model.clear_cache() if engine == "torch" else step.close()
    return torch.stack(out, 1)


def check_engine(model, ref, prompt, n_new, tol=TOL):
    """model (engine attached) against ref (the PyTorch model it must compute), step by step, on the reference's
    greedy continuation; then greedy decoding through generate(): the same tokens wherever the reference's top
    two logits are further apart than the tolerance."""
    want_ids = ref.generate(prompt, n_new, temperature=0.0, engine="torch")
    cont = want_ids[:, prompt.shape[1]:-1]
    want = step_logits(ref, prompt, cont, "torch")
    got = step_logits(model, prompt, cont, "c")
    atol = tol * max(1.0, want.abs().max().item())
    check_close(got, want, atol=atol, rtol=0)
    got_ids = model.generate(prompt, n_new, temperature=0.0)
    diff = (got_ids != want_ids).any(0).nonzero()
    if len(diff):  # the first step where the tokens part: the reference must be within the tolerance of a tie
        i = diff[0].item() - prompt.shape[1]
        top2 = want[:, i].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min().item() <= 2 * atol, f"tokens differ at step {i} without a near tie"


CASES = [  # (config, act, threshold, ffn)
    (dict(), "relu", 0.0, "auto"),
    (dict(n_embd=48, n_head=6, n_kv_head=1, ffn_hidden=100, vocab_size=67), "relu", 0.0, "auto"),  # one kv head
    (dict(n_embd=30, n_head=3, n_kv_head=3, ffn_hidden=53, vocab_size=129), "relu", 0.0, "auto"),  # MHA, d=30, odd h
    (dict(), "silu", 0.0, "auto"),  # a dense FFN
    (dict(), "silu", 0.02, "auto"),  # CATS: silu with a threshold, sparse
    (dict(), "relu", 0.01, "auto"),
    (dict(), "relu", 0.0, "dense"),
    (dict(), "silu", 0.0, "sparse"),  # every unit active: the sparse kernel computes the dense FFN
] + full_only(
    (dict(n_embd=192, n_head=4, n_kv_head=2, ffn_hidden=512, n_layer=3, vocab_size=512), "relu", 0.0, "auto"),
    (dict(n_embd=36, n_head=2, n_kv_head=1, ffn_hidden=7, n_layer=4, vocab_size=5), "silu", 0.05, "auto"),
    (dict(n_embd=36, n_head=2, n_kv_head=1, ffn_hidden=7, n_layer=4, vocab_size=5), "relu", 0.0, "dense"),
)


@pytest.mark.parametrize("kw,act,t,ffn", CASES)
def test_fp32_matches_the_reference(kw, act, t, ffn):
    model = random_model(act, t, **kw)
    decode.attach_engine(model, ffn=ffn)
    assert model.engine.sparse == [ffn == "sparse" or ffn == "auto" and (act == "relu" or t > 0)] * model.config.n_layer
    V = model.config.vocab_size
    check_engine(model, model, torch.randint(V, (1, 5)), 12)


@pytest.mark.parametrize("B,T,n_new", [(1, 1, 20), (1, 47, 1), (3, 7, 10), (1, 20, 5), (17, 2, 3)]
                         + full_only((16, 1, 4), (2, 9, 30), (5, 40, 8)))
def test_prompts_and_batches(B, T, n_new):
    """1-token prompts, block_size - 1 (48: the last position), batches past 16 rows, prompts longer than a pass."""
    model = random_model()
    decode.attach_engine(model)
    check_engine(model, model, torch.randint(model.config.vocab_size, (B, T)), n_new)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", ["tuned", "plain"])
def test_threads_are_torchs(threads, variant):
    """Each step runs on torch.get_num_threads() threads; a 40-token prompt splits attention over them too.
    variant plain: the sparse FFN by the plain C kernel."""
    model = random_model(n_embd=192, n_head=4, ffn_hidden=512)
    decode.attach_engine(model, variant=variant)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_engine(model, model, torch.randint(97, (2, 40)), 8)
    finally:
        torch.set_num_threads(old)


def stored_twin(model, dtype, sparse):
    """The reference on the weights as the engine stores them: every matrix rounded to dtype (int8: per row; the
    sparse FFN's W2 per column, as SparseFFN packs it), the output layer untied from the fp32 embedding lookup."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.dim() == 2 and "tok_emb" not in name:
                p.copy_(as_stored(p, dtype, rows_of_t=sparse and name.endswith("w2.weight")))
        twin.lm_head.weight = torch.nn.Parameter(as_stored(model.lm_head.weight, dtype))
    return twin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8] + full_only(torch.float16))
@pytest.mark.parametrize("act,ffn", [("relu", "auto"), ("relu", "dense")] + full_only(("silu", "auto")))
def test_low_precision_weights_match_a_twin(dtype, act, ffn):
    model = random_model(act, n_embd=48, n_head=4, n_kv_head=2, ffn_hidden=136)
    decode.attach_engine(model, dtype=dtype, ffn=ffn)
    twin = stored_twin(model, dtype, sparse=model.engine.sparse[0])
    check_engine(model, twin, torch.randint(97, (2, 4)), 10)


def test_the_trained_checkpoint(tiny_run):
    """train.py's model after StochA + Swi+FT (relu at inference), on its own text."""
    model = GPT.from_checkpoint(str(tiny_run["out"] / "ckpt.pt")).eval()
    model.set_act("relu")
    decode.attach_engine(model)
    prompt = torch.randint(model.config.vocab_size, (1, 8))
    check_engine(model, model, prompt, model.config.block_size - 8)
    assert 0 < model.engine.stats["sparsity"] < 1


def test_acts_set_after_attaching_are_used():
    model = random_model("relu")
    decode.attach_engine(model)
    model.set_act("silu")  # the engine reads act and thresholds when a generation starts
    model.set_thresholds([0.03] * model.config.n_layer)
    check_engine(model, model, torch.randint(97, (1, 3)), 6)


def test_clear_errors():
    model = random_model()
    prompt = torch.randint(97, (1, 4))
    with pytest.raises(ValueError, match="attach_engine"):
        model.generate(prompt, 2, engine="c")
    with pytest.raises(TypeError, match="dtype"):
        decode.Engine(model, dtype=torch.float64)
    with pytest.raises(ValueError, match="ffn"):
        decode.Engine(model, ffn="fast")
    engine = decode.attach_engine(model)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.randint(97, (1, 40)), 9)
    with pytest.raises(ValueError, match="compile"):
        model.generate(prompt, 2, compile=True)
    with pytest.raises(ValueError, match="engine must be"):
        model.generate(prompt, 2, engine="C")
    s = engine.start(model, 1, 10)
    with pytest.raises(TypeError, match="int64"):
        s(prompt.float(), 0)
    with pytest.raises(ValueError, match="token ids"):
        s(torch.tensor([[0, 128]]), 0)  # the embedding has 128 rows (97 padded)
    with pytest.raises(ValueError, match=r"\(1, T"):
        s(torch.randint(97, (2, 3)), 0)
    with pytest.raises(ValueError, match="positions"):
        s(prompt, 3)  # the cache holds nothing yet
    s(prompt, 0)
    with pytest.raises(ValueError, match="positions"):
        s(torch.randint(97, (1, 7)), 4)  # past this session's 10 positions
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s(prompt, 4)
    model.set_act("stoch")
    with pytest.raises(ValueError, match="StochA"):
        model.generate(prompt, 2)
    assert model.generate(prompt, 2, engine="torch").shape == (1, 6)  # the reference still samples StochA
    model.set_act("relu")
    dropout = random_model(dropout=0.1)
    decode.attach_engine(dropout)
    dropout.train()
    with pytest.raises(ValueError, match="dropout"):
        dropout.generate(prompt, 2)
    with pytest.raises(ValueError, match="another model"):
        engine.start(dropout, 1, 5)


def test_the_c_side_refuses_what_python_would():
    """decode.c checks its own arguments too: a caller past decode.py gets -1 / NULL, never a read out of bounds."""
    model = random_model()
    engine = decode.attach_engine(model)
    lib, ffi = sparse_ffn._mods["c"].lib, sparse_ffn._mods["c"].ffi
    assert lib.dec_new(engine._m, 0, 10) == ffi.NULL
    assert lib.dec_new(engine._m, 1, model.config.block_size + 1) == ffi.NULL  # past the RoPE tables
    p = ffi.gc(lib.dec_new(engine._m, 2, 10), lib.dec_free)
    logits = torch.empty(2, 97)
    lp = ffi.cast("float *", logits.data_ptr())
    ok = torch.zeros(2, 1, dtype=torch.int64)
    for tokens, B, T, pos, nt in [(ok, 3, 1, 0, 1), (ok, 2, 1, 10, 1), (ok, 2, 0, 0, 1), (ok, 2, 1, -1, 1),
                                  (ok, 2, 1, 0, 0), (torch.full((2, 1), 128), 2, 1, 0, 1),
                                  (torch.full((2, 1), -1), 2, 1, 0, 1)]:
        assert lib.dec_step(p, ffi.cast("int64_t *", tokens.data_ptr()), B, T, pos, lp, nt) == -1
    assert lib.dec_step(p, ffi.cast("int64_t *", ok.data_ptr()), 2, 1, 9, lp, 1) == 0


def test_memory_is_freed(monkeypatch):
    lib = sparse_ffn._mods["c"].lib if sparse_ffn.backends()["c"] is True else None
    model = random_model()
    engine = decode.attach_engine(model)
    n0 = lib.dec_live()
    for _ in range(50):  # create / free
        s = engine.start(model, 4, 40)
        s(torch.randint(97, (4, 3)), 0)
        assert lib.dec_live() == n0 + 1
        s.close()
    assert lib.dec_live() == n0
    s = engine.start(model, 2, 8)
    del s
    gc.collect()
    assert lib.dec_live() == n0  # an unclosed session is freed when collected
    monkeypatch.setattr(model_mod, "sample_next", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model.generate(torch.randint(97, (1, 3)), 5)
    assert lib.dec_live() == n0  # generate frees its session when a step fails


def test_copies_get_no_engine():
    model = random_model()
    decode.attach_engine(model)
    twin = copy.deepcopy(model)
    assert twin.engine is None and model.engine is not None
    prompt = torch.randint(97, (1, 3))
    assert torch.equal(twin.generate(prompt, 4, temperature=0.0), model.generate(prompt, 4, temperature=0.0,
                                                                                 engine="torch"))
    decode.detach_engine(model)
    assert model.engine is None


# -----------------------------------------------------------------------------
# the edges: a model changed after attaching, bounds from buffers, refusals shared by both engines, saving


def test_the_engine_follows_the_model():
    """The packed weights are a copy: an in-place edit, load_state_dict of another model, or model.to(dtype) after
    attaching repack them when the next generation starts (they once decoded the old weights silently); a model
    moved off the CPU is refused in one line."""
    model = random_model()
    engine = decode.attach_engine(model)
    prompt = torch.randint(97, (1, 4))
    edits = [
        lambda: model.blocks[0].ffn.w1.weight.mul_(3.0),  # an in-place edit (an optimizer step is one)
        lambda: model.load_state_dict(random_model().state_dict()),
        lambda: model.tok_emb.weight.add_(0.5),  # the tied embedding and output layer
        lambda: model.blocks[1].attn_norm.weight.fill_(2.0),
    ]
    for i, edit in enumerate(edits):
        with torch.no_grad():
            edit()
        check_engine(model, model, prompt, 8)
        assert engine.repacks == i + 1 and model.engine is engine
    n = engine.repacks
    check_engine(model, model, prompt, 4)
    assert engine.repacks == n  # an unchanged model is not repacked
    model.to(torch.bfloat16)
    model.generate(prompt, 2, temperature=0)
    assert engine.dtype == torch.bfloat16 and engine.repacks == n + 1  # dtype None: the model's, at each pack
    model.to("meta")
    with pytest.raises(ValueError, match="runs on the CPU; the model is on meta"):
        model.generate(prompt.to("meta"), 2)


def test_sizes_come_from_the_buffers_they_bound():
    """A block_size raised after the model was built does not grow the RoPE tables: both engines refuse the
    positions past them (the C engine once read past the tables: a heap overflow under AddressSanitizer)."""
    model = random_model()
    decode.attach_engine(model)
    rows = model.rope_cos.shape[0]
    model.config.block_size = rows + 16
    prompt = torch.randint(97, (1, rows))
    for engine in ("c", "torch"):
        with pytest.raises(ValueError, match="RoPE tables"):
            model.generate(prompt, 8, engine=engine)
    assert model.generate(prompt[:, :rows - 2], 2, temperature=0).shape == (1, rows)  # up to the tables: fine
    model.config.block_size = rows
    model.config.n_head, model.config.n_kv_head = 2, 1  # the engine reads the heads off the weights, not these
    decode.attach_engine(model)
    check_engine(model, model, torch.randint(97, (1, 3)), 4)
    with pytest.raises(ValueError, match="vocab_size"):
        model.config.vocab_size = 1000
        model.generate(prompt[:, :4], 2, engine="c")
    model.config.vocab_size = 97


@pytest.mark.parametrize("engine", ["torch", "c"])
def test_both_engines_take_and_refuse_the_same(engine):
    """Every argument is checked before work starts, with one message for both engines; bad values are named as
    such, never as a failed allocation."""
    model = random_model()
    decode.attach_engine(model)
    prompt = torch.randint(97, (1, 4))
    bad = [  # (idx, max_new_tokens, error, message)
        (prompt, -1, ValueError, "max_new_tokens must be an int >= 0"),
        (prompt, -2, ValueError, "max_new_tokens must be an int >= 0"),
        (prompt, 2.0, ValueError, "max_new_tokens must be an int >= 0"),
        (torch.zeros(0, 4, dtype=torch.long), 2, TypeError, r"B, T >= 1"),
        (torch.zeros(1, 0, dtype=torch.long), 2, TypeError, r"B, T >= 1"),
        (prompt.float(), 2, TypeError, "integer tensor"),
        (prompt[0], 2, TypeError, r"\(B, T\)"),
        (prompt.tolist(), 2, TypeError, "tensor of token ids.*got list"),
        (prompt.to("meta"), 2, ValueError, "idx is on meta, the model on cpu"),
        (torch.tensor([[1, 97]]), 2, ValueError, r"token ids must be in \[0, 97\)"),
        (torch.tensor([[-1, 3]]), 2, ValueError, r"token ids must be in \[0, 97\)"),
    ]
    for idx, n, err, msg in bad:
        with pytest.raises(err, match=msg):
            model.generate(idx, n, engine=engine)
    for t in (float("nan"), -1.0, 1e39):  # set directly, past set_thresholds' checks
        model.blocks[1].ffn.threshold = t
        with pytest.raises(ValueError, match="layer 1's threshold must be a number"):
            model.generate(prompt, 2, engine=engine)
    model.blocks[1].ffn.threshold = 0.0
    want = model.generate(prompt, 3, temperature=0, engine="torch")
    for idx in (prompt.int(), prompt.short(), prompt.to(torch.uint8)):  # any integer dtype, as int64
        got = model.generate(idx, 3, temperature=0, engine=engine)
        assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(model.generate(prompt, 0, engine=engine), prompt)


def test_a_model_with_an_engine_saves_and_copies(tmp_path):
    """The engine is a cache of C pointers: pickling or torch.save of the model (which once raised 'cannot pickle
    _cffi_backend.__CDataOwn') drops it, as deepcopy does; the loaded model decodes with PyTorch."""
    import pickle
    model = random_model()
    decode.attach_engine(model)
    prompt = torch.randint(97, (1, 3))
    want = model.generate(prompt, 6, temperature=0)
    back = pickle.loads(pickle.dumps(model))
    assert back.engine is None and model.engine is not None
    assert torch.equal(back.generate(prompt, 6, temperature=0), want)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert back.engine is None and torch.equal(back.generate(prompt, 6, temperature=0), want)
