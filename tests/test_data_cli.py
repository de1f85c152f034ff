"""
The tests of the data and the command lines: lib/configurator.py (--key=value, config files, the rules);
every script's bad input as one clear line (the fast run takes one or two per script, --full all of
them); the tokenizers (GPT-2's and the compact vocabularies); lib/data.py's preparation and its refusal of
text that is not UTF-8; the README's train.py and sample.py commands, run as written.

Run: python -m pytest -q tests/test_data_cli.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network (the tokenizer comes from an installed package, the corpora are written here).
"""

import json
import os
import random
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from lib import data
from lib import gguf_io
import sample
import train
from lib.configurator import ConfigError, configure
from model import GPT, GPTConfig
from testutil import ROOT, TINY, write_corpus

# -----------------------------------------------------------------------------
# configuration and command-line errors


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
    from lib.configurator import between, check_rules, either, int_list, new_dir, one_of, optional, positive_int
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


A_FILE = os.path.join(ROOT, "README.md")  # a regular file, for paths that put a folder under one
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
    ("sample.py", ["--device=cuda:3"], "device must be"), ("sample.py", ["--ckpt=missing.pt"], "ckpt must be one of 'smollm2' or an existing file"),
    ("sample.py", ["--prompt=FILE:missing.txt"], "prompt must be"), ("sample.py", [f"--json={ROOT}"], "json must be one of '' or a file path"),
    ("bench.py", ["--ckpt=missing.pt"], "ckpt must be one of '', 'smollm2' or an existing file"),
    ("bench.py", ["--cats=50"], "--cats needs --ckpt"), ("train.py", ["--vocab=60000"], "for GPT-2's tokenizer"),
    ("lib/gguf_io.py", ["--qtype=Q4_0"], "qtype must be"), ("sample.py", ["--chat=maybe"], "chat must be"), ("bench.py", ["--sizes=abc"], "sizes must be"),
    ("bench.py", ["--batches=0"], "batches must be"), ("bench.py", ["--sparsities=101"], "sparsities must be"),
    ("bench.py", ["--devices=cuda"], "devices must be"), ("bench.py", ["--dtypes=float64"], "dtypes must be"),
    ("bench.py", [f"--json={A_FILE}/rows.json"], "json must be"), ("bench.py", ["--min_time=0"], "min_time must be"),
    ("bench.py", ["--gate=gelu"], "gate must be"),
    ("experiments/run.py", [], "usage: python -m experiments.run"), ("experiments/run.py", ["bogus"], "usage"),
    ("experiments/run.py", ["tables", "--jobs=0"], "jobs must be"), ("experiments/run.py", ["tables", f"--out={A_FILE}/x"], "out must be"),
    ("experiments/run.py", ["diversity", "--ckpt=missing.pt"], "no checkpoint at missing.pt"),
    ("experiments/plot.py", ["--out=no/such/dir"], "out must be an existing folder"),
    ("build.py", ["--bogus"], "usage: python build.py"),
    ("lib/data.py", ["--vocab=5"], "vocab must be"), ("lib/data.py", ["--data=no/such/texts"], "data must be"),
    ("lib/data.py", ["--foo=1"], "unknown key 'foo'"), ("lib/data.py", [f"--data_root={A_FILE}/d"], "data_root must be"),
]


# each is a subprocess (~1.5-2.5 s on 2 cores): the fast run takes one or two per script, --full every case
FAST_BAD_INPUTS = {("train.py", "--p=2"), ("train.py", "--init_from=resume", "--out_dir=/nonexistent/x"),
                   ("sample.py", "--ckpt=missing.pt"), ("bench.py", "--sizes=abc"), ("experiments/run.py",),
                   ("experiments/plot.py", "--out=no/such/dir"), ("build.py", "--bogus"), ("lib/data.py", "--vocab=5")}


@pytest.mark.parametrize("script,args,message", [
    pytest.param(s, a, m, id=f"{s} {' '.join(a)}", marks=() if (s, *a) in FAST_BAD_INPUTS else pytest.mark.full)
    for s, a, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(script, args, message):
    """Checked before any work (nothing printed before the error), one line, exit 1, no traceback."""
    run = ["-m", script[:-3].replace("/", ".")] if "/" in script else [script]  # lib/ and experiments/ run as modules
    r = subprocess.run([sys.executable, *run, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
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
    assert data.check_data(out, "gpt2-1024")["tokenizer"] == "gpt2-1024"
    with pytest.raises(ValueError, match="tokenized with 'gpt2-1024'"):
        data.check_data(out, "gpt2")
    with pytest.raises(FileNotFoundError, match="no prepared data"):
        data.check_data(str(tmp_path), "gpt2-1024")
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


def test_text_that_is_not_utf8_is_refused(tmp_path):
    """--data must be UTF-8 text: random bytes, UTF-16 (with its byte-order mark), a folder with an executable
    among its .txt files, and NUL characters are refused with one line naming the file and the offset of the
    first bad byte, before anything is written to the data cache. A UTF-8 byte-order mark is dropped."""
    rng = random.Random(0)
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("Romeo loves Juliet in act 1.\n".encode("utf-16"))  # BOM, then little-endian pairs
    folder = write_corpus(tmp_path / "texts", n_docs=3)
    elf = folder / "doc01.txt"
    elf.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))  # the start of an executable
    nul = tmp_path / "nul.txt"
    nul.write_bytes("Romeo loves Juliet.\n".encode() + b"\x00" + b"more text\n")
    with pytest.raises(UnicodeDecodeError) as bad:
        noise.read_bytes().decode("utf-8")
    cases = [(noise, noise, f"byte offset {bad.value.start} "), (utf16, utf16, "byte offset 0 .*UTF-16"),
             (folder, elf, "NUL character at byte offset 7 "), (nul, nul, "NUL character at byte offset 20 ")]
    root = tmp_path / "cache"
    for path, bad_file, where in cases:
        for call in (lambda: data.prepare(str(path), str(root), vocab=1024),
                     lambda: train.main([f"--data={path}", f"--data_root={root}", f"--out_dir={tmp_path / 'out'}"] + TINY)):
            with pytest.raises(ValueError, match=f"^{re.escape(str(bad_file))}: not UTF-8 text.*{where}") as e:
                call()
            assert "\n" not in str(e.value)
        assert not root.exists() and not (tmp_path / "out").exists()  # nothing half-written
    r = subprocess.run([sys.executable, "train.py", f"--data={folder}", f"--data_root={root}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert f"error: {elf}: not UTF-8 text" in r.stderr and not root.exists()
    bom = tmp_path / "bom.txt"  # a UTF-8 byte-order mark is dropped, the text kept
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(f"line {i} of the play\n" for i in range(100)).encode())
    assert data.text_docs(str(bom)) == [("bom.txt", "".join(f"line {i} of the play\n" for i in range(100)))]

# -----------------------------------------------------------------------------
# the README's commands, run as written


def shell_commands(text):
    """The commands of a text's ```bash blocks, in order, as argv lists (comments dropped, && chains split)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


def script_of(argv):
    """(launcher, script, its args) for `python x.py ...`, `.venv/bin/python x.py ...`, `torchrun ... x.py ...`."""
    if argv[0] in ("python", "python3", ".venv/bin/python") and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[:1], argv[1], argv[2:]
    if argv[0] == "torchrun":
        i = next(i for i, w in enumerate(argv) if w.endswith(".py"))
        return argv[:i], argv[i], argv[i + 1:]
    return argv, None, []


def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    """Every train.py and sample.py command of README.md's shell blocks, in the order shown, in a fresh
    folder holding the scripts as a fresh clone does, each with tiny settings appended (a tiny model, a few
    steps, a small corpus for the default one, which needs the network): each must finish, and each run
    writes into its own out_dir, so that no baseline overwrites the main job's out/ that sample.py reads.
    The rest (the venv and pip, pytest, build.py, bench.py, experiments/run.py, experiments/plot.py, lib/gguf_io.py) are not run here;
    train.py's docstring lists the same commands. A command naming the smollm2 model runs on a tiny GGUF file the
    test writes in its place (test_gguf.py covers the import itself), with the model's shape taken from it."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("config", "lib"):
            os.symlink(os.path.join(ROOT, name), clone / name)
    corpus = write_corpus(tmp_path / "texts", n_docs=12)
    write_corpus(clone / "my_texts", n_docs=12, seed=1)  # the README's stand-in for your own texts
    tiny_train = TINY + ["--max_iters=4", "--eval_interval=4", "--log_interval=2", "--final_eval_iters=1"]
    tiny_sample = ["--num_samples=2", "--max_new_tokens=4", "--quiet=True"]
    monkeypatch.chdir(clone)
    commands = shell_commands(open(os.path.join(ROOT, "README.md")).read())
    tiny_gguf = str(tmp_path / "tiny.gguf")
    gguf_io.write(GPT(GPTConfig(vocab_size=1024, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, act="silu")),
                  tiny_gguf, "F32", data.tokenizer(1024))
    ran = []
    for argv in commands:
        launcher, script, args = script_of(argv)
        gguf = any(a.endswith("=smollm2") for a in args)
        args = [a[:-len("smollm2")] + tiny_gguf if a.endswith("=smollm2") else a for a in args]
        if script == "train.py":
            tiny = [a for a in tiny_train if not gguf or not a.startswith(("--n_", "--vocab", "--block_size"))]
            args = args + tiny + ([] if any(a.startswith("--data=") for a in args) else [f"--data={corpus}"])
            if launcher[0] == "torchrun":
                r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher[1:], script, *args],
                                   capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
                assert r.returncode == 0, (argv, r.stderr[-3000:])
                out_dir = next((a[len("--out_dir="):] for a in reversed(args) if a.startswith("--out_dir=")), "out")
                summary = json.load(open(os.path.join(out_dir, "summary.json")))
            else:
                summary = train.main(args)
            assert summary is not None and summary["iters"] == 4, argv
        elif script == "sample.py":
            report = sample.main(args + tiny_sample)
            assert len(report["samples"]) == 2, argv
        else:
            continue
        ran.append(" ".join(argv))
    assert len(ran) >= 14 and sum("sample.py" in r for r in ran) >= 3, ran
    assert (clone / "report.json").exists()
    # each run's own out_dir: the main job's out/ holds the main job (stoch, p=0.5), not a later baseline's
    runs = {d: json.load(open(clone / d / "summary.json")) for d in os.listdir(clone) if d.startswith("out")}
    assert runs["out"]["act"] == "stoch" and runs["out-silu"]["act"] == "silu" and runs["out-relu"]["act"] == "relu"
    assert runs["out-cpt"]["act"] == "stoch" and runs["out-gpu"]["vocab"] == 1024 and runs["out-ddp"]["processes"] == 2
    doc = [shlex.split(line, comments=True) for line in train.__doc__.splitlines()
           if line.strip().startswith(("python train.py", "torchrun"))]
    assert len(doc) == 8 and all(c in commands for c in doc), doc  # the docstring's commands are the README's
