"""
Draws the figures of README.md and RESULTS.md from what experiments/run.py, train.py and bench.py wrote (experiments/results/
by default):

    pip install matplotlib      # only this script needs it
    python -m experiments.plot     # -> experiments/assets/*.png; --out=experiments/results --assets=experiments/assets

A figure whose inputs are missing is skipped with a note, so it can be run after any stage.
"""

import os
import sys

import numpy as np

from lib.configurator import cli, configure, existing_dir, existing_file, new_dir
from experiments import results
from experiments.results import load_json, log_rows

out = "experiments/results"
config = "config/sweep.py"  # as experiments/run.py's --config
assets = "experiments/assets"
TUNED = ("C tuned",)  # bench.py's rows of the tuned C kernel


def load_log(d):
    rows = log_rows(os.path.join(d, "log.jsonl"))
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def smooth(y, k):
    """moving average over k steps (the per-step loss of a 1k-token batch is noisy)"""
    y = np.asarray(y, dtype=float)
    return np.convolve(y, np.ones(k) / k, mode="valid") if len(y) >= k else y


def seed_mean(runs, key, kind):
    """the mean over seeds of one logged quantity, on the steps every seed logged"""
    logs = [load_log(d)[0 if kind == "train" else 1] for d in runs]
    steps = sorted(set.intersection(*[{r["iter"] for r in log} for log in logs]))
    return np.array(steps), np.mean([[{r["iter"]: r[key] for r in log}[s] for s in steps] for log in logs], axis=0)


def quality_figures(plt, experiments):
    table = results.quality_rows(experiments)
    scratch = [(name, table[("scratch", name)]["runs"]) for name, _ in experiments.SCRATCH if ("scratch", name) in table]
    if not scratch or scratch[0][0] != experiments.SCRATCH[0][0]:  # every figure here is drawn against SILU
        print("no SILU runs yet: skipping the loss, sparsity and alpha figures")
        return
    names = [name for name, _ in experiments.SCRATCH]
    color = lambda name: f"C{names.index(name)}"  # one colour per recipe in every figure
    n_seeds = len(scratch[0][1])
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    # every row of one seed sees the same init and the same batches (train.py seeds its data order
    # apart from StochA's draws), so a row's loss minus SILU's cancels the batch-to-batch noise
    base = {r["seed"]: {t["iter"]: t["loss"] for t in load_log(r["dir"])[0]} for r in scratch[0][1]}
    z0 = int(0.7 * scratch[0][1][0]["iters"])  # the zoom: the last 30% of the steps, around the switch
    for name, runs in scratch:
        steps, loss = seed_mean([r["dir"] for r in runs], "loss", "train")
        k = 5
        ax.plot(steps[k - 1:], smooth(loss, k), label=name, lw=1.2, color=color(name))
        zs = [i for i in steps if i >= z0]
        diff = np.mean([[{t["iter"]: t["loss"] for t in load_log(r["dir"])[0]}[i] - base[r["seed"]][i] for i in zs]
                        for r in runs], axis=0)
        zoom.plot(zs[2:], smooth(diff, 3), label=name, lw=1.2, color=color(name))
    ft = table.get(("scratch", experiments.SCRATCH[4][0]))  # StochA p=0.5 + Swi+FT
    switch = ft["runs"][0]["switch_iter"] if ft else None
    for a in (ax, zoom):
        if switch:
            a.axvline(switch, color="gray", ls="--", lw=0.8)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax.set_ylim(top=8)
    ax.set_ylabel(f"training loss (mean of {n_seeds} seeds, moving average of 5 logged steps)")
    zoom.set_title(f"steps {z0}-{scratch[0][1][0]['iters']}" + (f"; the switch to RELU at step {switch} (dashed)" if switch else ""))
    zoom.set_ylabel("loss minus SILU's on the same batches")
    ax.legend(fontsize=8)
    s0 = scratch[0][1][0]
    ax.set_title(f"Training loss: {experiments.config}, {s0['params'] / 1e6:.1f}M parameters, {s0['device_name']}")
    save(plt, fig, "loss_curves.png")

    if len(scratch) < 2:
        print("only SILU has run: skipping the sparsity and alpha figures")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in scratch[1:]:  # not SILU itself: evaluated with SILU, its hidden vector has no zeros
        steps, s = seed_mean([r["dir"] for r in runs], "sparsity", "eval")
        ax.plot(steps, 100 * s, marker="o", ms=3, label=name, color=color(name))
    ax.set_xlabel("step")
    ax.set_ylabel(f"RELU sparsity of the FFN hidden units, % (mean of {n_seeds} seeds)")
    ax.set_title("Sparsity with RELU at inference, along training\n(before its switch, Swi+FT's line is the SILU "
                 "model's sparsity with RELU)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(plt, fig, "sparsity.png")

    # the alpha axis of StochA p=0.5, from 0 (no switch) to 1 (RELU from scratch), as each seed's loss minus
    # the SILU run of the same seed: the seeds differ by more than the alphas do, and pairing removes that
    silu = {r["seed"]: r["val_loss"] for r in scratch[0][1]}
    points = [(a, {r["seed"]: r["val_loss"] - silu[r["seed"]] for r in e["runs"] if r["seed"] in silu})
              for a, _, e in results.alpha_axis(table)]  # (alpha, {seed: loss - SILU's})
    if len(points) > 2:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        a = [p[0] for p in points]
        for i, seed in enumerate(sorted(silu)):
            ax.plot(a, [p[1].get(seed, np.nan) for p in points], "o:", color=f"C{i + 1}", alpha=0.7, label=f"seed {seed}")
        ax.plot(a, [np.mean(list(p[1].values())) for p in points], "s-", color="C0", label="mean")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("alpha (fraction of the steps trained with RELU; 0 = StochA only, 1 = RELU from scratch)")
        ax.set_ylabel("validation loss with RELU minus SILU's (same seed)")
        ax.set_title("StochA p=0.5 + Swi+FT: sensitivity to alpha")
        ax.grid(alpha=0.3)
        ax.legend()
        save(plt, fig, "alpha.png")


def read_json(name, figure):
    """A stage's JSON from out/, or None (and a note) when that stage has not run yet."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"no {path}: skipping {figure}")
        return None
    return load_json(path)


def diversity_figure(plt):
    rep = read_json("diversity.json", "the diversity figure")
    if rep is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # (name, rows, label, style, the parameter that orders each curve: quality is not monotone in it here)
    families = [("StochA, greedy", lambda r: r["act"] == "stoch", lambda r: f"p={r['p']}", "o-", "p"),
                ("temperature (from greedy)", lambda r: r["label"].startswith(("temperature", "greedy")),
                 lambda r: f"T={r['temperature']}" if r["temperature"] else "", "s-", "temperature"),
                ("top-p (T=1)", lambda r: r["label"].startswith("top-p"), lambda r: f"{r['top_p']}", "^-", "top_p"),
                ("greedy", lambda r: r["label"] == "greedy", lambda r: "", "k*", "temperature")]
    for ax, key, label in ((axes[0], "distinct_2", "distinct-2 (higher = more diverse)"),
                           (axes[1], "self_bleu", "self-BLEU-4 (lower = more diverse)")):
        for fam, pick, tag, style, order in families:
            rows = sorted((r for r in rep["rows"] if pick(r)), key=lambda r: r[order])
            ax.plot([r["avg_ll"] for r in rows], [r[key] for r in rows], style, label=fam, ms=6)
            for r in rows:
                ax.annotate(tag(r), (r["avg_ll"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"mean log-likelihood per token under {rep['score_act']} (higher = better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Diversity against quality: {rep['n_prompts']} prompts x {rep['num_samples']} samples of "
                 f"{rep['new_tokens']} tokens, {rep['ckpt']}", fontsize=10)
    save(plt, fig, "diversity.png")


def speed_figure(plt):
    b = read_json("bench.json", "the speed figure")
    if b is None:
        return
    rows = [r for r in b["rows"] if r.get("impl") in TUNED and r["B"] == 1]
    if not rows:
        print("bench.json has no tuned C kernel rows at batch 1: skipping the speed figure")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    s = np.linspace(0, 1, 101)
    ax.plot(100 * s, 3 / (1 + 2 * (1 - s)), "k--", label="ideal 3/(1+2(1-s)) (equal bandwidth)")
    ax.plot(100 * s, 6 / (1 + 2 * (1 - s)), "k:", label="ideal with 16-bit weights (half the bytes)")
    for (d, h, dt), style in zip(sorted({(r["d"], r["h"], r["dtype"]) for r in rows}), ("o-", "s-", "^-", "v-")):
        sel = sorted((r for r in rows if (r["d"], r["h"], r["dtype"]) == (d, h, dt)), key=lambda r: r["s"])
        ax.plot([r["s"] for r in sel], [r["speedup"] for r in sel], style, label=f"C sparse, {dt} weights, d={d} h={h}")
    layers = [r for r in b["rows"] if r.get("impl") == "ckpt layer"]
    if layers:  # the trained checkpoint's own layers, on real tokens: its sparsity, not a set one
        ax.plot([r["s"] for r in layers], [r["dense_ms"] / r["sparse_float32_ms"] for r in layers], "kD", ms=6,
                mfc="none", label="C sparse fp32, the trained checkpoint's layers on real tokens")
    ax.set_xlabel("sparsity of the FFN hidden vector, %")
    ax.set_ylabel("speedup over PyTorch's dense fp32 FFN (batch 1)")
    ax.set_title(f"Sparse FFN on the CPU ({b['threads']} threads, {b['cpu']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(plt, fig, "speedup.png")


def frontier_figure(plt, experiments):
    """The practitioner's question: bits per byte against FFN sparsity, and against the FFN speedup measured
    at that sparsity, for SILU + CATS and the RELU-trained models thresholded."""
    rep = read_json("frontier.json", "the frontier figure")
    if rep is None:
        return
    speed, cpu = {}, ""
    for gate in ("relu", "silu"):
        path = os.path.join(out, f"bench_{gate}.json")
        if os.path.exists(path):
            b = load_json(path)
            sel = sorted((r["s"], r["speedup"]) for r in b["rows"]
                         if r.get("impl") in TUNED and r["B"] == 1 and r["dtype"] == "float32")
            speed[gate], cpu = np.array([(0.0, 1.0)] + sel).T, b["cpu"]  # 0%: the dense FFN itself
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(12 if speed else 7, 4.8), squeeze=False)
    # each point minus the SILU model of the same seed (same init and data): the seeds differ by more
    # than the recipes do, and pairing removes that
    silu = {p["seed"]: p["val_bpb"] for p in rep["points"] if p["curve"] == experiments.FRONTIER[0][0] and p["target"] is None}
    for i, (curve, _, gate) in enumerate(experiments.FRONTIER):
        groups = {}
        for p in rep["points"]:
            if p["curve"] == curve and p["seed"] in silu:
                groups.setdefault(p["target"], []).append((p["sparsity"], p["val_bpb"] - silu[p["seed"]]))
        pts = sorted(((np.mean([a for a, _ in g]), np.mean([b for _, b in g]),
                       (max(b for _, b in g) - min(b for _, b in g)) / 2) for g in groups.values()))
        if not pts:
            continue
        x, y, err = (np.array(v) for v in zip(*pts))
        axes[0][0].errorbar(100 * x, y, yerr=err, fmt="o-", ms=4, capsize=2, color=f"C{i}", label=curve)
        if gate in speed:  # the speedup the C kernel measured at each point's sparsity (interpolated)
            axes[0][1].plot(np.interp(100 * x, *speed[gate]), y, "o-", ms=4, color=f"C{i}", label=curve)
    for ax in axes[0]:
        ax.axhline(0, color="gray", ls="--", lw=0.8, label="SILU, dense")
        ax.set_ylabel("val bits per byte minus SILU's, same seed (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_xlabel("FFN sparsity at inference, % (thresholds calibrated on training text)")
    axes[0][0].set_title(f"Retrain or threshold? mean over {len(silu)} seeds, bars: half the range", fontsize=10)
    if speed:
        axes[0][1].set_xlabel(f"C kernel FFN speedup at that sparsity (fp32, 2048x8192, batch 1; {cpu})")
        axes[0][1].set_title("The same points against measured speed", fontsize=10)
    save(plt, fig, "frontier.png")


def science_figures(plt, experiments):
    """Sparsity against p, and along the long run."""
    table = results.quality_rows(experiments)
    axis = results.p_axis(table)
    if len(axis) > 2:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ps = [a[0] for a in axis]
        sp = [100 * np.mean([r["sparsity"] for r in e["runs"]]) for _, _, e in axis]
        bpb = [np.mean([r["val_bpb"] for r in e["runs"]]) for _, _, e in axis]
        ax.plot(ps, sp, "o-", color="C0")
        ax.set_xlabel("p (StochA: probability of silu for a negative input; p = 0 is RELU)")
        ax.set_ylabel("FFN sparsity with RELU at inference, %", color="C0")
        ax2 = ax.twinx()
        ax2.plot(ps, bpb, "s--", color="C3")
        ax2.set_ylabel("validation bits per byte", color="C3")
        ax.set_title("StochA p + Swi+FT: sparsity and quality against p (mean of the seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        save(plt, fig, "p_sweep.png")
    long = next((e for (g, _), e in table.items() if g == "long"), None)
    if long:
        r = long["runs"][0]
        evals = load_log(r["dir"])[1]
        tok = r["tokens"] / r["iters"] / 1e6
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot([e["iter"] * tok for e in evals], [100 * e["sparsity"] for e in evals], "o-", color="C0")
        ax.set_xlabel("training tokens, millions")
        ax.set_ylabel("FFN sparsity with RELU at inference, %", color="C0")
        ax2 = ax.twinx()
        ax2.plot([e["iter"] * tok for e in evals], [e["val_bpb_infer"] for e in evals], "s--", color="C3")
        ax2.set_ylabel("validation bits per byte with RELU", color="C3")
        ax.axvline(r["switch_iter"] * tok, color="gray", ls="--", lw=0.8)
        ax.set_title("One long run of StochA p=0.5 + Swi+FT (switch to RELU dashed)", fontsize=10)
        ax.grid(alpha=0.3)
        save(plt, fig, "sparsity_long.png")


def save(plt, fig, name):
    fig.tight_layout()
    path = os.path.join(assets, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv):
    configure(globals(), argv, dict(out=existing_dir, config=existing_file, assets=new_dir))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("experiments/plot.py needs matplotlib (pip install matplotlib); nothing else in this project does")
    from experiments import run as experiments
    saved = experiments.out, experiments.config  # run.py's settings, lent to the tables' readers and given back
    experiments.out, experiments.config = out, config
    try:
        os.makedirs(assets, exist_ok=True)
        quality_figures(plt, experiments)
        science_figures(plt, experiments)
        frontier_figure(plt, experiments)
        diversity_figure(plt)
        speed_figure(plt)
    finally:
        experiments.out, experiments.config = saved


if __name__ == "__main__":
    cli(main)
