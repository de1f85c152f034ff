"""
The paper's claims in miniature: reruns every table and figure of the README's Results section.

    python experiments.py long quality psweep stress alpha --jobs=2   # every training run, 2 at a time (~3 h on 2 cores)
    python experiments.py frontier health    # thresholds on the trained models; unit health of the stress runs
    python experiments.py diversity          # StochA sampling vs temperature and top-p, from one checkpoint (3 min)
    python experiments.py speed              # bench.py on set sparsities, the checkpoint, and the frontier's sparsities
    python experiments.py tables             # the README's tables, as markdown, from what the stages wrote
    python plot.py                           # the figures (needs matplotlib), from the same files

Training stages: long (one 10M-token run), quality (the matched-compute rows, 3 seeds, then continued
pre-training), psweep (p), stress (the dying-RELU learning-rate sweep), alpha; those named share one pool.
Every run is `python train.py config/sweep.py <its flags> --seed=S --out_dir=...`; the tables print each
row's flags so any row can be rerun by hand. A run whose summary.json exists is skipped and an interrupted
one resumes exactly from its checkpoint, so a stage continues where it stopped. Flags: --out=results (where
everything goes; summaries and logs are committed, checkpoints not), --config=config/sweep.py, --jobs=1
(runs at a time; with 2, each gets 1 thread), --seeds=1337,1338,1339 (the other sweeps use the first two),
--ckpt=out/ckpt.pt (the diversity and speed checkpoint: the main job's model).
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from configurator import (ConfigError, cli, configure, either, existing_dir, existing_file, int_list, new_dir, one_of,
                          positive_int, strict_json)
from train import read_log

# -----------------------------------------------------------------------------
out = "results"  # summaries and logs are committed; checkpoints (*.pt) are not
config = "config/sweep.py"  # every run's base; on a GPU e.g. config/gpu.py (and --out=results-gpu)
jobs = 1
seeds = "1337,1338,1339"  # the quality rows use all of them, the other sweeps the first two
ckpt = "out/ckpt.pt"
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

    from data import checkpoint_data, token_bytes, tokenizer
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


# numbers a run can leave undefined (a diverged run's losses; self-BLEU of a single sample): written as null
# (strict JSON, see configurator.strict_json), read back as NaN, which averages, compares and prints as nan
UNDEFINED = {"loss", "val_loss", "val_bpb", "val_loss_infer", "val_bpb_infer", "relu_val_loss", "avg_ll", "best_ll",
             "self_bleu"}


def nan_for_null(row):
    return {k: math.nan if v is None and k in UNDEFINED else v for k, v in row.items()}


def load_json(path):
    """A JSON file the project wrote, its undefined numbers as NaN."""
    with open(path) as f:
        return json.load(f, object_hook=nan_for_null)


def log_rows(path):
    """train.py's log.jsonl rows (train.read_log), their undefined numbers as NaN."""
    return [nan_for_null(r) for r in read_log(path)]


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
    stores them (sparse_ffn.int8_twin). Writes out/int8.json, after every point."""
    import sparse_ffn
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
            for weights, m in (("fp32", model), ("int8 FFN", sparse_ffn.int8_twin(model)),
                               ("int8 all", sparse_ffn.int8_twin(model, linear=True))):
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
    from data import checkpoint_data
    from model import GPT, load_checkpoint
    from sample import distinct_n, mean_log_likelihood, self_bleu
    state = load_checkpoint(ckpt)
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
# speed: bench.py's own tables, kept as JSON for the README and plot.py


def speed():
    """bench.py's tables with the checkpoint, then the kernel at the frontier's sparsities with each gate."""
    subprocess.run([sys.executable, "build.py"], check=True)
    subprocess.run([sys.executable, "bench.py", f"--ckpt={ckpt}", *([f"--data_dir={data_dir}"] if data_dir else []),
                    f"--json={os.path.join(out, 'bench.json')}"], check=True)
    for gate in ("relu", "silu"):
        subprocess.run([sys.executable, "bench.py", "--sizes=2048x8192", "--batches=1", "--e2e=False", "--gather=False",
                        f"--sparsities={','.join(str(round(100 * t)) for t in TARGETS)}", f"--gate={gate}",
                        f"--json={os.path.join(out, f'bench_{gate}.json')}"], check=True)


# -----------------------------------------------------------------------------
# the README's tables


def pm(values, f=".3f", scale=1.0):
    """mean ± half the range over seeds (with 2 seeds: the two values are mean ± that); nan if one is"""
    v = [scale * x for x in values]
    return f"{np.mean(v):{f}} ± {np.ptp(v) / 2:{f.lstrip('+')}}" if len(v) > 1 else f"{v[0]:{f}}"


def quality_rows():
    """Per (group, name): flags, and each seed's summary plus its RELU loss at the switch and at the end."""
    table = {}
    for group, name, seed, argv, d in quality_runs():
        path = os.path.join(d, "summary.json")
        if not os.path.exists(path):
            continue
        evals = [r for r in log_rows(os.path.join(d, "log.jsonl")) if r["kind"] == "eval"]
        flags = " ".join(a for a in argv[1:] if not a.startswith(("--seed=", "--out_dir=", "--init_from=")))
        entry = table.setdefault((group, name), dict(flags=flags, runs=[]))
        summary = load_json(path)
        # the loss with RELU when the switch came (before any RELU step) and at the end, on the same few
        # validation batches; continued pre-training with RELU switches a trained SILU model at its step 0
        switch = 0 if summary["act"] == "relu" else summary["switch_iter"]
        at_switch = [r for r in evals if r["iter"] <= switch and r["eval_act"] == "relu"]
        has_switch = at_switch and switch < summary["iters"] and (switch > 0 or group == "cpt")
        entry["runs"].append(dict(summary, seed=seed, dir=d, relu_at_switch=at_switch[-1]["val_loss_infer"] if has_switch else None,
                                  relu_at_end=evals[-1]["val_loss_infer"]))
    return table


def stoch_axis(table, groups, fixed, along, relu_at):
    """StochA rows of these groups with `fixed` settings, and RELU from scratch at `relu_at`, as sorted
    (value of `along`, name, entry)."""
    axis = []
    for (group, name), e in table.items():
        r = e["runs"][0]
        if group in groups and (r["act"] == "stoch" and all(r[k] == v for k, v in fixed.items()) or r["act"] == "relu"):
            axis.append((r[along] if r["act"] == "stoch" else relu_at, name, e))
    return sorted(axis, key=lambda a: a[0])


def alpha_axis(table):
    """StochA p=0.5 from scratch along alpha: 0 = no switch ... 1 = RELU from scratch."""
    return stoch_axis(table, ("scratch", "alpha"), dict(p=0.5), "alpha", 1.0)


def switch_gap(runs):
    """What fine-tuning with RELU recovered: the loss with RELU at the last evaluation before the switch, and at
    the end (mean over seeds, on the same few validation batches); '-' for a run with no switch."""
    if runs[0]["relu_at_switch"] is None:
        return "-"
    return f"{np.mean([r['relu_at_switch'] for r in runs]):.3f} -> {np.mean([r['relu_at_end'] for r in runs]):.3f}"


def at_least(rows, ref, key, families):
    """The most diverse row of these families whose `key` quality is at least ref's, as a table cell."""
    ok = [c for c in rows if c["label"].startswith(families) and c[key] >= ref[key]]
    if not ok:
        return "none as good"
    c = max(ok, key=lambda c: c["distinct_2"])
    return f"{c['label']}: {c['distinct_2']:.3f} / {c['self_bleu']:.3f} ({c[key]:.3f})"


def cost(entries):
    """What a table cost: its runs and their summed wall time (each on 1 thread, 2 at a time here)."""
    runs = [r for e in entries for r in e["runs"]]
    return f"cost: {len(runs)} runs, {sum(r['seconds'] for r in runs) / 3600:.1f} h of single-run wall time"


def layers_cell(runs, key="sparsity_per_layer"):
    """per-layer percentages, mean over the runs"""
    return " / ".join(f"{100 * v:.0f}" for v in np.mean([r[key] for r in runs], axis=0))


def p_axis(table):
    """StochA p + Swi+FT along p; p = 0 is RELU from scratch (the same function)."""
    return stoch_axis(table, ("scratch", "p"), dict(alpha=0.1), "p", 0.0)


def p_table(table):
    """Sparsity and loss against p (all + Swi+FT; p = 0 is RELU itself, the same function)."""
    axis = p_axis(table)
    if len(axis) < 2:
        return
    silu = {r["seed"]: r["val_loss"] for r in table.get(("scratch", SCRATCH[0][0]), dict(runs=[]))["runs"]}
    print("\n### Sparsity against p\n\nStochA p + Swi+FT (alpha=0.1), evaluated with RELU; p = 0 is RELU from "
          f"scratch (StochA with p = 0 is relu exactly). Seeds as listed; {cost([e for *_, e in axis])}.\n")
    print("| p | row | seeds | val loss, nats | bits/byte | vs SILU | FFN sparsity | per layer, % | dead |\n" + "|---" * 9 + "|")
    for p, name, e in axis:
        runs = e["runs"]
        paired = [r["val_loss"] - silu[r["seed"]] for r in runs if r["seed"] in silu]
        print(f"| {p} | {name} | {len(runs)} | {pm([r['val_loss'] for r in runs])} | {pm([r['val_bpb'] for r in runs])} | "
              f"{pm(paired, '+.3f') if paired else '-'} | {pm([r['sparsity'] for r in runs], '.1f', 100)}% | "
              f"{layers_cell(runs)} | {pm([r['dead_fraction'] for r in runs], '.1f', 100)}% |")


def stress_table(table):
    rows = [(name, e) for (g, name), e in table.items() if g == "stress"]
    if not rows:
        return
    print("\n### The dying-RELU stress test\n\n400 steps (410k tokens) per run, lr as listed (cosine to lr/10), "
          f"seeds {', '.join(map(str, SEEDS[:2]))}. 'dead with RELU': units never positive on 98k validation tokens, "
          f"for SILU too; 'W1 rows collapsed': row norm below {COLLAPSED} x its layer's median; {cost([e for _, e in rows])}.\n")
    print("| recipe | lr, warmup | val loss, nats (inference act) | bits/byte | vs 1x | inference act | FFN sparsity | "
          "dead with RELU, per layer % | W1 rows collapsed |\n" + "|---" * 9 + "|")
    base = {}
    for name, e in rows:
        recipe, setting = name.split(", lr ")
        health_ = [load_json(os.path.join(r["dir"], "health.json")) for r in e["runs"]
                   if os.path.exists(os.path.join(r["dir"], "health.json"))]
        losses = [r["val_loss"] for r in e["runs"]]
        if setting.startswith("x1,"):
            base[recipe] = {r["seed"]: r["val_loss"] for r in e["runs"]}
        paired = [r["val_loss"] - base[recipe][r["seed"]] for r in e["runs"] if r["seed"] in base.get(recipe, {})]
        dead = (f"{pm([np.mean(h['relu_dead_per_layer']) for h in health_], '.1f', 100)}% "
                f"({layers_cell(health_, 'relu_dead_per_layer')})") if health_ else "-"
        collapsed = pm([np.mean(h["w1_collapsed_per_layer"]) for h in health_], ".1f", 100) + "%" if health_ else "-"
        print(f"| {recipe} | {setting} | {pm(losses)} | {pm([r['val_bpb'] for r in e['runs']])} | "
              f"{pm(paired, '+.3f') if paired and not setting.startswith('x1,') else '-'} | {e['runs'][0]['eval_act']} | "
              f"{pm([r['sparsity'] for r in e['runs']], '.1f', 100)}% | {dead} | {collapsed} |")


def long_table(table):
    e = next((e for (g, _), e in table.items() if g == "long"), None)
    if e is None:
        return
    r = e["runs"][0]
    evals = [x for x in log_rows(os.path.join(r["dir"], "log.jsonl")) if x["kind"] == "eval"]
    tok = r["tokens"] / r["iters"]
    print(f"\n### Sparsity along one long run\n\n`python train.py {config} {e['flags']} --seed={r['seed']}`: "
          f"{r['tokens'] / 1e6:.1f}M tokens ({r['tokens'] / 1.79e6:.1f} passes over the training text), "
          f"{r['seconds'] / 60:.0f} min. Every evaluation with RELU (before the switch at step {r['switch_iter']} the "
          "model is trained with StochA).\n")
    print("| step | tokens | trained with | val loss with RELU, nats | bits/byte | FFN sparsity | per layer, % |\n" + "|---" * 7 + "|")
    for x in evals:
        per = " / ".join(f"{100 * l:.0f}" for l in x.get("sparsity_per_layer", [])) or "-"
        print(f"| {x['iter']} | {x['iter'] * tok / 1e6:.2f}M | {x['act']} | {x['val_loss_infer']:.4f} | "
              f"{x['val_bpb_infer']:.3f} | {100 * x['sparsity']:.1f}% | {per} |")


def frontier_table():
    path = os.path.join(out, "frontier.json")
    if not os.path.exists(path):
        return
    rep = load_json(path)
    speed = {}  # (gate, sparsity %) -> C kernel speedups over dense, fp32 and bf16, d=2048 h=8192 batch 1
    for gate in ("relu", "silu"):
        bp = os.path.join(out, f"bench_{gate}.json")
        if os.path.exists(bp):
            for r in load_json(bp)["rows"]:
                if r.get("impl") == "C sparse" and r["B"] == 1:
                    speed.setdefault((gate, r["s"]), {})[r["dtype"]] = r["speedup"]
    how = {p.get("calibration") for p in rep["points"] if p["target"] is not None}
    how = CALIBRATIONS[how.pop()] if len(how) == 1 else "some layer by layer, some in one pass (see frontier.json)"
    print(f"\n### Quality against sparsity: retrain, or threshold?\n\nEach model at its own sparsity, then with "
          f"per-layer thresholds calibrated on {rep['calib_tokens']:,} training tokens {how}, to each target sparsity; val loss "
          f"on {rep['val_tokens']:,} validation tokens; mean over the seeds. 'vs SILU' is against the SILU model "
          "itself (dense), paired by seed. Speedup: the C kernel at the target sparsity with that gate, d=2048 h=8192, "
          "batch 1, over PyTorch's dense FFN (fp32 weights / bf16 weights), from bench.py; the figure at the top "
          "interpolates it at each point's measured sparsity.\n")
    print("| curve | target | seeds | FFN sparsity | val loss, nats | bits/byte | vs SILU, bits/byte | FFN speedup fp32 / bf16 |\n"
          + "|---" * 8 + "|")
    pts = rep["points"]
    silu = {p["seed"]: p["val_bpb"] for p in pts if p["curve"] == FRONTIER[0][0] and p["target"] is None}
    for curve, _, gate in FRONTIER:
        for target in (None, *TARGETS):
            sel = [p for p in pts if p["curve"] == curve and p["target"] == target]
            if not sel:
                continue
            paired = [p["val_bpb"] - silu[p["seed"]] for p in sel if p["seed"] in silu]
            sp = speed.get((gate, round(100 * target) if target else None), {})
            sp = f"{sp['float32']:.2f}x / {sp.get('bfloat16', float('nan')):.2f}x" if sp else "-"
            print(f"| {curve} | {'own' if target is None else f'{100 * target:.0f}%'} | {len(sel)} | "
                  f"{pm([p['sparsity'] for p in sel], '.1f', 100)}% | {pm([p['val_loss'] for p in sel])} | "
                  f"{pm([p['val_bpb'] for p in sel], '.4f')} | {pm(paired, '+.4f') if paired else '-'} | {sp} |")


def tables():
    table = quality_rows()
    if table:
        cfg = f"`python train.py {config} <flags> --seed=S`, S in " + ", ".join(map(str, SEEDS))
        print(f"### Quality at matched compute\n\nEach row: {cfg}. Mean ± half the range over the seeds; "
              "'vs SILU' pairs each seed with the SILU run of the same seed (the same init and batches).\n")
        head = ("| row | flags | val loss, nats/token (inference act) | bits/byte | vs SILU | inference act | FFN sparsity | "
                "dead units | RELU loss at the switch -> end | wall s | tokens |")
        silu = os.path.join(out, "quality", f"{slug(SCRATCH[0][0])}-sS", "ckpt.pt")
        for group, title in (("scratch", None), ("alpha", "alpha, from 0 (StochA only) to 1 (RELU from scratch), "
                                                     f"seeds {', '.join(map(str, SEEDS[:2]))}"),
                             ("cpt", f"continued pre-training: each seed's SILU run, then `--init_from={silu}`")):
            rows = [(name, e) for (g, name), e in table.items() if g == group]
            if not rows:
                continue
            if group == "alpha":  # the whole alpha axis, the rows from scratch included
                rows = [(name, e) for _, name, e in alpha_axis(table)]
            print(f"\n{title + ', ' if title else ''}{cost([e for _, e in rows])}:\n")
            print(head + "\n" + "|---" * 11 + "|")
            base = table.get(("cpt", CPT[0][0]) if group == "cpt" else ("scratch", SCRATCH[0][0]), dict(runs=[]))
            base = {r["seed"]: r["val_loss"] for r in base["runs"]}
            for name, e in rows:
                runs = e["runs"]
                paired = [r["val_loss"] - base[r["seed"]] for r in runs if r["seed"] in base]
                bpb = [r["val_bpb"] for r in runs if "val_bpb" in r]  # summaries before bits per byte lack it
                print(f"| {name} | `{e['flags']}` | {pm([r['val_loss'] for r in runs])} | {pm(bpb) if bpb else '-'} | "
                      f"{pm(paired, '+.3f') if paired else '-'} | {runs[0]['eval_act']} | "
                      f"{pm([r['sparsity'] for r in runs], '.1f', 100)}% | {pm([r['dead_fraction'] for r in runs], '.1f', 100)}% | "
                      f"{switch_gap(runs)} | {pm([r['seconds'] for r in runs], '.0f')} | {runs[0]['tokens']:,} |")
        r0 = next(iter(table.values()))["runs"][0]
        print(f"\n{r0['params'] / 1e6:.1f}M parameters; {r0['device_name']}, {r0['threads']} thread(s) per run, "
              f"{r0['val_tokens']:,} validation tokens per loss.")
        p_table(table)
        stress_table(table)
        long_table(table)
    frontier_table()
    path = os.path.join(out, "int8.json")
    if os.path.exists(path):
        pts = load_json(path)["points"]
        print(f"\n### int8 weights\n\n`experiments.py int8`: each relu-sparse model as trained (fp32), with int8 FFN weights, "
              f"and with every linear layer int8 (per-row symmetric, as the C kernel stores them); RELU at inference; "
              f"seeds {', '.join(map(str, SEEDS))}; mean ± half the range; 'vs fp32' paired by seed.\n")
        print("| recipe | weights | val loss, nats | bits/byte | vs fp32, nats | FFN sparsity |\n" + "|---" * 6 + "|")
        for row in INT8:
            base = {p["seed"]: p["val_loss"] for p in pts if p["row"] == row and p["weights"] == "fp32"}
            for w in ("fp32", "int8 FFN", "int8 all"):
                ps = [p for p in pts if p["row"] == row and p["weights"] == w]
                if ps:
                    print(f"| {row} | {w} | {pm([p['val_loss'] for p in ps], '.4f')} | {pm([p['val_bpb'] for p in ps], '.4f')} | "
                          f"{pm([p['val_loss'] - base[p['seed']] for p in ps if p['seed'] in base], '+.4f')} | "
                          f"{pm([p['sparsity'] for p in ps], '.2f', 100)}% |")
    path = os.path.join(out, "diversity.json")
    if os.path.exists(path):
        rep = load_json(path)
        print(f"\n### Diversity\n\n{rep['ckpt']}: {rep['n_prompts']} prompts of {rep['prompt_tokens']} validation "
              f"tokens, {rep['num_samples']} samples of {rep['new_tokens']} tokens each; log-likelihood per token "
              f"under {rep['score_act']}; metrics averaged over prompts.\n")
        print("| sampling | mean log-lik | best-of-N log-lik | distinct-1 | distinct-2 | self-BLEU-4 | unique |\n" + "|---" * 7 + "|")
        for r in rep["rows"]:
            print(f"| {r['label']} | {r['avg_ll']:.3f} | {r['best_ll']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                  f"{r['self_bleu']:.3f} | {r['unique']:.2f} |")
        shown = [r for r in rep["rows"] if "per_prompt" in r and r["label"] in PER_PROMPT]
        if shown:  # the mean hides how unevenly StochA's draws diversify: some prompts get 8 samples, some 1
            print("\nPer prompt (samples that differ out of " f"{rep['num_samples']}, distinct-2, mean log-lik):\n")
            print("| prompt | " + " | ".join(r["label"] for r in shown) + " |\n" + "|---" * (len(shown) + 1) + "|")
            for i in range(rep["n_prompts"]):
                print(f"| {i} | " + " | ".join(f"{round(r['per_prompt'][i]['unique'] * rep['num_samples'])}, "
                                              f"{r['per_prompt'][i]['distinct_2']:.2f}, {r['per_prompt'][i]['avg_ll']:.2f}"
                                              for r in shown) + " |")
        # The quality of temperature sampling is not monotone in T at this scale (T = 0.2 can beat greedy), so rather
        # than interpolating a curve: the most diverse setting of each family that is at least as good as StochA.
        print("\nAt equal or better quality: for each StochA row, the most diverse (by distinct-2) setting of each "
              "family whose quality is at least StochA's, by mean log-lik and by best-of-N log-lik:\n")
        print("| StochA | mean / best-of-N log-lik | its distinct-2 / self-BLEU | temperature, mean >= | top-p, mean >= "
              "| temperature or top-p, best-of-N >= |\n" + "|---" * 6 + "|")
        for r in rep["rows"]:
            if r["act"] == "stoch":
                cells = [at_least(rep["rows"], r, "avg_ll", ("temperature", "greedy")), at_least(rep["rows"], r, "avg_ll", ("top-p",)),
                         at_least(rep["rows"], r, "best_ll", ("temperature", "greedy", "top-p"))]
                print(f"| p={r['p']} | {r['avg_ll']:.3f} / {r['best_ll']:.3f} | {r['distinct_2']:.3f} / {r['self_bleu']:.3f} | "
                      + " | ".join(cells) + " |")
    path = os.path.join(out, "bench.json")
    if os.path.exists(path):
        b = load_json(path)
        rows = b["rows"]
        print(f"\n### Speed\n\nbench.py {' '.join(b['argv'])}: torch {b['torch']}, {b['threads']} threads, {b['cpu']}; "
              f"1 GiB read {b['roof_cpu']['read_GBps']:.1f} GB/s ({b['roof_cpu'].get('read_huge_GBps') or float('nan'):.1f} on huge "
              f"pages), copy {b['roof_cpu']['copy_GBps']:.1f} GB/s; "
              f"other processes {b.get('others_cpu_pct', float('nan')):.0f}% CPU.\n")
        print("Each kernel cell: ms, speedup over torch dense fp32 (its calls alternating with the row's), and GB/s as % "
              "of the roof measured just before the row (a 256 MiB read on huge pages, as the kernels' weights are) / as "
              "% of the 1 GiB read at the start (PyTorch's allocator); 'ideal' = the fp32 speedup at equal GB/s, "
              "3 / (1 + 2(1 - s)).\n")
        dts = [dt for dt in ("float32", "bfloat16", "int8") if any(x.get("dtype") == dt and x.get("impl") == "C sparse" for x in rows)]
        print("| d x h | batch | sparsity | dense ms | " + " | ".join(f"C {dt}" for dt in dts)
              + " | ideal | auto (fp32): path, speedup |\n" + "|---" * (6 + len(dts)) + "|")
        for r in rows:
            if r.get("impl") == "C sparse" and r["dtype"] == "float32":
                key = lambda x: (x["d"], x["h"], x["B"], x["s"])
                dense = next(x for x in rows if x.get("impl") == "torch dense" and (x["d"], x["h"], x["B"]) == (r["d"], r["h"], r["B"]))
                cells = []
                for dt in dts:
                    k = next((x for x in rows if x.get("impl") == "C sparse" and x["dtype"] == dt and key(x) == key(r)), None)
                    pct = k and k.get("gib_pct", 100 * k["GBps"] / b["roof_cpu"]["read_GBps"])
                    cells.append(f"{k['time_ms']:.3f}, {k['speedup']:.2f}x, {k['roof_pct']:.0f}% / {pct:.0f}%" if k else "-")
                auto = next((x for x in rows if x.get("impl", "").startswith("C auto") and key(x) == key(r)), None)
                print(f"| {r['d']}x{r['h']} | {r['B']} | {r['s']:.0f}% | {dense['time_ms']:.3f} | " + " | ".join(cells)
                      + f" | {r['ideal']:.2f}x |" + (f" {auto['impl'][7:]}, {auto['speedup']:.2f}x |" if auto else " - |"))
        e2e = [r for r in rows if r.get("impl", "").startswith("e2e")]
        for model in dict.fromkeys(r["model"] for r in e2e):
            mine = [r for r in e2e if r["model"] == model]
            dense = next((r["tokens_per_s"] for r in mine if r["impl"] == "e2e dense"), None)
            print(f"\nEnd to end, {model}: batch 1, greedy, KV cache, tokens/s over the whole generate() call:\n")
            print("| engine | tokens/s | vs our dense | one step, ms: FFN / projections / attention / output layer / rest |\n"
                  + "|---" * 4 + "|")
            for r in mine:
                if "failed" in r:
                    print(f"| {r['impl'][4:]} | failed ({r['failed']}) | - | - |")
                    continue
                parts = (r.get("breakdown") or {}).get("parts")
                cell = " / ".join(f"{v['ms']:.2f}" for v in parts.values()) if parts else (
                    f"llama.cpp {r['llama_cpp']}; {r['same_tokens']}/{r['n_tokens']} greedy tokens as ours with silu" if "llama_cpp" in r else "-")
                print(f"| {r['impl'][4:]} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense:.2f}x | {cell} |")
        layers = [r for r in rows if r.get("impl") == "ckpt layer"]
        if layers:
            print("\nThe checkpoint's real activations (per layer; batch 1 times on 64 real FFN inputs):\n")
            print("| layer | sparsity | dead | union of 4 tokens | union of 16 | dense ms | C fp32 ms | speedup |\n" + "|---" * 8 + "|")
            for r in layers:
                print(f"| {r['layer']} | {r['s']:.1f}% | {r['dead']:.1f}% | {r['union4']:.1f}% | {r['union16']:.1f}% | "
                      f"{r['dense_ms']:.3f} | {r['sparse_float32_ms']:.3f} | {r['dense_ms'] / r['sparse_float32_ms']:.2f}x |")


# training stages -> the groups of runs they hold
TRAIN_STAGES = dict(long=("long",), quality=("scratch", "cpt"), alpha=("alpha",), psweep=("p",), stress=("stress",))

RULES = dict(
    out=new_dir, config=existing_file, jobs=positive_int, seeds=int_list(0),  # ckpt: checked below, where a stage needs it
    data_dir=either(one_of(""), existing_dir), n_prompts=positive_int, prompt_tokens=positive_int,
    num_samples=positive_int, new_tokens=positive_int,
)


def main(argv):
    global SEEDS
    stages = [a for a in argv if not a.startswith("--")]
    known = dict(frontier=frontier, health=health, int8=int8, diversity=diversity, speed=speed, tables=tables)
    if not stages or set(stages) - set(known) - set(TRAIN_STAGES):
        raise ConfigError(f"usage: python experiments.py {{{'|'.join([*TRAIN_STAGES, *known])}}} [--key=value ...]; got {stages}")
    configure(globals(), [a for a in argv if a.startswith("--")], RULES)
    SEEDS = [int(s) for s in seeds.split(",")]
    if {"diversity", "speed"} & set(stages):  # their checkpoint and its data, before any stage runs
        from data import checkpoint_data
        from model import load_checkpoint
        checkpoint_data(load_checkpoint(ckpt), data_dir)
    # the training stages named share one pool, in the order named (e.g. `long` first keeps a slot busy)
    groups = [g for stage in stages for g in TRAIN_STAGES.get(stage, ())]
    if groups:
        train_runs(groups)
    for stage in stages:
        if stage in known:
            known[stage]()


if __name__ == "__main__":
    cli(main)
