"""
The test suite: python -m pytest -q test_all.py

CPU only, no network (the tokenizer comes from an installed package, the corpora are written here).
Behaviour only: no timing is asserted anywhere; bench.py prints the numbers.
"""

import copy
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import build
import data
import model as model_mod
import sample
import sparse_ffn
import train
from configurator import ConfigError, configure
from model import GPT, Attention, FeedForward, GPTConfig, apply_rope, rope_tables, sample_next, stoch_act

HERE = os.path.dirname(os.path.abspath(__file__))
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
# the stochastic activation


def test_activations_at_every_float_edge():
    """-inf, +inf, NaN, signed zeros, denormals, huge values: stoch with p = 0 is relu, silu's limit at
    -inf is 0 (F.silu gives NaN there), NaN stays NaN, and no finite or infinite input gets a NaN gradient."""
    from model import activation
    edges = [float("-inf"), float("inf"), float("nan"), -0.0, 0.0, -1e30, 1e30, -1e-45, 1e-45, -100.0, -3.0, 2.0]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.tensor(edges, dtype=torch.float32).to(dtype)  # out-of-range values round to +-inf in fp16
        relu = F.relu(x)
        for p in (0.0, 0.5, 1.0):
            y = stoch_act(x, p)
            assert torch.equal(y.isnan(), x.isnan()) and torch.equal(y[x >= 0], x[x >= 0])
            assert torch.equal(y[x == float("-inf")], torch.zeros_like(y[x == float("-inf")]))
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # NaN == NaN here
        same(stoch_act(x, 0.0), relu)
        same(activation(x, "stoch", 0.0), relu)
        silu = activation(x, "silu")
        assert silu[0] == 0 and silu[1] == float("inf") and silu[2].isnan()
        finite = x.isfinite()
        assert torch.equal(silu[finite], F.silu(x[finite]))  # elsewhere exactly F.silu
    x = torch.tensor(edges, requires_grad=True)
    stoch_act(x, 1.0).sum().backward()
    assert not x.grad[~torch.tensor(edges).isnan()].isnan().any()
    for bad in (float("nan"), -0.1, 1.5, float("inf"), True, "0.5", None):
        for call in (lambda: stoch_act(x, bad), lambda: activation(x, "stoch", bad), lambda: activation(x, "relu", bad)):
            with pytest.raises(ValueError, match="p must be"):
                call()


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


def test_stoch_draws_are_independent_per_element():
    # element pairs: the joint rate of both silu should be p^2 if the draws are independent
    p, n = 0.5, 100_000
    y = stoch_act(-torch.ones(n, 2), p) != 0
    both = (y[:, 0] & y[:, 1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)

# -----------------------------------------------------------------------------
# attention, RoPE, causality, KV cache


def test_gqa_equals_multi_head_attention_with_repeated_kv():
    torch.manual_seed(0)
    cfg = tiny_config(n_head=6, n_kv_head=2, n_embd=48)
    attn = Attention(cfg).eval()
    B, T, hd = 3, 11, 8
    x = torch.randn(B, T, 48)
    cos, sin = rope_tables(hd, T, cfg.rope_theta)
    got = attn(x, cos, sin)
    q = apply_rope(attn.wq(x).view(B, T, 6, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(B, T, 2, hd).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(B, T, 2, hd).transpose(1, 2)
    k, v = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)  # query head i uses kv head i // 3
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    want = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 48))
    assert torch.allclose(got, want, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
    def score(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum().item()
    for m, n, shift in [(5, 2, 7), (0, 9, 30), (20, 20, 13)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)  # and it does depend on it


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_causality(act):
    torch.manual_seed(0)
    model = GPT(tiny_config(act=act)).eval()
    idx = torch.randint(0, 97, (2, 20))
    logits, _ = model(idx, idx)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    logits2, _ = model(changed, changed)
    assert torch.equal(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_kv_cache_decoding_equals_full_forward(act):
    torch.manual_seed(0)
    model = GPT(tiny_config(act=act, n_head=4, n_kv_head=1)).eval()
    idx = torch.randint(0, 97, (3, 30))
    full, _ = model(idx, idx)
    model.setup_cache(3, 48)
    out = [model(idx[:, :9], start_pos=0)[0][:, -1]]  # prompt
    out.append(model(idx[:, 9:16], start_pos=9)[0][:, -1])  # a chunk after it
    for t in range(16, 30):  # then one token at a time
        out.append(model(idx[:, t:t + 1], start_pos=t)[0][:, -1])
    model.clear_cache()
    want = torch.stack([full[:, 8], full[:, 15]] + [full[:, t] for t in range(16, 30)], 1)
    assert torch.allclose(torch.stack(out, 1), want, atol=1e-5)


def test_generate_greedy_matches_recomputing_without_cache():
    torch.manual_seed(1)
    model = GPT(tiny_config(act="relu")).eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, 12, temperature=0.0)
    seq = prompt
    for _ in range(12):
        logits, _ = model(seq)  # no cache: the whole sequence each time
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(prompt, 100)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)} == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, ...: top_p=0.7 keeps the first two
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert {sample_next(logits, 1.0, top_p=0.7, generator=gen).item() for _ in range(200)} == {0, 1}
    assert sample_next(logits, 0.0).item() == 0

# -----------------------------------------------------------------------------
# switching the activation, sparsity and dead units


def test_set_act_switches_a_built_model_in_place():
    torch.manual_seed(0)
    model = GPT(tiny_config(act="silu")).eval()
    idx = torch.randint(0, 97, (2, 16))
    silu_logits, _ = model(idx, idx)
    model.set_act("relu")
    relu_logits, _ = model(idx, idx)
    assert all(b.ffn.act == "relu" for b in model.blocks) and model.config.act == "relu"
    assert not torch.allclose(silu_logits, relu_logits)
    model.set_act("stoch", 0.0)  # p = 0 is exactly relu
    assert torch.equal(model(idx, idx)[0], relu_logits)
    with pytest.raises(ValueError):
        model.set_act("gelu")
    with pytest.raises(ValueError):
        model.set_act("stoch", 1.5)


def test_ffn_stats_counts_zeros_and_dead_units():
    torch.manual_seed(0)
    cfg = tiny_config(act="relu", n_layer=1)
    model = GPT(cfg).eval()
    w1 = model.blocks[0].ffn.w1.weight
    with torch.no_grad():
        w1[:10].zero_()  # 10 units are always exactly 0: dead
    idx = torch.randint(0, 97, (2, 16))
    with model.ffn_stats() as layers:
        model(idx, idx)
    h = F.relu(model.blocks[0].ffn.w1(model.blocks[0].ffn_norm(
        model.tok_emb(idx) + model.blocks[0].attn(model.blocks[0].attn_norm(model.tok_emb(idx)),
                                                  model.rope_cos[:16], model.rope_sin[:16]))))
    assert layers[0]["sparsity"] == pytest.approx((h == 0).float().mean().item())
    assert layers[0]["dead"] == pytest.approx((h == 0).all(0).all(0).float().mean().item())
    assert layers[0]["dead"] >= 10 / cfg.ffn_hidden
    assert all(b.ffn.stats is None for b in model.blocks)

# -----------------------------------------------------------------------------
# configuration and command-line errors


def test_config_errors():
    for bad in [dict(p=2.0), dict(p=-0.1), dict(act="gelu"), dict(n_head=4, n_kv_head=3),
                dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0)]:
        with pytest.raises(ValueError):
            tiny_config(**bad)
    assert tiny_config(n_embd=64, ffn_hidden=0).ffn_hidden == 192  # 8/3 * 64 rounded up to 64


def test_configurator(tmp_path):
    cfg = dict(p=0.5, act="stoch", max_iters=10, compile=None)
    assert configure(cfg, ["--p=1", "--act=relu"]) == dict(p=1.0, act="relu")
    assert isinstance(cfg["p"], float)  # an int is accepted where a float is expected
    for bad in (["--q=1"], ["--max_iters=1.5"], ["--p=high"], ["--p"]):
        with pytest.raises(ConfigError):
            configure(dict(cfg), bad)
    path = tmp_path / "c.py"
    path.write_text("max_iters = 20\ncompile = True\n")
    configure(cfg, [str(path), "--max_iters=30"])
    assert cfg["max_iters"] == 30 and cfg["compile"] is True
    path.write_text("import os\n")
    with pytest.raises(ConfigError):
        configure(cfg, [str(path)])
    strings = dict(seeds="1337,1338", batches="1,4,16", prompt="")
    configure(strings, ["--seeds=1,2", "--batches=4", "--prompt=42"])  # a string setting takes the text as typed
    assert strings == dict(seeds="1,2", batches="4", prompt="42")


def test_config_rules():
    from configurator import between, check_rules, either, int_list, new_dir, one_of, optional, positive_int
    ok = {between(0, 1): [0, 1, 0.5], between(0, 1, lo_open=True, hi_open=True): [0.5],
          between(1, integer=True): [1, 10**9], positive_int: [3], one_of("a", None): ["a", None],
          one_of(True, False): [True, False], optional(positive_int): [None, 2], int_list(0, 100): ["0,50,100", "7"],
          new_dir: ["/tmp/x/y", "."], either(one_of(""), positive_int): ["", 5]}
    bad = {between(0, 1): [-0.1, 1.01, float("nan"), True, "0.5", None], between(0, 1, lo_open=True, hi_open=True): [0, 1],
           between(1, integer=True): [0, 1.0, False], one_of("a", None): ["b", 0], one_of(True, False): [1, 0, None],
           optional(positive_int): [0, 1.5], int_list(0, 100): ["", "a", "1,,2", "101", "-1"],
           new_dir: ["", f"{A_FILE}/x", A_FILE], either(one_of(""), positive_int): ["x", 0]}
    for rule, values in ok.items():
        assert all(rule(v) is None for v in values), (rule, values)
    for rule, values in bad.items():
        for v in values:
            assert isinstance(rule(v), str), (rule, v)
    with pytest.raises(ConfigError, match="b must be an int"):  # what the user set is checked first
        check_rules(dict(a=-1, b=0.5), dict(a=positive_int, b=positive_int), first={"b": 0.5})


A_FILE = os.path.join(HERE, "README.md")  # a regular file, for paths that put a folder under one
BAD_INPUTS = [  # (script, args, what the one line must say); every script, every class of setting
    ("train.py", ["--p=2"], "p must be a number in [0, 1]"), ("train.py", ["--p=nan"], "p must be float"),
    ("train.py", ["--bogus=1"], "unknown key 'bogus'"), ("train.py", ["--act=gelu"], "act must be one of"),
    ("train.py", ["--alpha=1.5"], "alpha must be"), ("train.py", ["--lr=-1"], "lr must be"),
    ("train.py", ["--lr=0.01", "--min_lr=0.1"], "min_lr=0.1 must not exceed"), ("train.py", ["--vocab=100"], "vocab must be"),
    ("train.py", ["--n_embd=30"], "n_embd=30 must be"), ("train.py", ["--compile=maybe"], "compile must be one of"),
    ("train.py", ["--device=cuda"], "device must be"), ("train.py", ["--device=tpu"], "device must be"),
    ("train.py", [f"--out_dir={A_FILE}/run"], "out_dir must be a folder path, but"),
    ("train.py", ["--init_from=missing.pt"], "init_from must be"), ("train.py", ["--data=no/such/texts"], "data must be"),
    ("train.py", ["--init_from=resume", "--out_dir=/nonexistent/x"], "no checkpoint at"),
    ("train.py", ["no_such_config.py"], "config file no_such_config.py"),
    ("sample.py", ["--top_k=0"], "top_k must be None or an int"), ("sample.py", ["--top_k=1.5"], "top_k must be"),
    ("sample.py", ["--top_p=nan"], "top_p must be"), ("sample.py", ["--top_p=0"], "top_p must be"),
    ("sample.py", ["--temperature=-1"], "temperature must be"), ("sample.py", ["--score_act=stoch"], "score_act must be"),
    ("sample.py", ["--device=cuda:3"], "device must be"), ("sample.py", ["--ckpt=missing.pt"], "ckpt must be an existing file"),
    ("sample.py", ["--prompt=FILE:missing.txt"], "prompt must be"), ("sample.py", [f"--json={HERE}"], "json must be one of '' or a file path"),
    ("bench.py", ["--ckpt=missing.pt"], "ckpt must be one of '' or an existing file"), ("bench.py", ["--sizes=abc"], "sizes must be"),
    ("bench.py", ["--batches=0"], "batches must be"), ("bench.py", ["--sparsities=101"], "sparsities must be"),
    ("bench.py", ["--devices=cuda"], "devices must be"), ("bench.py", ["--dtypes=float64"], "dtypes must be"),
    ("bench.py", [f"--json={A_FILE}/rows.json"], "json must be"), ("bench.py", ["--min_time=0"], "min_time must be"),
    ("bench.py", ["--gate=gelu"], "gate must be"),
    ("experiments.py", [], "usage: python experiments.py"), ("experiments.py", ["bogus"], "usage"),
    ("experiments.py", ["tables", "--jobs=0"], "jobs must be"), ("experiments.py", ["tables", f"--out={A_FILE}/x"], "out must be"),
    ("experiments.py", ["diversity", "--ckpt=missing.pt"], "no checkpoint at missing.pt"),
    ("plot.py", ["--out=no/such/dir"], "out must be an existing folder"),
    ("build.py", ["--bogus"], "usage: python build.py"),
    ("data.py", ["--vocab=5"], "vocab must be"), ("data.py", ["--data=no/such/texts"], "data must be"),
    ("data.py", ["--foo=1"], "unknown key 'foo'"), ("data.py", [f"--data_root={A_FILE}/d"], "data_root must be"),
]


@pytest.mark.parametrize("script,args,message", BAD_INPUTS, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(script, args, message):
    """Checked before any work (nothing printed before the error), one line, exit 1, no traceback."""
    r = subprocess.run([sys.executable, script] + args, cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == "", (r.stdout, r.stderr)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        train.main(["--init_from=resume", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="unreadable"):
        sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}"])

# -----------------------------------------------------------------------------
# tokenizer and data


def test_tokenizer_known_ids():
    gpt2 = data.tokenizer(50257)  # GPT-2's own encoding, id for id
    assert gpt2.encode_ordinary("hello world") == [31373, 995] and gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
    small = data.tokenizer(8192)  # "hello" is GPT-2's rank 31373: built here from its lower-rank parts
    assert small.encode_ordinary("hello world") == [258, 297, 78, 995] and small.eot_token == 8191
    assert data.tokenizer_name(50257) == "gpt2" and data.tokenizer_name(8192) == "gpt2-8192"
    for bad in (256, 50258, 8192.0, True, "8192"):
        with pytest.raises(ValueError, match="vocab"):
            data.tokenizer(bad)


@pytest.mark.parametrize("vocab", [257, 300, 1024, 8192, 50257])
def test_compact_tokenizer_is_a_valid_bpe(vocab):
    enc = data.tokenizer(vocab)
    rng = random.Random(vocab)
    pool = [chr(c) for c in list(range(0, 0x250)) + list(range(0x370, 0x3ff)) + list(range(0x4e00, 0x4e40))
            + [0x1f600, 0x1f680, 0x200d, 0x301, 0xfeff, 0x10ffff]] + [" ", "  ", "\n", "\t", "the", " Romeo", "'s"]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 200))) for _ in range(50)]
    texts.append(bytes(range(256)).decode("latin-1"))
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert all(0 <= i < vocab - 1 for i in ids)  # every id fits, and only the special token is N-1
        assert enc.decode(ids) == text and enc.decode_bytes(ids) == text.encode("utf-8")
        assert sum(data.token_bytes(enc)[ids]) == len(text.encode("utf-8"))  # bits per byte's denominator
    assert enc.encode("<|endoftext|>", allowed_special="all") == [vocab - 1]


def test_compact_tokenizer_equals_gpt2_where_gpt2_uses_only_low_ranks(tmp_path):
    import regex
    from tiktoken_ext.openai_public import r50k_pat_str
    full, small = data.tokenizer(50257), data.tokenizer(2048)
    text = open(write_corpus(tmp_path, n_docs=1) / "doc00.txt").read() + (
        " Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds"
        " that lour'd upon our house in the deep bosom of the ocean buried. 1234 éàü naïveté Ωμέγα")
    same = differ = 0
    for piece in regex.findall(r50k_pat_str, text):  # BPE runs on each pre-tokenized piece alone
        ids = full.encode_ordinary(piece)
        if max(ids) < 2048 - 1:
            assert small.encode_ordinary(piece) == ids, piece
            same += 1
        else:
            assert small.encode_ordinary(piece) != ids
            differ += 1
    assert same > 50 and differ > 5
    low = "".join(p for p in regex.findall(r50k_pat_str, text) if max(full.encode_ordinary(p)) < 2047)
    assert small.encode_ordinary(low) == full.encode_ordinary(low)  # and so on whole text made of such pieces


def test_prepare_local_corpus_splits_by_document_and_caches(tmp_path):
    folder = write_corpus(tmp_path / "texts", n_docs=12)
    out = data.prepare(str(folder), str(tmp_path / "data"), vocab=1024)
    assert os.path.basename(out) == "gpt2-1024"  # cached per tokenizer
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["val_docs"] == ["doc05.txt"] and meta["tokenizer"] == "gpt2-1024" and meta["vocab_size"] == 1024
    enc = data.tokenizer(1024)
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16)
    want = enc.encode_ordinary(open(folder / "doc05.txt").read()) + [enc.eot_token]
    assert val.tolist() == want
    assert data.token_bytes(enc)[val].sum() == meta["val_bytes"] == len(open(folder / "doc05.txt", "rb").read())
    train_ids = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    assert len(train_ids) == meta["train_tokens"] and (train_ids == enc.eot_token).sum() == 11
    stamp = os.path.getmtime(os.path.join(out, "train.bin"))
    assert data.prepare(str(folder), str(tmp_path / "data"), vocab=1024) == out  # cached: not tokenized again
    assert os.path.getmtime(os.path.join(out, "train.bin")) == stamp
    other = data.prepare(str(folder), str(tmp_path / "data"), vocab=50257)  # another vocabulary: its own folder
    assert other != out and np.fromfile(os.path.join(other, "val.bin"), dtype=np.uint16).max() > 1024
    assert os.path.getmtime(os.path.join(out, "train.bin")) == stamp
    assert data.check_data(out, 1024)["tokenizer"] == "gpt2-1024"
    with pytest.raises(ValueError, match="tokenized with 'gpt2-1024'"):
        data.check_data(out, 50257)
    with pytest.raises(FileNotFoundError, match="no prepared data"):
        data.check_data(str(tmp_path), 1024)
    (folder / "doc00.txt").write_text("Changed text.\n")
    data.prepare(str(folder), str(tmp_path / "data"), vocab=1024)  # the source changed: tokenized again
    assert json.load(open(os.path.join(out, "meta.json")))["source_sha256"] != meta["source_sha256"]


def test_prepare_single_file_and_bad_paths(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i} of the play\n" for i in range(100)))
    out = data.prepare(str(path), str(tmp_path / "data"))
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert 0 < meta["val_tokens"] < meta["train_tokens"]  # the last 10% of the lines
    with pytest.raises(FileNotFoundError):
        data.prepare(str(tmp_path / "missing"), str(tmp_path / "data"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        data.prepare(str(tmp_path / "empty"), str(tmp_path / "data"))

# -----------------------------------------------------------------------------
# training, resuming, sampling


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short StochA + Swi+FT run on a tiny local corpus, shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "texts", n_docs=12)
    out = root / "out"
    args = [f"--data={corpus}", f"--data_root={root / 'data'}", f"--out_dir={out}", "--max_iters=150",
            "--eval_interval=50", "--log_interval=10", "--p=0.5", "--alpha=0.2"] + TINY
    summary = train.main(args)
    return dict(out=out, corpus=corpus, root=root, summary=summary, args=args)


def test_training_lowers_the_loss_and_ends_sparse(tiny_run):
    s = tiny_run["summary"]
    assert s == json.load(open(tiny_run["out"] / "summary.json"))
    for key in ("val_loss", "sparsity", "dead_fraction", "act", "p", "alpha", "iters", "tokens", "seconds", "device"):
        assert key in s
    assert s["act"] == "stoch" and s["eval_act"] == "relu" and s["switch_iter"] == 120
    assert s["val_loss"] < 3.0  # from ln(1024) = 6.9 at the start
    assert s["vocab"] == 1024 and s["tokenizer"] == "gpt2-1024" and s["compile"] is False
    # bits per byte = nats per token / ln 2 / bytes per token, and this corpus has ~2-4 bytes per token
    assert s["val_loss"] / math.log(2) / 4.5 < s["val_bpb"] < s["val_loss"] / math.log(2) / 1.5
    # exact zeros under relu (silu would give none); this tiny run ends near 0.44, random init 0.5
    assert 0.3 < s["sparsity"] < 1.0 and len(s["sparsity_per_layer"]) == 2
    rows = [json.loads(line) for line in open(tiny_run["out"] / "log.jsonl")]
    acts = [r["act"] for r in rows if r["kind"] == "train"]
    assert acts[:12] == ["stoch"] * 12 and acts[12:] == ["relu"] * 3  # the switch at 120
    first = next(r for r in rows if r["kind"] == "eval")
    assert first["iter"] == 0 and first["val_loss"] > 6.0 and "val_bpb" in first and "val_bpb_infer" in first


@pytest.mark.parametrize("compiled", [False, True])
def test_resume_after_interrupt_gives_the_same_losses(tiny_run, tmp_path, compiled):
    """Ctrl-C mid-run checkpoints; --init_from=resume then continues exactly as if never stopped,
    also with torch.compile, whose StochA draws come from the same saved RNG state."""
    common = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", "--max_iters=60",
              "--eval_interval=25", "--log_interval=1", "--alpha=0.3"] + TINY + [f"--compile={compiled}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = lambda out, *extra: subprocess.run([sys.executable, "train.py", f"--out_dir={out}", *common, *extra],
                                             cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", f"--out_dir={out}", *common], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"iter": 10,' in log.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped at iter" in stdout, stderr
    stopped = json.loads(log.read_text().splitlines()[-1])["iter"]
    assert 10 <= stopped < 60  # interrupted somewhere in the middle, also away from a checkpoint
    resumed = run(out, "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    losses = lambda path: [(r["iter"], r["act"], r["loss"]) for r in map(json.loads, open(path / "log.jsonl"))
                           if r["kind"] == "train"]
    assert losses(out) == losses(tmp_path / "full")
    assert [r[0] for r in losses(out)] == list(range(1, 61))
    a, b = (json.load(open(d / "summary.json")) for d in (tmp_path / "full", out))
    assert a["val_loss"] == b["val_loss"] and a["sparsity"] == b["sparsity"]


def test_resume_survives_a_torn_log_and_a_stale_tmp(tiny_run, tmp_path, capsys):
    """A kill mid-append tears log.jsonl's last line, a kill mid-save leaves ckpt.pt.tmp: resume
    drops what it cannot parse (and says so), ignores the tmp, and goes on from the checkpoint."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    good = (out / "log.jsonl").read_text()
    (out / "log.jsonl").write_text(good + '{"kind": "train", "iter": 1' + "\n" + "\x00\xff garbage\n" + '"a string"\n')
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    s = train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=160", "--eval_interval=50"])
    assert "dropped 3 unreadable line(s)" in capsys.readouterr().out
    assert s["iters"] == 160 and s["resumed_from"] == 150 and not (out / "ckpt.pt.tmp").exists()
    rows = train.read_log(out / "log.jsonl")
    assert [r["iter"] for r in rows if r["kind"] == "train"][-2:] == [150, 160]
    assert len(good.splitlines()) + 2 == len((out / "log.jsonl").read_text().splitlines())  # + train 160, eval 160


def tiny_losses(tiny_run, out, *extra, env=None):
    args = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={out}",
            "--max_iters=12", "--eval_interval=6", "--log_interval=1", "--alpha=0.25"] + TINY + list(extra)
    r = subprocess.run([sys.executable, "train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    return r.stdout, [r_["loss"] for r_ in rows if r_["kind"] == "train"], json.load(open(out / "summary.json"))


def test_compiled_training_matches_eager(tiny_run, tmp_path):
    """torch.compile on the CPU: the same losses as eager within float tolerance (relu: no draws)."""
    _, eager, _ = tiny_losses(tiny_run, tmp_path / "eager", "--act=relu", "--compile=False")
    out, compiled, s = tiny_losses(tiny_run, tmp_path / "compiled", "--act=relu", "--compile=True")
    assert "compile True" in out and s["compile"] is True and len(compiled) == 12
    assert np.allclose(compiled, eager, rtol=1e-4, atol=1e-4), (compiled, eager)


def test_compile_failure_falls_back_to_eager_exactly(tiny_run, tmp_path):
    """No working C++ compiler: one line, then the same run as --compile=False, StochA draws included."""
    env = dict(CXX="/nonexistent/c++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # no cached kernels
    out, fell_back, s = tiny_losses(tiny_run, tmp_path / "fallback", "--compile=True", env=env)
    assert "torch.compile failed" in out and "training eagerly" in out and s["compile"] is False
    _, eager, s_eager = tiny_losses(tiny_run, tmp_path / "eager", "--compile=False")
    assert fell_back == eager and s["val_loss"] == s_eager["val_loss"]
    assert train.compile_choice(None, "cpu")[0] is True  # this machine has g++
    assert train.compile_choice(False, "cuda") == (False, "set by --compile")
    assert train.compile_choice(None, "mps")[0] is False


def test_stoch_act_compiled_keeps_its_rate_and_gradient():
    """Inside a compiled graph StochA draws at rate p, afresh at every call, from the global RNG
    (so a saved RNG state replays them), and backward uses the forward's draws."""
    f = torch.compile(lambda x: stoch_act(x, 0.3))
    x = -torch.rand(256, 1024) - 0.1  # all negative: the output is nonzero exactly where silu was drawn
    torch.manual_seed(0)
    a = f(x) != 0
    b = f(x) != 0
    assert abs(a.float().mean().item() - 0.3) < 0.01 and not torch.equal(a, b)  # rate p, fresh draws
    torch.manual_seed(0)
    assert torch.equal(f(x) != 0, a)  # replayed from the RNG state
    xg = torch.randn(256, 1024, requires_grad=True)
    y = f(xg)
    y.sum().backward()
    neg = xg.detach() < 0
    drawn = neg & (y.detach() != 0)
    assert torch.equal(xg.grad[~neg], torch.ones_like(xg.grad[~neg]))
    assert torch.equal(xg.grad[neg & ~drawn], torch.zeros_like(xg.grad[neg & ~drawn]))  # relu drawn: no gradient
    s = torch.sigmoid(xg.detach()[drawn])
    assert torch.allclose(xg.grad[drawn], s * (1 + xg.detach()[drawn] * (1 - s)), atol=1e-6)
    assert abs(drawn.sum().item() / neg.sum().item() - 0.3) < 0.01


def test_continued_pretraining_from_a_checkpoint(tiny_run, tmp_path):
    args = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={tmp_path}",
            f"--init_from={tiny_run['out'] / 'ckpt.pt'}", "--act=silu", "--alpha=0.5", "--max_iters=20",
            "--eval_interval=20"] + TINY
    s = train.main(args)
    assert s["act"] == "silu" and s["switch_iter"] == 10
    assert s["val_loss"] < 3.5  # it started from the trained weights, not from scratch


def test_checkpoint_and_data_share_one_tokenizer(tiny_run, tmp_path):
    """Scripts read a checkpoint's own tokenized text and vocabulary; a mismatch is one clear line."""
    ckpt = tiny_run["out"] / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    own = data.checkpoint_data(state)
    assert own == state["config"]["data_dir"] and own.endswith("gpt2-1024")
    other = data.prepare(str(tiny_run["corpus"]), str(tiny_run["root"] / "data"), vocab=2048)
    with pytest.raises(ValueError, match="tokenized with 'gpt2-2048'"):
        data.checkpoint_data(state, other)
    r = subprocess.run([sys.executable, "bench.py", f"--ckpt={ckpt}", f"--data_dir={other}"], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "tokenized with" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="--vocab=2048, but the checkpoint's model has vocab 1024"):
        train.main(["--init_from=resume", f"--out_dir={tiny_run['out']}", "--vocab=2048"])
    rep = sample.main([f"--ckpt={ckpt}", "--num_samples=2", "--max_new_tokens=8", "--quiet=True", "--prompt=Romeo, the king"])
    prompt = "Romeo, the king"  # ' king' is GPT-2's rank 5822: one token with 8192 ids, several with 1024
    assert rep["prompt_ids"] == data.tokenizer(1024).encode_ordinary(prompt) != data.tokenizer(8192).encode_ordinary(prompt)
    assert rep["samples"] == [data.tokenizer(1024).decode(ids) for ids in rep["sample_ids"]]


def test_sample_stoch_is_diverse_and_relu_greedy_is_deterministic(tmp_path):
    # an untrained model with a strong FFN: StochA's draws flip its greedy choices (on the tiny trained
    # model they move all the top logits together and rarely do)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, act="relu")
    ckpt = tmp_path / "ckpt.pt"
    model = GPT(cfg)
    for name, w in model.named_parameters():
        if ".ffn.w" in name:  # large FFN weights, so that the activation's draws move the logits
            torch.nn.init.normal_(w, std=0.5)
    torch.save(dict(model=model.state_dict(), model_args=asdict(cfg), config=dict(act="relu", alpha=0.0, eval_act="relu"),
                    iter_num=0), ckpt)
    common = [f"--ckpt={ckpt}", "--num_samples=6", "--max_new_tokens=24", "--temperature=0", "--quiet=True",
              "--prompt=Romeo"]
    relu = sample.main(common + ["--act=relu"])
    assert relu["act"] == "relu" and relu["unique_samples"] == 1 and relu["self_bleu"] == pytest.approx(1.0)
    assert sample.main(common + ["--act=relu", "--seed=7"])["samples"] == relu["samples"]
    stoch = sample.main(common + ["--act=stoch", "--p=0.5", f"--json={tmp_path / 'r.json'}"])
    assert stoch["unique_samples"] > 1 and stoch["distinct_2"] > relu["distinct_2"]
    assert stoch["self_bleu"] < 1.0
    assert json.load(open(tmp_path / "r.json"))["samples"] == stoch["samples"]
    assert sample.main(common + ["--act=stoch", "--p=0.5"])["samples"] == stoch["samples"]  # seeded
    assert max(stoch["mean_log_likelihood"]) == stoch["best_log_likelihood"]
    assert sample.main(common)["act"] == "relu"  # auto: the checkpoint's inference activation


def test_diversity_metrics():
    same = [[1, 2, 3, 4, 5]] * 3
    assert sample.distinct_n(same, 1) == pytest.approx(5 / 15)
    assert sample.self_bleu(same) == pytest.approx(1.0)
    apart = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    assert sample.distinct_n(apart, 2) == 1.0 and sample.self_bleu(apart) == 0.0
    assert 0 < sample.bleu([1, 2, 3, 4, 9], [[1, 2, 3, 4, 5]]) < 1


@pytest.mark.parametrize("hyp,refs,want", [  # values from NLTK 3.9.1: sentence_bleu(refs, hyp, smoothing method2)
    ([1, 2], [[1, 2, 3], [2, 1]], 0.7071067811865476),  # shorter than 4: missing orders count 0 of 1, smoothed
    ([1], [[1]], 0.5946035575013605),
    ([1, 2, 3], [[1, 2, 3]], 0.8408964152537145),
    ([1, 2, 3], [[1, 2, 3, 4, 5, 6, 7]], 0.22165788851265286),  # and the brevity penalty
    ([3, 3, 3, 3], [[3, 3], [3]], 0.4518010018049224),  # clipped counts
    ([1, 2, 3, 4, 5, 6], [[1, 2, 3, 9, 5, 6], [6, 5, 4]], 0.5081327481546147),
    ([1, 2, 3, 4, 5], [[1, 2, 3, 4, 5]], 1.0),
    ([1], [[2]], 0.0),  # no unigram in common
])
def test_bleu_matches_the_standard_definition_at_every_length(hyp, refs, want):
    assert sample.bleu(hyp, refs) == pytest.approx(want, abs=1e-12)


# -----------------------------------------------------------------------------
# experiments.py and plot.py: the results pipeline


def test_experiment_runs_are_valid_train_commands():
    import experiments
    from types import SimpleNamespace
    runs = experiments.quality_runs()
    assert len({d for *_, d in runs}) == len(runs)  # one out_dir per run
    steps = {}
    for group, name, seed, argv, d in runs:
        cfg = dict(train.DEFAULTS)
        configure(cfg, [os.path.join(HERE, argv[0])] + argv[1:])
        train.check_config(SimpleNamespace(**cfg))
        assert cfg["seed"] == seed and cfg["out_dir"] == d
        steps.setdefault(group, set()).add((cfg["max_iters"], cfg["batch_size"], cfg["block_size"], cfg["n_embd"]))
        if group == "cpt":  # continued pre-training starts from the same seed's SILU run
            src = next(r for r in runs if r[0] == "scratch" and r[2] == seed and "--act=silu" in r[3] and "--alpha=0" in r[3])
            assert cfg["init_from"] == os.path.join(src[4], "ckpt.pt") and runs.index(src) < runs.index((group, name, seed, argv, d))
    assert len(steps["scratch"] | steps["alpha"] | steps["p"]) == 1  # matched compute: the same model, steps, tokens
    per_row = {}
    for group, name, seed, *_ in runs:
        per_row.setdefault((group, name), set()).add(seed)
    assert all(len(v) >= (3 if g == "scratch" else 1 if g == "long" else 2) for (g, _), v in per_row.items())
    assert experiments.pm([1.0, 1.2]) == "1.100 ± 0.100" and experiments.pm([0.5], ".1f", 100) == "50.0"
    assert experiments.pm([-0.01, -0.02], "+.3f") == "-0.015 ± 0.005"


def test_quality_table_pairs_seeds_and_shows_the_switch(tmp_path, capsys, monkeypatch):
    """Each row's loss against SILU's of the same seed, and the RELU loss before the switch -> at the end."""
    import experiments
    monkeypatch.setattr(experiments, "out", str(tmp_path))
    def fake(name, seed, val_loss, act, alpha, evals):
        d = tmp_path / "quality" / f"{experiments.slug(name)}-s{seed}"
        d.mkdir(parents=True)
        switch = 300 - round(alpha * 300)
        (d / "summary.json").write_text(json.dumps(dict(
            val_loss=val_loss, val_bpb=val_loss / 2, sparsity=0.6, dead_fraction=0.0, act=act, p=0.5, alpha=alpha, switch_iter=switch,
            iters=300, tokens=1000, seconds=10.0, eval_act="silu" if act == "silu" and alpha == 0 else "relu",
            params=1e6, device_name="cpu", threads=1, val_tokens=100)))
        (d / "log.jsonl").write_text("".join(json.dumps(dict(kind="eval", iter=i, eval_act="relu", val_loss_infer=v)) + "\n"
                                             for i, v in evals))
    for seed, silu, stoch in ((1337, 5.0, 5.1), (1338, 5.2, 5.24)):
        fake("SILU", seed, silu, "silu", 0, [(0, 9.0), (300, silu)])
        fake("StochA p=0.5 + Swi+FT", seed, stoch, "stoch", 0.1, [(0, 9.0), (240, 6.0), (270, 5.5), (300, 5.3)])
    experiments.tables()
    text = capsys.readouterr().out
    assert "| SILU | `--act=silu --alpha=0` | 5.100 ± 0.100 | 2.550 ± 0.050 | +0.000 ± 0.000 | silu |" in text
    # paired: +0.1 and +0.04, whereas the unpaired spreads overlap; RELU at step 270 (the switch) -> 300
    assert "| StochA p=0.5 + Swi+FT | `--act=stoch --p=0.5 --alpha=0.1` | 5.170 ± 0.070 | 2.585 ± 0.035 | +0.070 ± 0.030 | relu |" in text
    assert "| 5.500 -> 5.300 |" in text


def test_frontier_and_health_from_a_checkpoint(tiny_run, tmp_path, capsys, monkeypatch):
    """The frontier stage calibrates thresholds per model and target, reaches each target's sparsity on
    validation text within a few points, resumes without redoing points, and prints its table; the
    health stage writes dead units and collapsed W1 rows for a stress run."""
    import experiments
    monkeypatch.setattr(experiments, "out", str(tmp_path))
    monkeypatch.setattr(experiments, "SEEDS", [1337])
    monkeypatch.setattr(experiments, "TARGETS", (0.8, 0.95))
    monkeypatch.setattr(experiments, "VAL_BATCHES", 4)
    for name in (experiments.SCRATCH[0][0], experiments.SCRATCH[4][0]):  # SILU and StochA + Swi+FT
        run = tmp_path / "quality" / f"{experiments.slug(name)}-s1337"
        run.mkdir(parents=True)
        for f in ("summary.json", "log.jsonl", "ckpt.pt"):
            (run / f).write_bytes((tiny_run["out"] / f).read_bytes())
    experiments.frontier()
    pts = json.load(open(tmp_path / "frontier.json"))["points"]
    silu = {p["target"]: p for p in pts if p["curve"] == "SILU + CATS"}
    assert set(silu) == {None, 0.8, 0.95} and silu[None]["sparsity"] < 0.01 and silu[None]["thresholds"] == []
    for target in (0.8, 0.95):
        assert abs(silu[target]["sparsity"] - target) < 0.06 and all(t > 0 for t in silu[target]["thresholds"])
        assert silu[target]["val_loss"] >= silu[None]["val_loss"] - 0.05
    stoch = [p for p in pts if p["curve"] == "StochA p=0.5 + Swi+FT + t"]
    own = next(p for p in stoch if p["target"] is None)  # its own RELU sparsity; targets below it are skipped
    assert all(p["target"] is None or p["target"] > own["sparsity"] for p in stoch)
    experiments.frontier()  # resumed: nothing is redone
    assert len(json.load(open(tmp_path / "frontier.json"))["points"]) == len(pts)
    capsys.readouterr()
    experiments.frontier_table()
    assert "| SILU + CATS | 80% | 1 |" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401  (optional: only plot.py needs it)
        import plot
        plot.main([f"--out={tmp_path}", f"--assets={tmp_path / 'assets'}"])
        assert (tmp_path / "assets" / "frontier.png").stat().st_size > 1000
    except ImportError:
        pass
    group, name, seed, argv, d = experiments.quality_runs(("stress",))[0]
    os.makedirs(d)
    for f in ("summary.json", "log.jsonl", "ckpt.pt"):
        with open(os.path.join(d, f), "wb") as g:
            g.write((tiny_run["out"] / f).read_bytes())
    experiments.health()
    h = json.load(open(os.path.join(d, "health.json")))
    assert len(h["relu_dead_per_layer"]) == len(h["w1_collapsed_per_layer"]) == 2
    assert all(0 <= v <= 1 for v in h["relu_dead_per_layer"] + h["w1_collapsed_per_layer"])


def test_diversity_at_equal_or_better_quality():
    import experiments
    row = lambda label, ll, d2: dict(label=label, avg_ll=ll, best_ll=ll + 0.5, distinct_2=d2, self_bleu=1 - d2)
    rows = [row("greedy", -2.6, 0.05), row("temperature 0.2", -2.4, 0.2), row("temperature 0.5", -2.5, 0.5),
            row("temperature 1.0", -5.0, 0.9), row("top-p 0.9", -4.0, 0.8)]
    stoch = row("StochA p=0.7, greedy", -2.55, 0.06)
    # T=1.0 is more diverse but worse: the most diverse setting at least as good is T=0.5
    assert experiments.at_least(rows, stoch, "avg_ll", ("temperature", "greedy")) == "temperature 0.5: 0.500 / 0.500 (-2.500)"
    assert experiments.at_least(rows, stoch, "avg_ll", ("top-p",)) == "none as good"


def test_diversity_tables_and_plots_from_a_checkpoint(tiny_run, tmp_path, capsys):
    import experiments
    import plot
    out = tmp_path / "exp"
    ckpt = tiny_run["out"] / "ckpt.pt"
    settings = dict(out=str(out), ckpt=str(ckpt), data_dir="",  # "": the checkpoint's own tokenized text
                    n_prompts=2, prompt_tokens=8, num_samples=3, new_tokens=6)
    old = {k: getattr(experiments, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(experiments, k, v)
        experiments.diversity()
        # one finished quality run, so that the tables show a quality row too
        run = out / "quality" / "SILU-s1337"
        run.mkdir(parents=True)
        for f in ("summary.json", "log.jsonl"):
            (run / f).write_text((tiny_run["out"] / f).read_text())
        capsys.readouterr()
        experiments.tables()
        text = capsys.readouterr().out
    finally:
        for k, v in old.items():
            setattr(experiments, k, v)
    rep = json.load(open(out / "diversity.json"))
    rows = {r["label"]: r for r in rep["rows"]}
    assert len(rows) == len(experiments.SAMPLERS) and rep["score_act"] == "relu"
    assert rows["greedy"]["unique"] == pytest.approx(1 / 3) and rows["greedy"]["self_bleu"] == pytest.approx(1.0)
    assert rows["StochA p=0.5, greedy"]["act"] == "stoch" and rows["temperature 1.0"]["act"] == "relu"
    for r in rows.values():
        assert r["best_ll"] >= r["avg_ll"] and 0 <= r["distinct_2"] <= 1 and 0 <= r["self_bleu"] <= 1
    assert rows["temperature 1.0"]["distinct_2"] > rows["greedy"]["distinct_2"]
    tiny = tiny_run["summary"]  # shown as a row, in nats per token and bits per byte
    assert f"| SILU | `--act=silu --alpha=0` | {tiny['val_loss']:.3f} | {tiny['val_bpb']:.3f} | +0.000 |" in text
    assert "### Diversity" in text and "| p=0.7 |" in text
    try:
        import matplotlib  # noqa: F401  (optional: only plot.py needs it)
    except ImportError:
        with pytest.raises(SystemExit, match="needs matplotlib"):
            plot.main([f"--out={out}", f"--assets={tmp_path / 'assets'}"])
    else:
        plot.main([f"--out={out}", f"--assets={tmp_path / 'assets'}"])
        assert (tmp_path / "assets" / "diversity.png").stat().st_size > 1000


def test_torchrun_ddp_on_cpu(tiny_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={tmp_path}",
           "--max_iters=20", "--eval_interval=10"] + TINY
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["processes"] == 2 and s["tokens"] == 20 * 4 * 32 * 2
    assert "processes 2" in r.stdout

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


@pytest_kernel
@pytest.mark.parametrize("backend", ["c", "torch"])
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
    kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, backend=backend, mode="sparse")
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
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_out_is_overwritten(backend):
    ffn, x = ref_ffn(40, 97), torch.randn(5, 40)
    set_sparsity(ffn, x, 0.9, torch.Generator().manual_seed(1))
    out = torch.full((5, 40), float("nan"))
    kernel = sparse_ffn.SparseFFN(ffn, backend=backend, mode="sparse")
    assert kernel(x, out=out) is out
    with torch.no_grad():
        check_close(out, ffn(x), atol=1e-5, rtol=1e-4)
    out_np = np.full((5, 40), np.nan, dtype=np.float32)  # numpy in and out
    kernel(x.numpy(), out=out_np)
    check_close(torch.from_numpy(out_np), out, atol=0, rtol=0)


@pytest_kernel
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_nan_propagates_per_row(backend):
    ffn, x = ref_ffn(24, 50), torch.randn(3, 24)
    x[1, 5] = float("nan")
    y = sparse_ffn.SparseFFN(ffn, backend=backend, mode="sparse")(x)
    with torch.no_grad():
        ref = ffn(x)
    assert torch.equal(y.isnan(), ref.isnan()) and y[1].isnan().all() and not y[[0, 2]].isnan().any()


@pytest_kernel
def test_deterministic_and_thread_counts():
    ffn, x = ref_ffn(300, 1001), torch.randn(4, 300)
    kernel = sparse_ffn.SparseFFN(ffn, mode="sparse")
    y = kernel(x)
    assert torch.equal(y, kernel(x))  # same threads, same sums in the same order
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            with torch.no_grad():
                check_close(kernel(x), ffn(x), atol=1e-5, rtol=1e-4)
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
    assert kernel(torch.empty(0, 16)).shape == (0, 16)


def test_c_kernel_is_built_on_first_use_and_rebuilt_when_stale(tmp_path):
    """A fresh checkout: the first use of sparse_ffn builds the C kernel (one line), the next
    reuses it, and a newer sparse_ffn.c triggers a rebuild."""
    import shutil
    for f in ("sparse_ffn.py", "sparse_ffn.c", "build.py"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    use = lambda: subprocess.run([sys.executable, "-c", "import sparse_ffn; print(sparse_ffn.backends()['c'])"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300)
    first = use()
    assert first.stdout.strip() == "True" and "building the C kernel once" in first.stderr, first.stderr
    again = use()
    assert again.stdout.strip() == "True" and again.stderr == ""
    later = time.time() + 5
    os.utime(tmp_path / "sparse_ffn.c", (later, later))
    rebuilt = use()
    assert rebuilt.stdout.strip() == "True" and "building the C kernel once" in rebuilt.stderr


@pytest_kernel
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_lazy_negated_views(backend):
    """x._neg_view() keeps the un-negated values in memory: the kernel sees the negated values (x
    and weights are materialized), and an `out` that is such a view is refused."""
    ffn, x = ref_ffn(33, 70), torch.randn(3, 33)
    set_sparsity(ffn, -x, 0.8, torch.Generator().manual_seed(2))
    kernel = sparse_ffn.SparseFFN(ffn, backend=backend, mode="sparse")
    with torch.no_grad():
        want = ffn(-x)
        neg = x._neg_view()
        assert neg.is_neg() and neg.is_contiguous()
        check_close(kernel(neg), want, atol=1e-5, rtol=1e-4)
        check_close(kernel.apply(neg), want, atol=1e-5, rtol=1e-4)
        packed = sparse_ffn.SparseFFN(ffn.w1.weight._neg_view(), ffn.w3.weight._neg_view(), ffn.w2.weight._neg_view(),
                                      backend=backend)  # relu(-W1 x) * (-W3 x) then -W2: the FFN of -x, negated
        check_close(packed(x), -want, atol=1e-5, rtol=1e-4)
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
    plain = torch.empty(3 << 20)
    assert "hg" not in _vma_flags(plain.data_ptr() + plain.nbytes // 2)  # torch's allocator does not ask
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
@pytest.mark.parametrize("backend", ["c", "torch"])
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
    kernel = sparse_ffn.SparseFFN(ffn, dtype=dtype, backend=backend, mode="sparse")
    y = kernel(x, gate=gate, t=t)
    check_close(y, want, atol=1e-5, rtol=1e-4, note=f"seed {seed}, t {t}: ")
    if B <= 16:
        assert kernel.last_active == (a.abs() > t).any(0).sum().item(), f"seed {seed}"
    if s == 1.0:
        assert (y == 0).all()


@pytest_kernel
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_threshold_edge_values(backend):
    """t = 0 with relu is the plain kernel bit for bit; nan still propagates through a silu gate;
    -inf in W1 x gives silu 0, not nan; bad gates and thresholds are one clear error."""
    ffn, x = ref_ffn(40, 97), torch.randn(4, 40)
    kernel = sparse_ffn.SparseFFN(ffn, backend=backend, mode="sparse")
    assert torch.equal(kernel(x), kernel(x, gate="relu", t=0.0))
    x[2, 3] = float("nan")
    y = kernel(x, gate="silu", t=0.01)
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    big = torch.full((1, 40), -1e30)
    with torch.no_grad():
        w = ffn.w1.weight.abs().clone()
    k2 = sparse_ffn.SparseFFN(w, ffn.w3.weight, ffn.w2.weight, backend=backend, mode="sparse")
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
def test_auto_mode_picks_dense_above_the_break_even():
    """The first call runs the kernel; later calls go dense when the last call's active fraction was above
    the break-even, and back to sparse when it falls below; every call matches the reference."""
    ffn = ref_ffn(64, 300)
    kernel = sparse_ffn.SparseFFN(ffn)
    assert kernel.mode == "auto"
    assert 0.0 <= kernel.breakeven(1) <= 1.0  # measured once, then cached for this shape
    sparse_ffn._BREAKEVEN[(64, 300, torch.float32, 1, torch.get_num_threads())] = 0.5
    gen = torch.Generator().manual_seed(0)
    dense_x, sparse_x = torch.randn(1, 64, generator=gen), torch.randn(1, 64, generator=gen)
    set_sparsity(ffn, dense_x, 0.1, gen)  # 90% of the units active for dense_x
    kernel = sparse_ffn.SparseFFN(ffn)
    paths = []
    for x in (dense_x, dense_x, dense_x, sparse_x, sparse_x):
        with torch.no_grad():
            sparse_x_units = (x @ ffn.w1.weight.T > 0).float().mean().item()
            want = ffn(x)
        check_close(kernel(x), want, atol=1e-5, rtol=1e-4)
        paths.append(kernel.last_path)
    expect_last = "dense" if sparse_x_units > 0.5 else "sparse"  # after one sparse_x call, its own fraction decides
    assert paths[:4] == ["sparse", "dense", "dense", "dense"] and paths[4] == expect_last, paths
    bf = sparse_ffn.SparseFFN(ffn, dtype=torch.bfloat16)  # 16-bit weights: always the kernel in auto mode
    bf(dense_x), bf(dense_x)
    assert bf.last_path == "sparse"
    with pytest.raises(ValueError, match="mode"):
        sparse_ffn.SparseFFN(ffn, mode="fast")


def test_calibrate_thresholds_reaches_target():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=3, act="silu")).eval()
    calib = [torch.randint(97, (4, 48)) for _ in range(3)]
    for target in (0.5, 0.9):
        ts = model.calibrate_thresholds(calib, target)
        assert len(ts) == 3 and all(t > 0 for t in ts)
        with torch.no_grad(), model.ffn_stats() as layers:
            for idx in calib:
                model(idx)
        for layer in layers:  # on the calibration tokens themselves: the target, to a unit's worth
            assert abs(layer["sparsity"] - target) < 1e-3, layers
    model.set_act("relu")  # relu is ~50% sparse at init: below it t = 0, above it t > 0
    assert model.calibrate_thresholds(calib, 0.2) == [0.0] * 3
    assert all(t > 0 for t in model.calibrate_thresholds(calib, 0.9))
    model.set_thresholds(None)
    assert all(b.ffn.threshold == 0.0 for b in model.blocks)
    model.set_act("stoch", 0.5)
    with pytest.raises(ValueError, match="relu or silu"):
        model.calibrate_thresholds(calib, 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        model.set_thresholds([0.1, -1.0, 0.0])


@pytest_kernel
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_attach_with_thresholds_matches_model(act):
    """A thresholded model (CATS for silu) gives the same logits and greedy tokens through the kernel."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    model = GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, act=act)).eval()
    idx = torch.randint(97, (2, 20))
    model.calibrate_thresholds([torch.randint(97, (4, 40))], 0.85)
    with torch.no_grad():
        want, _ = model(idx, targets=idx)
        want_tokens = model.generate(idx[:1, :8], 12, temperature=0)
        sparse_ffn.attach(model)
        calls = []
        for b in model.blocks:
            kernel = b.ffn.kernel
            b.ffn.kernel = lambda x, g, t, k=kernel: calls.append((g, t)) or k(x, g, t)
        got, _ = model(idx, targets=idx)
        tokens = model.generate(idx[:1, :8], 12, temperature=0)
    assert calls and all(g == act and t == b.ffn.threshold for (g, t), b in zip(calls, model.blocks))
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
        sparse_ffn.attach(model, linear=True)
        assert all("forward" in l.__dict__ for l in (model.blocks[0].attn.wq, model.lm_head))
        got, _ = model(idx, targets=idx)
        tokens = model.generate(idx[:1, :8], 12, temperature=0)
        sparse_ffn.attach(model, dtype=torch.bfloat16, linear=True)
        half, _ = model(idx, targets=idx)
    check_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, want_tokens)
    check_close(half, want, atol=5e-2, rtol=5e-2)
    model.train()  # training: nn.Linear's own forward, with gradients
    loss = model(idx, targets=idx)[1]
    loss.backward()
    assert model.blocks[0].attn.wq.weight.grad is not None
    sparse_ffn.detach(model)
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
                with torch.no_grad():
                    check_close(kernel(x), ref(x), atol=1e-5, rtol=1e-4, note=f"seed {seed}, {d}x{h} B={B} s={s}: ")
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
            sparse_ffn.attach(model, dtype=dtype, linear=linear)
        torch._dynamo.reset()
        want = model.generate(prompt, 12, temperature=0)
        assert torch.equal(model.generate(prompt, 12, temperature=0, compile=True), want), (dtype, linear)
        sparse_ffn.detach(model)
    x = torch.randn(3, 64)  # the ops themselves, called directly, against the eager kernels
    k = sparse_ffn.SparseFFN(model.blocks[0].ffn, dtype=torch.int8, mode="sparse")
    check_close(sparse_ffn.c_ffn_op(x, k.w1, k.w32, k.scales, 0, 0.0), k(x), atol=0, rtol=0)
    lin = sparse_ffn.DenseLinear(model.lm_head.weight, torch.bfloat16)
    check_close(sparse_ffn.c_gemv_op(x, lin.w, lin.scales), lin(x), atol=0, rtol=0)


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
    for name, p in sparse_ffn.int8_twin(model, linear=True).named_parameters():  # the library's own copy
        assert torch.equal(p, dict(twin.named_parameters())[name]), name
    assert torch.equal(sparse_ffn.int8_twin(model).blocks[0].attn.wq.weight, model.blocks[0].attn.wq.weight)
    idx = torch.randint(97, (2, 20))
    with torch.no_grad():
        want, _ = twin(idx, targets=idx)
        want_tokens = twin.generate(idx[:1, :8], 12, temperature=0)
        sparse_ffn.attach(model, dtype=torch.int8, linear=True)
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
def test_attach_matches_model():
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
        assert sparse_ffn.attach(model) == 2
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
        sparse_ffn.detach(model)
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
    sparse_ffn.attach(model)
    _, loss = model(idx, targets=idx)  # autograd on: the module's own ops, so the FFN gets its gradients
    loss.backward()
    check_close(loss, want, atol=1e-6, rtol=1e-6)
    check_close(model.blocks[0].ffn.w1.weight.grad, grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError):  # the kernel itself has no backward: it says so
        model.blocks[0].ffn.kernel.packed(torch.randn(2, 32, requires_grad=True))
    twin = copy.deepcopy(model)  # packed weights are plain tensors: a model with kernels copies
    with torch.no_grad():
        check_close(twin(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest_kernel
def test_backends_and_build_report():
    b = sparse_ffn.backends()
    assert set(b) >= {"c", "cuda", "torch"} and b["torch"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in b.values())
    assert sparse_ffn.c_info()["max_batch"] >= 1
    if torch.version.cuda is None:  # a CPU-only torch: the CUDA build says why it skips
        ok, msg = build.build_cuda()
        assert ok is None and "CPU-only" in msg

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
