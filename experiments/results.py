"""
RESULTS.md's tables, printed from what experiments/run.py's stages wrote into experiments/results/:

    python -m experiments.run results     # rewrites every table of RESULTS.md in place, from experiments/results/
    python -m experiments.run tables      # prints every table, as markdown, to stdout

RESULTS.md is prose written by hand around tables written by this file: each table sits between
`<!-- table: NAME -->` and `<!-- /table -->` lines, and `fill()` replaces what is between them with
TABLES[NAME]'s markdown, so a table cannot drift from the data it was printed from. Each table function
takes `ex`, experiments/run.py as configured (its out folder, config, SEEDS and run lists), and returns
markdown, or None when its stage has not run. The JSON readers (load_json, log_rows) live here too.
"""

import json
import math
import os
import re

import numpy as np

from experiments import results_smol
from experiments.results_speed import decode_table, e2e_table, gates_table, layers_table, plain_table, speed_table
from train import read_log

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


def pm(values, f=".3f", scale=1.0):
    """mean ± half the range over seeds (with 2 seeds: the two values are mean ± that); nan if one is"""
    v = [scale * x for x in values]
    return f"{np.mean(v):{f}} ± {np.ptp(v) / 2:{f.lstrip('+')}}" if len(v) > 1 else f"{v[0]:{f}}"


def seeds_text(seeds):
    return ", ".join(map(str, seeds))


# -----------------------------------------------------------------------------
# the training runs: one entry per row of a table, its seeds' summaries


def quality_rows(ex):
    """Per (group, name): flags, and each seed's summary plus its RELU loss at the switch and at the end."""
    table = {}
    for group, name, seed, argv, d in ex.quality_runs():
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


def p_axis(table):
    """StochA p + Swi+FT along p; p = 0 is RELU from scratch (the same function)."""
    return stoch_axis(table, ("scratch", "p"), dict(alpha=0.1), "p", 0.0)


def switch_gap(runs):
    """What fine-tuning with RELU recovered: the loss with RELU at the last evaluation before the switch, and at
    the end (mean over seeds, on the same few validation batches); '-' for a run with no switch."""
    if runs[0]["relu_at_switch"] is None:
        return "-"
    return f"{np.mean([r['relu_at_switch'] for r in runs]):.3f} -> {np.mean([r['relu_at_end'] for r in runs]):.3f}"


def cost(entries):
    """What a table cost: its runs and their summed wall time (each on 1 thread, 2 at a time here)."""
    runs = [r for e in entries for r in e["runs"]]
    return f"cost: {len(runs)} runs, {sum(r['seconds'] for r in runs) / 3600:.1f} h of single-run wall time"


def layers_cell(runs, key="sparsity_per_layer"):
    """per-layer percentages, mean over the runs"""
    return " / ".join(f"{100 * v:.0f}" for v in np.mean([r[key] for r in runs], axis=0))


QUALITY_HEAD = ("| row | flags | val loss, nats/token (inference act) | bits/byte | vs SILU | inference act | FFN sparsity | "
                "dead units | RELU loss at the switch -> end | wall s | tokens |\n" + "|---" * 11 + "|")


def _quality_group(ex, group, intro):
    table = quality_rows(ex)
    rows = [(name, e) for (g, name), e in table.items() if g == group]
    if not rows:
        return None
    if group == "alpha":  # the whole alpha axis, the rows from scratch included
        rows = [(name, e) for _, name, e in alpha_axis(table)]
    base = table.get(("cpt", ex.CPT[0][0]) if group == "cpt" else ("scratch", ex.SCRATCH[0][0]), dict(runs=[]))
    base = {r["seed"]: r["val_loss"] for r in base["runs"]}
    lines = [f"{intro}; {cost([e for _, e in rows])}.\n", QUALITY_HEAD]
    for name, e in rows:
        runs = e["runs"]
        paired = [r["val_loss"] - base[r["seed"]] for r in runs if r["seed"] in base]
        bpb = [r["val_bpb"] for r in runs if "val_bpb" in r]  # summaries before bits per byte lack it
        lines.append(f"| {name} | `{e['flags']}` | {pm([r['val_loss'] for r in runs])} | {pm(bpb) if bpb else '-'} | "
                     f"{pm(paired, '+.3f') if paired else '-'} | {runs[0]['eval_act']} | "
                     f"{pm([r['sparsity'] for r in runs], '.1f', 100)}% | {pm([r['dead_fraction'] for r in runs], '.1f', 100)}% | "
                     f"{switch_gap(runs)} | {pm([r['seconds'] for r in runs], '.0f')} | {runs[0]['tokens']:,} |")
    return "\n".join(lines)


def quality_table(ex):
    scratch = [e for (g, _), e in quality_rows(ex).items() if g == "scratch"]
    if not scratch:
        return None
    r0 = scratch[0]["runs"][0]
    intro = (f"Each row: `python train.py {ex.config} <flags> --seed=S`, S in {seeds_text(ex.SEEDS)}; "
             f"{r0['params'] / 1e6:.1f}M parameters, {r0['tokens']:,} tokens a run, {r0['device_name']}, {r0['threads']} "
             f"thread(s) per run, {r0['val_tokens']:,} validation tokens per loss. Mean ± half the range over the seeds; "
             "'vs SILU' (nats) pairs each seed with the SILU run of the same seed (the same init and batches)")
    return _quality_group(ex, "scratch", intro)


def alpha_table(ex):
    return _quality_group(ex, "alpha", "StochA p=0.5 from alpha = 0 (StochA only) to 1 (RELU from scratch), seeds "
                          f"{seeds_text(ex.SEEDS[:2])} (the rows from scratch: all seeds)")


def cpt_table(ex):
    silu = os.path.join(ex.out, "quality", f"{ex.slug(ex.SCRATCH[0][0])}-sS", "ckpt.pt")
    return _quality_group(ex, "cpt", f"Continued pre-training: each seed's SILU run, then `--init_from={silu}` "
                          f"(seeds {seeds_text(ex.SEEDS[:2])}); 'vs SILU' pairs each row with the SILU control")


def p_table(ex):
    """Sparsity and loss against p (all + Swi+FT; p = 0 is RELU itself, the same function)."""
    table = quality_rows(ex)
    axis = p_axis(table)
    if len(axis) < 2:
        return None
    silu = {r["seed"]: r["val_loss"] for r in table.get(("scratch", ex.SCRATCH[0][0]), dict(runs=[]))["runs"]}
    lines = ["StochA p + Swi+FT (alpha=0.1), evaluated with RELU; p = 0 is RELU from scratch (StochA with p = 0 is relu "
             f"exactly); 'vs SILU' in nats, paired by seed. Seeds as listed; {cost([e for *_, e in axis])}.\n",
             "| p | row | seeds | val loss, nats | bits/byte | vs SILU | FFN sparsity | per layer, % | dead |\n" + "|---" * 9 + "|"]
    for p, name, e in axis:
        runs = e["runs"]
        paired = [r["val_loss"] - silu[r["seed"]] for r in runs if r["seed"] in silu]
        lines.append(f"| {p} | {name} | {len(runs)} | {pm([r['val_loss'] for r in runs])} | {pm([r['val_bpb'] for r in runs])} | "
                     f"{pm(paired, '+.3f') if paired else '-'} | {pm([r['sparsity'] for r in runs], '.1f', 100)}% | "
                     f"{layers_cell(runs)} | {pm([r['dead_fraction'] for r in runs], '.1f', 100)}% |")
    return "\n".join(lines)


def stress_table(ex):
    rows = [(name, e) for (g, name), e in quality_rows(ex).items() if g == "stress"]
    if not rows:
        return None
    lines = ["400 steps (410k tokens) per run, lr as listed (cosine to lr/10), seeds "
             f"{seeds_text(ex.SEEDS[:2])}. 'dead with RELU': units never positive on 98k validation tokens, for SILU too; "
             f"'W1 rows collapsed': row norm below {ex.COLLAPSED} x its layer's median; {cost([e for _, e in rows])}.\n",
             "| recipe | lr, warmup | val loss, nats (inference act) | bits/byte | vs 1x | inference act | FFN sparsity | "
             "dead with RELU, per layer % | W1 rows collapsed |\n" + "|---" * 9 + "|"]
    base = {}
    for name, e in rows:
        recipe, setting = name.split(", lr ")
        health = [load_json(os.path.join(r["dir"], "health.json")) for r in e["runs"]
                  if os.path.exists(os.path.join(r["dir"], "health.json"))]
        if setting.startswith("x1,"):
            base[recipe] = {r["seed"]: r["val_loss"] for r in e["runs"]}
        paired = [r["val_loss"] - base[recipe][r["seed"]] for r in e["runs"] if r["seed"] in base.get(recipe, {})]
        dead = (f"{pm([np.mean(h['relu_dead_per_layer']) for h in health], '.1f', 100)}% "
                f"({layers_cell(health, 'relu_dead_per_layer')})") if health else "-"
        collapsed = pm([np.mean(h["w1_collapsed_per_layer"]) for h in health], ".1f", 100) + "%" if health else "-"
        lines.append(f"| {recipe} | {setting} | {pm([r['val_loss'] for r in e['runs']])} | {pm([r['val_bpb'] for r in e['runs']])} | "
                     f"{pm(paired, '+.3f') if paired and not setting.startswith('x1,') else '-'} | {e['runs'][0]['eval_act']} | "
                     f"{pm([r['sparsity'] for r in e['runs']], '.1f', 100)}% | {dead} | {collapsed} |")
    return "\n".join(lines)


def long_table(ex):
    e = next((e for (g, _), e in quality_rows(ex).items() if g == "long"), None)
    if e is None:
        return None
    r = e["runs"][0]
    evals = [x for x in log_rows(os.path.join(r["dir"], "log.jsonl")) if x["kind"] == "eval"]
    tok = r["tokens"] / r["iters"]
    lines = [f"`python train.py {ex.config} {e['flags']} --seed={r['seed']}`: {r['tokens'] / 1e6:.1f}M tokens, "
             f"{r['seconds'] / 60:.0f} min on {r['threads']} thread(s). Every evaluation with RELU, on the config's eval_iters "
             f"validation batches (before the switch at step {r['switch_iter']} the model is trained with StochA); the final "
             f"evaluation, on {r['val_tokens']:,} tokens: {r['val_loss']:.3f} nats = {r['val_bpb']:.3f} bits/byte, "
             f"{100 * r['sparsity']:.1f}% sparse (per layer {layers_cell([r])}), {100 * r['dead_fraction']:.1f}% of the units dead.\n",
             "| step | tokens | trained with | val loss with RELU, nats | bits/byte | FFN sparsity |\n" + "|---" * 6 + "|"]
    for x in evals:
        lines.append(f"| {x['iter']} | {x['iter'] * tok / 1e6:.2f}M | {x['act']} | {x['val_loss_infer']:.4f} | "
                     f"{x['val_bpb_infer']:.3f} | {100 * x['sparsity']:.1f}% |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# evaluations of the trained models: thresholds, int8 weights, sampling


def frontier_table(ex):
    path = os.path.join(ex.out, "frontier.json")
    if not os.path.exists(path):
        return None
    rep = load_json(path)
    pts = rep["points"]
    how = {p.get("calibration") for p in pts if p["target"] is not None}
    how = ex.CALIBRATIONS[how.pop()] if len(how) == 1 else "some layer by layer, some in one pass (see frontier.json)"
    lines = [f"Each model at its own sparsity, then with per-layer thresholds calibrated on {rep['calib_tokens']:,} training "
             f"tokens {how}, to each target sparsity; val loss on {rep['val_tokens']:,} validation tokens; mean ± half the "
             "range over the seeds. 'vs SILU' is against the SILU model itself (dense), paired by seed.\n",
             "| curve | target | seeds | FFN sparsity | val loss, nats | bits/byte | vs SILU, bits/byte |\n" + "|---" * 7 + "|"]
    silu = {p["seed"]: p["val_bpb"] for p in pts if p["curve"] == ex.FRONTIER[0][0] and p["target"] is None}
    for curve, _, _ in ex.FRONTIER:
        for target in (None, *ex.TARGETS):
            sel = [p for p in pts if p["curve"] == curve and p["target"] == target]
            if not sel:
                continue
            paired = [p["val_bpb"] - silu[p["seed"]] for p in sel if p["seed"] in silu]
            lines.append(f"| {curve} | {'own' if target is None else f'{100 * target:.0f}%'} | {len(sel)} | "
                         f"{pm([p['sparsity'] for p in sel], '.1f', 100)}% | {pm([p['val_loss'] for p in sel])} | "
                         f"{pm([p['val_bpb'] for p in sel], '.4f')} | {pm(paired, '+.4f') if paired else '-'} |")
    return "\n".join(lines)


def int8_table(ex):
    path = os.path.join(ex.out, "int8.json")
    if not os.path.exists(path):
        return None
    pts = load_json(path)["points"]
    lines = ["`python -m experiments.run int8`: each relu-sparse model as trained (fp32), with int8 FFN weights, and with every "
             "linear layer int8 (per-row symmetric, as the C kernel stores them); RELU at inference; seeds "
             f"{seeds_text(sorted({p['seed'] for p in pts}))}; mean ± half the range; 'vs fp32' paired by seed.\n",
             "| recipe | weights | val loss, nats | bits/byte | vs fp32, nats | FFN sparsity |\n" + "|---" * 6 + "|"]
    for row in ex.INT8:
        base = {p["seed"]: p["val_loss"] for p in pts if p["row"] == row and p["weights"] == "fp32"}
        for w in ("fp32", "int8 FFN", "int8 all"):
            ps = [p for p in pts if p["row"] == row and p["weights"] == w]
            if ps:
                lines.append(f"| {row} | {w} | {pm([p['val_loss'] for p in ps], '.4f')} | {pm([p['val_bpb'] for p in ps], '.4f')} | "
                             f"{pm([p['val_loss'] - base[p['seed']] for p in ps if p['seed'] in base], '+.4f')} | "
                             f"{pm([p['sparsity'] for p in ps], '.2f', 100)}% |")
    return "\n".join(lines)


def at_least(rows, ref, key, families):
    """The most diverse row of these families whose `key` quality is at least ref's, as a table cell."""
    ok = [c for c in rows if c["label"].startswith(families) and c[key] >= ref[key]]
    if not ok:
        return "none as good"
    c = max(ok, key=lambda c: c["distinct_2"])
    return f"{c['label']}: {c['distinct_2']:.3f} / {c['self_bleu']:.3f} ({c[key]:.3f})"


def diversity_table(ex):
    path = os.path.join(ex.out, "diversity.json")
    if not os.path.exists(path):
        return None
    rep = load_json(path)
    lines = [f"{rep['ckpt']}: {rep['n_prompts']} prompts of {rep['prompt_tokens']} validation tokens, {rep['num_samples']} "
             f"samples of {rep['new_tokens']} tokens each; log-likelihood per token under {rep['score_act']}; metrics "
             "averaged over prompts ('unique': the fraction of the samples that differ).\n",
             "| sampling | mean log-lik | best-of-N log-lik | distinct-1 | distinct-2 | self-BLEU-4 | unique |\n" + "|---" * 7 + "|"]
    for r in rep["rows"]:
        lines.append(f"| {r['label']} | {r['avg_ll']:.3f} | {r['best_ll']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                     f"{r['self_bleu']:.3f} | {r['unique']:.2f} |")
    shown = [r for r in rep["rows"] if "per_prompt" in r and r["label"] in ex.PER_PROMPT]
    if shown:  # the mean hides how unevenly StochA's draws diversify: some prompts get 8 samples, some fewer
        lines += [f"\nPer prompt (samples that differ out of {rep['num_samples']}, distinct-2, mean log-lik):\n",
                  "| prompt | " + " | ".join(r["label"] for r in shown) + " |\n" + "|---" * (len(shown) + 1) + "|"]
        for i in range(rep["n_prompts"]):
            lines.append(f"| {i} | " + " | ".join(f"{round(r['per_prompt'][i]['unique'] * rep['num_samples'])}, "
                                                  f"{r['per_prompt'][i]['distinct_2']:.2f}, {r['per_prompt'][i]['avg_ll']:.2f}"
                                                  for r in shown) + " |")
    # The quality of temperature sampling is not monotone in T at this scale (T = 0.2 can beat greedy), so rather
    # than interpolating a curve: the most diverse setting of each family that is at least as good as StochA.
    lines += ["\nAt equal or better quality: for each StochA row, the most diverse (by distinct-2) setting of each "
              "family whose quality is at least StochA's, by mean log-lik and by best-of-N log-lik (cells: distinct-2 / "
              "self-BLEU (log-lik)):\n",
              "| StochA | mean / best-of-N log-lik | its distinct-2 / self-BLEU | temperature, mean >= | top-p, mean >= "
              "| temperature or top-p, best-of-N >= |\n" + "|---" * 6 + "|"]
    for r in rep["rows"]:
        if r["act"] == "stoch":
            cells = [at_least(rep["rows"], r, "avg_ll", ("temperature", "greedy")), at_least(rep["rows"], r, "avg_ll", ("top-p",)),
                     at_least(rep["rows"], r, "best_ll", ("temperature", "greedy", "top-p"))]
            lines.append(f"| p={r['p']} | {r['avg_ll']:.3f} / {r['best_ll']:.3f} | {r['distinct_2']:.3f} / {r['self_bleu']:.3f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# RESULTS.md

# name -> (the heading `python -m experiments.run tables` prints, the table, the stage that writes its data:
# `python -m experiments.<stage>`)
TABLES = {
    "quality": ("Quality at matched compute", quality_table, "run quality"),
    "alpha": ("The switch: alpha", alpha_table, "run alpha"),
    "cpt": ("Continued pre-training", cpt_table, "run quality"),
    "p": ("Sparsity against p", p_table, "run psweep"),
    "stress": ("The dying-RELU stress test", stress_table, "run stress health"),
    "long": ("Sparsity along one long run", long_table, "run long"),
    "frontier": ("Quality against sparsity: retrain, or threshold?", frontier_table, "run frontier"),
    "int8": ("int8 weights", int8_table, "run int8"),
    "diversity": ("Diversity", diversity_table, "run diversity"),
    "speed": ("Speed: the FFN kernels", speed_table, "run speed"),
    "plain": ("Speed: the plain kernel against the tuned one", plain_table, "run speed"),
    "gates": ("Speed: the kernel at the frontier's sparsities, relu and silu gates", gates_table, "run speed"),
    "e2e": ("Speed: end to end", e2e_table, "run speed"),
    "layers": ("Speed: the checkpoint's layers", layers_table, "run speed"),
    "decode": ("Speed: decoding in C, against llama.cpp", decode_table, "run decode"),
    "smol-parity": ("SmolLM2-135M: our import against llama.cpp", results_smol.parity_table, "smollm parity"),
    "smol-cpt": ("SmolLM2-135M: continued pre-training", results_smol.cpt_table, "smollm quality"),
    "smol-decode": ("SmolLM2-135M: decoding in C, against llama.cpp", results_smol.decode_table, "smollm decode"),
    "smol-parts": ("SmolLM2-135M: a decode step part by part", results_smol.parts_table, "smollm decode"),
    "smol-diversity": ("SmolLM2-135M: StochA sampling against temperature and top-p", results_smol.diversity_table,
                       "smollm diversity"),
}
MARK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def markdown(ex):
    """Every table that has data, each under its heading."""
    out = []
    for title, table, _ in TABLES.values():
        text = table(ex)
        if text:
            out.append(f"### {title}\n\n{text}\n")
    return "\n".join(out)


def fill(text, ex):
    """text (RESULTS.md) with every marked table reprinted from ex.out; an unknown name is an error."""
    def table(m):
        name = m.group(2)
        if name not in TABLES:
            raise ValueError(f"RESULTS.md names a table '{name}' that experiments/results.py does not print (known: {', '.join(TABLES)})")
        stage = TABLES[name][2]
        body = TABLES[name][1](ex) or f"(no data yet: run `python -m experiments.{stage}`)"
        return f"{m.group(1)}{body}\n{m.group(4)}"
    return MARK.sub(table, text)
