"""
Draws the README's figures from what experiments.py, train.py and bench.py wrote (out-exp/ by default):

    pip install matplotlib      # only this script needs it
    python plot.py              # -> assets/*.png; --out=out-exp --assets=assets

A figure whose inputs are missing is skipped with a note, so it can be run after any stage.
"""

import json
import os
import sys

import numpy as np

from configurator import cli, configure, existing_dir, existing_file, new_dir
from train import read_log

out = "out-exp"
config = "config/sweep.py"  # as experiments.py's --config
assets = "assets"


def load_log(d):
    rows = read_log(os.path.join(d, "log.jsonl"))
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
    table = experiments.quality_rows()
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
    for name, runs in scratch:
        steps, loss = seed_mean([r["dir"] for r in runs], "loss", "train")
        k = 10
        ax.plot(steps[k - 1:], smooth(loss, k), label=name, lw=1.2, color=color(name))
        diff = np.mean([[t["loss"] - base[r["seed"]][t["iter"]] for t in load_log(r["dir"])[0] if t["iter"] >= 200]
                        for r in runs], axis=0)
        zoom.plot(np.arange(200, 200 + len(diff))[2:], smooth(diff, 3), label=name, lw=1.2, color=color(name))
    ft = table.get(("scratch", experiments.SCRATCH[4][0]))  # StochA p=0.5 + Swi+FT
    switch = ft["runs"][0]["switch_iter"] if ft else None
    for a in (ax, zoom):
        if switch:
            a.axvline(switch, color="gray", ls="--", lw=0.8)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax.set_ylim(top=8)
    ax.set_ylabel(f"training loss (mean of {n_seeds} seeds, 10-step moving average)")
    zoom.set_title("steps 200-300" + (f"; the switch to RELU at step {switch} (dashed)" if switch else ""))
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
              for a, _, e in experiments.alpha_axis(table)]  # (alpha, {seed: loss - SILU's})
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
    return json.load(open(path))


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
    rows = [r for r in b["rows"] if r.get("impl") == "C sparse" and r["B"] == 1]
    if not rows:
        print("bench.json has no C sparse rows at batch 1: skipping the speed figure")
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
        sys.exit("plot.py needs matplotlib (pip install matplotlib); nothing else in this project does")
    import experiments
    experiments.out, experiments.config = out, config
    os.makedirs(assets, exist_ok=True)
    quality_figures(plt, experiments)
    diversity_figure(plt)
    speed_figure(plt)


if __name__ == "__main__":
    cli(main)
