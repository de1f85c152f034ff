"""
The training tests, on one tiny StochA + Swi+FT run (tests/conftest.py's tiny_run) and a tiny local corpus:
the loss falls and the run ends sparse; Swi+FT switches to RELU; Ctrl-C checkpoints and --init_from=resume
continues exactly (and refuses a changed run); continued pre-training from a checkpoint; torch.compile and
its fallback to eager; a checkpoint and its tokenized data; DDP with torchrun on the CPU.

Run: python -m pytest -q tests/test_train.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib import data
import sample
import train
from lib.configurator import ConfigError
from model import GPT
from testutil import ROOT, TINY, full_only

# -----------------------------------------------------------------------------
# training: the loss, the sparsity, the switch to RELU


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
    # The sparsity is the fraction of exact zeros of relu(W1 x) on the final evaluation's batches: recounted
    # here from the checkpoint. At this size it says nothing about the method: measured on this config, a
    # random init gives 0.491, this run 0.449, the same run with no switch 0.449, RELU from scratch 0.466, SILU
    # 0.483 (seed 1: 0.503, 0.440, 0.439, 0.472, 0.468). That training really switches to RELU is
    # test_swift_trains_with_relu_after_the_switch's.
    model = GPT.from_checkpoint(str(tiny_run["out"] / "ckpt.pt")).eval()
    assert model.config.act == "relu"  # the model as the switch left it
    zeros, counts = [0, 0], [0, 0]
    def count(i):
        def hook(module, args, u):
            zeros[i] += (u <= 0).sum().item()  # relu(u) == 0 exactly
            counts[i] += u.numel()
        return hook
    hooks = [b.ffn.w1.register_forward_hook(count(i)) for i, b in enumerate(model.blocks)]
    gen = torch.Generator().manual_seed(1234)  # the evaluation's fixed batches
    with torch.no_grad():
        for _ in range(4):  # final_eval_iters
            model(train.get_batch(os.path.join(s["data"], "val.bin"), gen, 4, 32, "cpu")[0])
    for h in hooks:
        h.remove()
    assert s["sparsity_per_layer"] == pytest.approx([z / c for z, c in zip(zeros, counts)], abs=1e-12)
    assert s["sparsity"] == pytest.approx(sum(s["sparsity_per_layer"]) / 2, abs=1e-12)
    rows = [json.loads(line) for line in open(tiny_run["out"] / "log.jsonl")]
    acts = [r["act"] for r in rows if r["kind"] == "train"]
    assert acts[:12] == ["stoch"] * 12 and acts[12:] == ["relu"] * 3  # the switch at 120
    first = next(r for r in rows if r["kind"] == "eval")
    assert first["iter"] == 0 and first["val_loss"] > 6.0 and "val_bpb" in first and "val_bpb_infer" in first


# -----------------------------------------------------------------------------
# resuming: Ctrl-C, torn files, a changed run refused


# train.py run as a script, with a real SIGINT (Ctrl-C) raised in its own process at the top of step STOP_AT,
# where the step's learning rate is asked for: the stop lands at that step every time, not where a poll
# of the log happens to catch the run
INTERRUPTED_TRAIN = """
import signal, sys
import train
from lib.configurator import cli
get_lr = train.get_lr
def get_lr_or_interrupt(it, C):
    if it == STOP_AT:
        signal.raise_signal(signal.SIGINT)  # its handler runs before this returns
    return get_lr(it, C)
train.get_lr = get_lr_or_interrupt
sys.argv[0] = "train.py"
cli(train.main)
"""


@pytest.mark.parametrize("compiled,stop_at", [(False, 45), *full_only((True, 10))])  # compiled: ~30 s, --full
def test_resume_after_interrupt_gives_the_same_losses(tiny_run, tmp_path, compiled, stop_at):
    """Ctrl-C mid-run checkpoints; --init_from=resume then continues exactly as if never stopped:
    eager after the switch to RELU at 42, compiled before it, whose StochA draws come from the same
    saved RNG state. The stops are away from the checkpoints at 25 and 50."""
    common = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", "--max_iters=60",
              "--eval_interval=25", "--log_interval=1", "--alpha=0.3"] + TINY + [f"--compile={compiled}"]
    run = lambda out, *extra, code=None: subprocess.run(
        [sys.executable, *(["-c", code] if code else ["train.py"]), f"--out_dir={out}", *common, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    cut = run(out, code=INTERRUPTED_TRAIN.replace("STOP_AT", str(stop_at)))
    assert cut.returncode == 0 and f"stopped at iter {stop_at};" in cut.stdout, cut.stderr
    assert f"signal {int(signal.SIGINT)}: checkpointing" in cut.stdout and not (out / "summary.json").exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["iter"] == stop_at
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == stop_at
    resumed = run(out, "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    losses = lambda path: [(r["iter"], r["act"], r["loss"]) for r in map(json.loads, open(path / "log.jsonl"))
                           if r["kind"] == "train"]
    assert losses(out) == losses(tmp_path / "full")
    assert [r[0] for r in losses(out)] == list(range(1, 61)) and losses(out)[42][1] == "relu"
    a, b = (json.load(open(d / "summary.json")) for d in (tmp_path / "full", out))
    assert a["val_loss"] == b["val_loss"] and a["sparsity"] == b["sparsity"]


def test_resume_survives_a_torn_log_and_a_stale_tmp(tiny_run, tmp_path, capsys):
    """A kill mid-append tears log.jsonl's last line, a kill mid-save leaves ckpt.pt.tmp: resume
    drops what it cannot parse (and says so), ignores the tmp, and goes on from the checkpoint (here
    the finished run's last one: it evaluates step 150 again and writes the summary)."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    good = (out / "log.jsonl").read_text()
    (out / "log.jsonl").write_text(good + '{"kind": "train", "iter": 1' + "\n" + "\x00\xff garbage\n" + '"a string"\n')
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    s = train.main([f"--out_dir={out}", "--init_from=resume"])
    assert "dropped 3 unreadable line(s)" in capsys.readouterr().out
    assert s["iters"] == 150 and s["resumed_from"] == 150 and not (out / "ckpt.pt.tmp").exists()
    rows = train.read_log(out / "log.jsonl")
    assert [(r["kind"], r["iter"]) for r in rows][-2:] == [("train", 150), ("eval", 150)]
    assert (out / "log.jsonl").read_text() == good  # the eval at 150 dropped as after the checkpoint, then redone


def test_resume_refuses_a_changed_method_or_shape(tiny_run, tmp_path):
    """--init_from=resume continues the checkpoint's run exactly: a setting that would change its method,
    schedule, data or model shape is refused with one line, before any work, the checkpoint untouched;
    the same values, and settings that only say how it runs (evaluation, logging), are accepted."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run["out"], out)
    ckpt = str(out / "ckpt.pt")
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "summary.json")}
    resume = ["--init_from=resume", f"--out_dir={out}"]
    refused = [
        (["--max_iters=300"], re.escape(f"--max_iters=300, but {ckpt} was trained with max_iters=150; resume continues "
                                        f"that run exactly (start a new run from its weights with --init_from={ckpt} "
                                        "to change it)")),
        (["--alpha=0.5"], "--alpha=0.5, but .* was trained with alpha=0.2"),
        (["--act=silu", "--p=0.3"], "--act=silu and --p=0.3, but .* was trained with act=stoch and p=0.5"),
        (["--lr=1e-3"], "--lr=0.001, but"), (["--warmup_iters=0"], "warmup_iters=5"), (["--batch_size=2"], "batch_size=4"),
        (["--seed=1"], "seed=1337"), ([f"--data={tiny_run['corpus'] / 'doc00.txt'}"], "doc00.txt, but .* data="), (["--eval_act=silu"], "eval_act=relu"),
        (["--n_layer=4"], f"--n_layer=4, but the checkpoint's model has n_layer 2 \\({ckpt}\\)"),
        (["--ffn_hidden=64"], "ffn_hidden 128"), (["--block_size=16"], "block_size 32"),
    ]
    for extra, message in refused:
        with pytest.raises(ConfigError, match=message):
            train.main(resume + extra)
    assert all((out / f).read_bytes() == b for f, b in before.items())  # nothing was written
    # the same values (also --ffn_hidden=0, which resolves to the model's 128, and --eval_act=auto, to relu),
    # and a new eval_interval / log_interval / final_eval_iters: the finished run, evaluated again
    same = TINY + [f"--data={tiny_run['corpus']}", "--max_iters=150", "--alpha=0.2", "--p=0.5", "--n_layer=2",
                   "--ffn_hidden=0", "--eval_act=auto", "--eval_interval=1000", "--log_interval=7", "--final_eval_iters=2"]
    s = train.main(resume + same)
    assert s["iters"] == 150 and s["resumed_from"] == 150 and s["switch_iter"] == 120 and s["act"] == "stoch"
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["max_iters"] == 150 and state["config"]["out_dir"] == str(out)
    assert all(state["config"][k] == state["model_args"][k] for k in ("n_layer", "n_embd", "ffn_hidden", "block_size"))


# -----------------------------------------------------------------------------
# continued pre-training from a checkpoint


def test_continued_pretraining_takes_the_shape_from_the_checkpoint(tiny_run, tmp_path):
    """--init_from=<ckpt>: the weights fix the model's shape (a different shape flag is one clear line, as
    --vocab is); the method and schedule are the new run's own."""
    src = str(tiny_run["out"] / "ckpt.pt")
    base = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={tmp_path}",
            f"--init_from={src}"]
    for flag, message in (("--n_layer=4", f"--n_layer=4, but the checkpoint's model has n_layer 2 \\({src}\\)"),
                          ("--n_embd=64", "n_embd 32"), ("--n_kv_head=4", "n_kv_head 2"), ("--vocab=2048", "vocab 1024")):
        with pytest.raises(ConfigError, match=message):
            train.main(base + [flag])
    assert not os.listdir(tmp_path)
    # no shape flags: the checkpoint's; the new checkpoint's config records the shape its model_args have
    s = train.main(base + ["--act=relu", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--final_eval_iters=1",
                           "--compile=False", "--batch_size=2"])
    assert s["iters"] == 2 and s["act"] == "relu"
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    shape = dict(vocab="vocab_size", n_layer="n_layer", n_head="n_head", n_kv_head="n_kv_head", n_embd="n_embd",
                 ffn_hidden="ffn_hidden", block_size="block_size")
    assert {k: state["config"][k] for k in shape} == {k: state["model_args"][m] for k, m in shape.items()}
    assert state["model_args"]["n_layer"] == 2 and state["model_args"]["n_embd"] == 32


def test_continued_pretraining_from_a_checkpoint(tiny_run, tmp_path):
    args = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={tmp_path}",
            f"--init_from={tiny_run['out'] / 'ckpt.pt'}", "--act=silu", "--alpha=0.5", "--max_iters=20",
            "--eval_interval=20"] + TINY
    s = train.main(args)
    assert s["act"] == "silu" and s["switch_iter"] == 10
    assert s["val_loss"] < 3.5  # it started from the trained weights, not from scratch


# -----------------------------------------------------------------------------
# torch.compile, and eager when it fails


def tiny_losses(tiny_run, out, *extra, env=None):
    args = [f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={out}",
            "--max_iters=12", "--eval_interval=6", "--log_interval=1", "--alpha=0.25"] + TINY + list(extra)
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
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


# -----------------------------------------------------------------------------
# a checkpoint's tokenizer; DDP


def test_checkpoint_and_data_share_one_tokenizer(tiny_run, tmp_path):
    """Scripts read a checkpoint's own tokenized text and vocabulary; a mismatch is one clear line."""
    ckpt = tiny_run["out"] / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    own = data.checkpoint_data(state)
    assert own == state["config"]["data_dir"] and own.endswith("gpt2-1024")
    other = data.prepare(str(tiny_run["corpus"]), str(tiny_run["root"] / "data"), vocab=2048)
    with pytest.raises(ValueError, match="tokenized with 'gpt2-2048'"):
        data.checkpoint_data(state, other)
    r = subprocess.run([sys.executable, "bench.py", f"--ckpt={ckpt}", f"--data_dir={other}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "tokenized with" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="--vocab=2048, but the checkpoint's model has vocab 1024"):
        train.main(["--init_from=resume", f"--out_dir={tiny_run['out']}", "--vocab=2048"])
    rep = sample.main([f"--ckpt={ckpt}", "--num_samples=2", "--max_new_tokens=8", "--quiet=True", "--prompt=Romeo, the king"])
    prompt = "Romeo, the king"  # ' king' is GPT-2's rank 5822: one token with 8192 ids, several with 1024
    assert rep["prompt_ids"] == data.tokenizer(1024).encode_ordinary(prompt) != data.tokenizer(8192).encode_ordinary(prompt)
    assert rep["samples"] == [data.tokenizer(1024).decode(ids) for ids in rep["sample_ids"]]


@pytest.mark.full  # ~9 s; the fast run has DDP in test_readme_commands_run_as_written (its torchrun command)
def test_torchrun_ddp_on_cpu(tiny_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data={tiny_run['corpus']}", f"--data_root={tiny_run['root'] / 'data'}", f"--out_dir={tmp_path}",
           "--max_iters=20", "--eval_interval=10"] + TINY
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["processes"] == 2 and s["tokens"] == 20 * 4 * 32 * 2
    assert "processes 2" in r.stdout
