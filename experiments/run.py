"""
The paper's claims in miniature: every training run, evaluation and timing behind RESULTS.md.

    python -m experiments.run long quality psweep stress alpha --jobs=2   # every training run, 2 at a time (~4 h on 2 cores)
    python -m experiments.run frontier health int8  # thresholds, unit health of the stress runs, int8 weights
    python -m experiments.run diversity          # StochA sampling vs temperature and top-p, from one checkpoint (3 min)
    python -m experiments.run speed              # bench.py --full with the checkpoint, and at the frontier's sparsities
    python -m experiments.run decode             # bench.py with the checkpoint and llama.cpp: the C decode engine
    python -m experiments.run results            # rewrites RESULTS.md's tables from what the stages wrote (experiments/results.py)
    python -m experiments.run tables             # the same tables, printed as markdown
    python -m experiments.plot                           # the figures (needs matplotlib), from the same files

Training stages: long (one 10M-token run), quality (the matched-compute rows, 3 seeds, then continued
pre-training), psweep (p), stress (the dying-RELU learning-rate sweep), alpha; those named share one pool.
Every run is `python train.py config/sweep.py <its flags> --seed=S --out_dir=...`; the tables print each
row's flags so any row can be rerun by hand. A run whose summary.json exists is skipped and an interrupted
one resumes exactly from its checkpoint, so a stage continues where it stopped. Flags: --out=results (where
everything goes; summaries and logs are committed, checkpoints not), --config=config/sweep.py, --jobs=1
(runs at a time; with 2, each gets 1 thread), --seeds=1337,1338,1339 (the other sweeps use the first two),
--ckpt=out/ckpt.pt (the diversity and speed checkpoint: the main job's model), --results_md=RESULTS.md.
"""

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lib.configurator import (ConfigError, cli, configure, either, existing_dir, existing_file, int_list, new_dir, new_file,
                          one_of, positive_int, strict_json)
from experiments import results
from experiments.results import at_least, load_json, log_rows, pm  # noqa: F401  (the tables' helpers, and the JSON readers)

# -----------------------------------------------------------------------------
out = "experiments/results"  # summaries and logs are committed; checkpoints (*.pt) are not
config = "config/sweep.py"  # every run's base; on a GPU e.g. config/gpu.py (and --out=results-gpu)
jobs = 1
seeds = "1337,1338,1339"  # the quality rows use all of them, the other sweeps the first two
ckpt = "out/ckpt.pt"
results_md = "RESULTS.md"  # the prose whose marked tables the results stage rewrites
data_dir = ""  # the diversity prompts' and speed stage's tokenized text; empty = the checkpoint's own
# diversity: N samples of new_tokens after each of n_prompts prompts of prompt_tokens from val.bin
n_prompts = 8
prompt_tokens = 32
num_samples = 8
new_tokens = 48
# -----------------------------------------------------------------------------

SEEDS = [int(s) for s in seeds.split(",")]

# (name, flags) of the matched-compute rows: same model, data, steps and seeds (from `config`)
SCRATCH = [
    ("SILU", "--act=silu --alpha=0"),
    ("RELU from scratch", "--act=relu --alpha=0"),
    ("Swi+FT (SILU then RELU)", "--act=silu --alpha=0.1"),
    ("StochA p=0.3 + Swi+FT", "--act=stoch --p=0.3 --alpha=0.1"),
    ("StochA p=0.5 + Swi+FT", "--act=stoch --p=0.5 --alpha=0.1"),
    ("StochA p=0.5, no switch, RELU at inference", "--act=stoch --p=0.5 --alpha=0"),
]
# the alpha sweep of StochA p=0.5 + Swi+FT; alpha=0.1 is the row above, alpha=0 the no-switch row
ALPHAS = [(f"StochA p=0.5, alpha={a}", f"--act=stoch --p=0.5 --alpha={a}") for a in (0.05, 0.2, 0.4)]
# sparsity against p, all + Swi+FT; p=0.3 and 0.5 are rows above, and p=0 is RELU itself
PS = [(f"StochA p={p} + Swi+FT", f"--act=stoch --p={p} --alpha=0.1") for p in (0.1, 0.7, 0.9, 1.0)]
# continued pre-training: 200 more steps from each seed's SILU run (the paper's CPT table)
CPT_BASE = "--max_iters=200 --lr=1e-3 --min_lr=1e-4 --warmup_iters=20 --eval_interval=20"
CPT = [
    ("CPT: SILU (control)", "--act=silu --alpha=0"),
    ("CPT: RELU at once", "--act=relu --alpha=0"),
    ("CPT: Swi+FT (SILU then RELU)", "--act=silu --alpha=0.3"),
    ("CPT: StochA p=0.5 + Swi+FT", "--act=stoch --p=0.5 --alpha=0.3"),
]
# the dying-RELU stress test: shorter runs (400 steps) at 1x the default lr (3e-3), 3x with a short
# (10-step) warmup and 10x, for the recipes whose gradients differ for negative inputs
STRESS_RECIPES = [SCRATCH[1], SCRATCH[0], SCRATCH[3], SCRATCH[4]]
STRESS = [(f"lr x{m}, warmup {w}", f"--max_iters=400 --eval_interval=100 --lr={3e-3 * m:g} --min_lr={3e-4 * m:g} "
           f"--warmup_iters={w}") for m, w in ((1, 100), (3, 10), (10, 100))]
# sparsity along one long run: 10,000 steps = 10.2M tokens, about 5.7 passes over the training text
LONG = [("StochA p=0.5 + Swi+FT, 10.2M tokens", "--act=stoch --p=0.5 --alpha=0.1 --max_iters=10000 "
         "--eval_interval=500 --log_interval=50")]
# the rows of the per-prompt diversity table
PER_PROMPT = ("StochA p=0.5, greedy", "StochA p=0.7, greedy", "greedy", "temperature 0.5", "top-p 0.8")
# diversity: (label, act, p, temperature, top_p); act None = the checkpoint's inference act
SAMPLERS = ([(f"StochA p={p}, greedy", "stoch", p, 0.0, None) for p in (0.3, 0.5, 0.7, 1.0)]
            + [("greedy", None, None, 0.0, None)]
            + [(f"temperature {t}", None, None, t, None) for t in (0.1, 0.2, 0.5, 0.8, 1.0)]
            + [(f"top-p {q}", None, None, 1.0, q) for q in (0.2, 0.5, 0.8, 0.9, 0.95)])


def slug(name):
    return re.sub("-+", "-", "".join(c if c.isalnum() or c in ".=" else "-" for c in name)).strip("-")


def quality_runs(groups=("long", "scratch", "p", "alpha", "stress", "cpt")):
    """Every training run as (group, name, seed, argv, out_dir), in the order they are run; CPT last, as it
    starts from the SILU runs' checkpoints."""
    runs = []

    def add(group, name, flags, seed, sub="quality", extra=()):
        d = os.path.join(out, sub, f"{slug(name)}-s{seed}")
        runs.append((group, name, seed, [config, *flags.split(), *extra, f"--seed={seed}", f"--out_dir={d}"], d))

    table = dict(long=[(n, f, SEEDS[:1]) for n, f in LONG], scratch=[(n, f, SEEDS) for n, f in SCRATCH],
                 p=[(n, f, SEEDS[:2]) for n, f in PS], alpha=[(n, f, SEEDS[:2]) for n, f in ALPHAS])
    for group in groups:
        for name, flags, group_seeds in table.get(group, []):
            for seed in group_seeds:
                add(group, name, flags, seed)
        if group == "stress":
            for setting, sflags in STRESS:
                for name, flags in STRESS_RECIPES:
                    for seed in SEEDS[:2]:
                        add("stress", f"{name}, {setting}", f"{flags} {sflags}", seed, "stress")
    if "cpt" in groups:
        for name, flags in CPT:
            for seed in SEEDS[:2]:
                src = os.path.join(out, "quality", f"{slug(SCRATCH[0][0])}-s{seed}", "ckpt.pt")
                add("cpt", name, f"{CPT_BASE} {flags}", seed, extra=(f"--init_from={src}",))
    return runs


def run_train(run):
    group, name, seed, argv, d = run
    if os.path.exists(os.path.join(d, "summary.json")):
        return f"skip {d} (done)"
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "ckpt.pt")):  # an interrupted run: continue it exactly
        argv = [a for a in argv if not a.startswith("--init_from=")] + ["--init_from=resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1") if jobs > 1 else None
    t0 = time.time()
    with open(os.path.join(d, "stdout.txt"), "a") as f:
        rc = subprocess.run([sys.executable, "train.py", *argv], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"python train.py {' '.join(argv)} failed (exit {rc}); see {d}/stdout.txt")
    s = load_json(os.path.join(d, "summary.json"))
    return f"{d}: val loss {s['val_loss']:.4f}, sparsity {100 * s['sparsity']:.1f}% ({time.time() - t0:.0f} s)"


def train_runs(groups):
    runs = quality_runs(groups)
    first = [r for r in runs if r[0] != "cpt"]  # CPT starts from the SILU runs' checkpoints
    for batch in (first, [r for r in runs if r[0] == "cpt"]):
        with ThreadPoolExecutor(jobs) as pool:
            for msg in pool.map(run_train, batch):
                print(msg, flush=True)


# -----------------------------------------------------------------------------
# evaluating trained checkpoints: the threshold frontier, and unit health for the stress test

# (curve, the quality row it thresholds, the gate): SILU + CATS against the relu models thresholded
FRONTIER = [("SILU + CATS", SCRATCH[0][0], "silu"), ("RELU from scratch + t", SCRATCH[1][0], "relu"),
            ("Swi+FT + t", SCRATCH[2][0], "relu"), ("StochA p=0.5 + Swi+FT + t", SCRATCH[4][0], "relu")]
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)  # FFN sparsity, calibrated on training text
CALIB_BATCHES = 8  # of 8 x 128 tokens from train.bin: 8k tokens (CATS used a few hundred thousand; flat here)
VAL_BATCHES = 40  # the summaries' final evaluation: the same 41k validation tokens
# how each point's thresholds were calibrated (its "calibration"; points without one predate "layer by layer")
CALIBRATIONS = {"layer by layer": "layer by layer, each layer with the thresholds before it in place",
                None: "in one pass with no thresholds in place (the calibration before layer by layer: later layers then "
                      "fall short of the target by up to 2 points; the sparsity shown is the one measured)"}


def _eval_setup(state):
    """The checkpoint's model, its val/train paths, the eval settings and the token byte lengths."""
    from types import SimpleNamespace

    from lib.data import checkpoint_data, token_bytes, tokenizer
    from model import GPT
    model = GPT.from_checkpoint(state).eval()
    folder = checkpoint_data(state, "")
    cfg = SimpleNamespace(batch_size=state["config"]["batch_size"], block_size=state["config"]["block_size"])
    tbytes = torch.from_numpy(token_bytes(tokenizer(state["config"]["vocab"])))
    return model, folder, cfg, tbytes


def _evaluate(model, act, folder, cfg, tbytes, n=VAL_BATCHES):
    from contextlib import nullcontext

    from train import evaluate
    return evaluate(model, act, 0.0, os.path.join(folder, "val.bin"), cfg, "cpu", nullcontext(), n, tbytes)


def save_json(path, obj):
    """Written after every point, atomically: an interrupted stage continues from what it finished."""
    with open(path + ".tmp", "w") as f:
        f.write(strict_json(obj, indent=1))
    os.replace(path + ".tmp", path)


def frontier():
    """Val loss against FFN sparsity: each model at its own sparsity (t = 0), then with per-layer thresholds
    calibrated on training text to each target sparsity above it. Writes out/frontier.json."""
    from model import load_checkpoint
    from train import get_batch
    path = os.path.join(out, "frontier.json")
    points = load_json(path)["points"] if os.path.exists(path) else []
    done = {(p["curve"], p["seed"], p["target"]) for p in points}
    for curve, row, gate in FRONTIER:
        for seed in SEEDS:
            ck = os.path.join(out, "quality", f"{slug(row)}-s{seed}", "ckpt.pt")
            if not os.path.exists(os.path.join(os.path.dirname(ck), "summary.json")) or not os.path.exists(ck):
                print(f"frontier: skip {curve}, seed {seed}: no finished run at {ck}")
                continue
            state = load_checkpoint(ck)
            model, folder, cfg, tbytes = _eval_setup(state)
            model.set_act(gate)
            gen = torch.Generator().manual_seed(4321)  # the same calibration text for every model
            calib = [get_batch(os.path.join(folder, "train.bin"), gen, cfg.batch_size, cfg.block_size, "cpu")[0]
                     for _ in range(CALIB_BATCHES)]
            # the model's own sparsity: targets at or below it need no threshold (also when resumed)
            natural = next((p["sparsity"] for p in points if (p["curve"], p["seed"], p["target"]) == (curve, seed, None)), None)
            for target in (None, *TARGETS):
                if (curve, seed, target) in done or (target is not None and natural is not None and target <= natural):
                    continue
                t0 = time.time()
                ts = model.calibrate_thresholds(calib, target) if target is not None else model.set_thresholds(None) or []
                res = _evaluate(model, gate, folder, cfg, tbytes)
                if target is None:
                    natural = res["sparsity"]
                points.append(dict(curve=curve, seed=seed, target=target, gate=gate, thresholds=ts,
                                   calibration="layer by layer" if target is not None else None, val_loss=res["loss"],
                                   val_bpb=res["bpb"], sparsity=res["sparsity"],
                                   sparsity_per_layer=[l["sparsity"] for l in res["layers"]], ckpt=ck))
                print(f"{curve:28s} seed {seed} target {'own' if target is None else f'{100 * target:.0f}%':>4s}: "
                      f"sparsity {100 * res['sparsity']:5.1f}%, val {res['loss']:.4f} nats = {res['bpb']:.4f} bits/byte "
                      f"({time.time() - t0:.0f} s)", flush=True)
                save_json(path, dict(calib_tokens=CALIB_BATCHES * cfg.batch_size * cfg.block_size,
                                     val_tokens=VAL_BATCHES * cfg.batch_size * cfg.block_size, points=points))


INT8 = [SCRATCH[1][0], SCRATCH[2][0], SCRATCH[4][0]]  # the relu-sparse recipes: what int8 weights do to them


def int8():
    """Val loss and relu sparsity of each relu-sparse model as trained (fp32), with int8 FFN weights, and with
    every linear layer int8 (FFN, attention projections, output layer): per-row symmetric, as the C kernel
    stores them (attach.int8_twin). Writes out/int8.json, after every point."""
    from lib import attach
    from model import load_checkpoint
    path = os.path.join(out, "int8.json")
    points = load_json(path)["points"] if os.path.exists(path) else []
    done = {(p["row"], p["seed"], p["weights"]) for p in points}
    for row in INT8:
        for seed in SEEDS:
            ck = os.path.join(out, "quality", f"{slug(row)}-s{seed}", "ckpt.pt")
            if not os.path.exists(ck) or all((row, seed, w) in done for w in ("fp32", "int8 FFN", "int8 all")):
                continue
            state = load_checkpoint(ck)
            model, folder, cfg, tbytes = _eval_setup(state)
            for weights, m in (("fp32", model), ("int8 FFN", attach.int8_twin(model)),
                               ("int8 all", attach.int8_twin(model, linear=True))):
                if (row, seed, weights) in done:
                    continue
                res = _evaluate(m, "relu", folder, cfg, tbytes)
                points.append(dict(row=row, seed=seed, weights=weights, val_loss=res["loss"], val_bpb=res["bpb"],
                                   sparsity=res["sparsity"], dead=res["dead"], ckpt=ck))
                print(f"{row:28s} seed {seed} {weights:9s}: val {res['loss']:.4f} nats = {res['bpb']:.4f} bits/byte, "
                      f"sparsity {100 * res['sparsity']:.2f}%", flush=True)
                save_json(path, dict(val_tokens=VAL_BATCHES * cfg.batch_size * cfg.block_size, points=points))


COLLAPSED = 0.25  # a W1 row "collapsed": its norm below this fraction of its layer's median row norm


def health():
    """For every stress-test run: dead units per layer with relu at inference (for SILU too: units whose
    W1 x is never positive on validation text), and the fraction of W1 rows whose norm collapsed.
    Writes health.json beside each summary."""
    from model import load_checkpoint
    for group, name, seed, argv, d in quality_runs(("stress",)):
        target, ck = os.path.join(d, "health.json"), os.path.join(d, "ckpt.pt")
        if os.path.exists(target) or not os.path.exists(os.path.join(d, "summary.json")) or not os.path.exists(ck):
            continue
        state = load_checkpoint(ck)
        model, folder, cfg, tbytes = _eval_setup(state)
        res = _evaluate(model, "relu", folder, cfg, tbytes, n=12)
        collapsed = []
        for block in model.blocks:
            norms = block.ffn.w1.weight.detach().norm(dim=1)
            collapsed.append((norms < COLLAPSED * norms.median()).float().mean().item())
        h = dict(relu_dead_per_layer=[l["dead"] for l in res["layers"]], relu_sparsity=res["sparsity"],
                 relu_val_loss=res["loss"], w1_collapsed_per_layer=collapsed, collapsed_rule=COLLAPSED)
        with open(target, "w") as f:
            f.write(strict_json(h, indent=1))
        print(f"{d}: relu dead {100 * np.mean(h['relu_dead_per_layer']):.1f}%, W1 rows collapsed "
              f"{100 * np.mean(collapsed):.1f}%", flush=True)


# -----------------------------------------------------------------------------
# diversity against temperature and top-p, at equal quality


def diversity():
    from lib.checkpoint import load_any
    from lib.data import checkpoint_data
    from model import GPT
    from sample import distinct_n, mean_log_likelihood, self_bleu
    state = load_any(ckpt)
    model = GPT.from_checkpoint(state).eval()
    infer = state["config"].get("eval_act", model.config.act)
    val = np.memmap(os.path.join(checkpoint_data(state, data_dir), "val.bin"), dtype=np.uint16, mode="r")
    starts = np.linspace(0, len(val) - prompt_tokens - 1, n_prompts).astype(np.int64)
    prompts = [torch.from_numpy(val[s:s + prompt_tokens].astype(np.int64)) for s in starts]
    rows = []
    for label, act, p, temperature, top_p in SAMPLERS:
        t0 = time.time()
        per_prompt = []
        for i, prompt in enumerate(prompts):
            act_gen = torch.Generator().manual_seed(1000 + i)  # StochA's draws
            sample_gen = torch.Generator().manual_seed(2000 + i)  # the token sampling
            model.set_act(act or infer, p, generator=act_gen)
            seqs = model.generate(prompt.repeat(num_samples, 1), new_tokens, temperature, None, top_p, sample_gen)
            model.set_act(infer)  # every sample is scored by the same deterministic model
            lls = mean_log_likelihood(model, seqs, prompt_tokens)
            samples = [row[prompt_tokens:] for row in seqs.tolist()]
            per_prompt.append(dict(avg_ll=sum(lls) / len(lls), best_ll=max(lls), distinct_1=distinct_n(samples, 1),
                                   distinct_2=distinct_n(samples, 2), distinct_3=distinct_n(samples, 3),
                                   self_bleu=self_bleu(samples), unique=len(set(map(tuple, samples))) / len(samples)))
        row = dict(label=label, act=act or infer, p=p, temperature=temperature, top_p=top_p,
                   **{k: float(np.mean([r[k] for r in per_prompt])) for k in per_prompt[0]}, per_prompt=per_prompt)
        rows.append(row)
        print(f"{label:24s} log-lik avg {row['avg_ll']:.3f} best {row['best_ll']:.3f} | distinct-2 "
              f"{row['distinct_2']:.3f} self-BLEU {row['self_bleu']:.3f} unique {row['unique']:.2f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    report = dict(ckpt=ckpt, score_act=infer, n_prompts=n_prompts, prompt_tokens=prompt_tokens,
                  num_samples=num_samples, new_tokens=new_tokens, threads=torch.get_num_threads(), rows=rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "diversity.json"), "w") as f:
        f.write(strict_json(report, indent=1))  # self-BLEU is null with num_samples=1
    print(f"wrote {os.path.join(out, 'diversity.json')}")


# -----------------------------------------------------------------------------
# speed: bench.py's own tables, kept as JSON for RESULTS.md and experiments/plot.py


def speed():
    """bench.py --full (every batch, dtype and sparsity, end to end, compiled, llama.cpp) with the checkpoint, the
    plain kernel against the tuned one (batches 1, 4, 16), then the kernel at the frontier's sparsities with each gate."""
    subprocess.run([sys.executable, "build.py"], check=True)
    subprocess.run([sys.executable, "bench.py", "--full", f"--ckpt={ckpt}", *([f"--data_dir={data_dir}"] if data_dir else []),
                    f"--json={os.path.join(out, 'bench.json')}"], check=True)
    subprocess.run([sys.executable, "bench.py", "--batches=1,4,16", "--sparsities=0,50,90", "--e2e=False",
                    f"--json={os.path.join(out, 'bench_plain.json')}"], check=True)  # plain against tuned
    for gate in ("relu", "silu"):
        subprocess.run([sys.executable, "bench.py", "--sizes=2048x8192", "--batches=1", "--e2e=False", "--gather=False",
                        f"--sparsities={','.join(str(round(100 * t)) for t in TARGETS)}", f"--gate={gate}",
                        f"--json={os.path.join(out, f'bench_{gate}.json')}"], check=True)


def decode():
    """bench.py with the checkpoint and llama.cpp (where llama-cpp-python and gguf are installed): the C decode
    engine, dense and sparse, fp32 / bf16 / int8, against PyTorch and llama.cpp on the same weights."""
    subprocess.run([sys.executable, "build.py", "--c"], check=True)
    subprocess.run([sys.executable, "bench.py", f"--ckpt={ckpt}", *([f"--data_dir={data_dir}"] if data_dir else []),
                    "--llama=True", f"--json={os.path.join(out, 'bench_engine.json')}"], check=True)


# -----------------------------------------------------------------------------
# the tables (experiments/results.py prints them from what the stages above wrote)


def configured():
    """This module as configured (run as a script it is __main__): experiments/results.py reads its settings from it."""
    return sys.modules[__name__]


def tables():
    """Every table of RESULTS.md, printed as markdown."""
    print(results.markdown(configured()))


def frontier_table():
    text = results.frontier_table(configured())
    if text:
        print(text)


def write_results():
    """Rewrite the marked tables of RESULTS.md (results_md) from `out`, keeping the prose around them."""
    if not os.path.isfile(results_md):
        raise ConfigError(f"no {results_md}: its prose and table markers are written by hand (see experiments/results.py)")
    with open(results_md) as f:
        text = f.read()
    new = results.fill(text, configured())
    with open(results_md + ".tmp", "w") as f:
        f.write(new)
    os.replace(results_md + ".tmp", results_md)
    print(f"{results_md}: {len(results.MARK.findall(new))} tables from {out}/" + ("" if new != text else " (unchanged)"))


# training stages -> the groups of runs they hold
TRAIN_STAGES = dict(long=("long",), quality=("scratch", "cpt"), alpha=("alpha",), psweep=("p",), stress=("stress",))

RULES = dict(
    out=new_dir, config=existing_file, jobs=positive_int, seeds=int_list(0),  # ckpt: checked below, where a stage needs it
    data_dir=either(one_of(""), existing_dir), n_prompts=positive_int, prompt_tokens=positive_int,
    num_samples=positive_int, new_tokens=positive_int, results_md=new_file,
)


def main(argv):
    global SEEDS
    stages = [a for a in argv if not a.startswith("--")]
    known = dict(frontier=frontier, health=health, int8=int8, diversity=diversity, speed=speed, decode=decode, tables=tables,
                 results=write_results)
    if not stages or set(stages) - set(known) - set(TRAIN_STAGES):
        raise ConfigError(f"usage: python -m experiments.run {{{'|'.join([*TRAIN_STAGES, *known])}}} [--key=value ...]; got {stages}")
    configure(globals(), [a for a in argv if a.startswith("--")], RULES)
    SEEDS = [int(s) for s in seeds.split(",")]
    if {"diversity", "speed", "decode"} & set(stages):  # their checkpoint and its data, before any stage runs
        from lib.checkpoint import load_any
        from lib.data import checkpoint_data
        checkpoint_data(load_any(ckpt), data_dir)
    # the training stages named share one pool, in the order named (e.g. `long` first keeps a slot busy)
    groups = [g for stage in stages for g in TRAIN_STAGES.get(stage, ())]
    if groups:
        train_runs(groups)
    for stage in stages:
        if stage in known:
            known[stage]()


if __name__ == "__main__":
    cli(main)
