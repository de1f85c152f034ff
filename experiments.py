"""
The paper's claims in miniature: reruns every table and figure of the README's Results section.

    python experiments.py quality --jobs=2   # matched compute, alpha, continued pre-training: 26 runs, 39 min on 2 cores
    python experiments.py diversity          # StochA sampling vs temperature and top-p, from one checkpoint (3 min)
    python experiments.py speed              # bench.py on set sparsities and on the checkpoint's real activations (2 min)
    python experiments.py tables             # the README's tables, as markdown, from what the stages wrote
    python plot.py                           # the figures (needs matplotlib), from the same files

Every quality run is `python train.py config/sweep.py <its flags> --seed=S --out_dir=...`; the tables
print each row's flags so any row can be rerun by hand. A run whose summary.json exists is skipped, so
an interrupted stage continues where it stopped. Flags: --out=out-exp (where everything goes),
--config=config/sweep.py (the base of every quality run), --jobs=1 (quality runs at a time; with 2,
each gets 1 thread), --seeds=1337,1338,
--ckpt=out/ckpt.pt (the diversity and speed checkpoint: the main job's model).
"""

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from configurator import (ConfigError, cli, configure, either, existing_dir, existing_file, int_list, new_dir, one_of,
                          positive_int)
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
# the dying-RELU stress test: shorter runs (400 steps) at 1x, 3x and 10x the default lr (3e-3), and 3x
# with a 10-step warmup, for the recipes whose gradients differ for negative inputs
STRESS_RECIPES = [SCRATCH[1], SCRATCH[0], SCRATCH[3], SCRATCH[4]]
STRESS = [(f"lr x{m}, warmup {w}", f"--max_iters=400 --eval_interval=100 --lr={3e-3 * m:g} --min_lr={3e-4 * m:g} "
           f"--warmup_iters={w}") for m, w in ((1, 100), (3, 100), (10, 100), (3, 10))]
# sparsity along one long run: 10,000 steps = 10.2M tokens, about 5.7 passes over the training text
LONG = [("StochA p=0.5 + Swi+FT, 10.2M tokens", "--act=stoch --p=0.5 --alpha=0.1 --max_iters=10000 "
         "--eval_interval=500 --log_interval=50")]
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
    env = dict(os.environ, OMP_NUM_THREADS="1") if jobs > 1 else None
    t0 = time.time()
    with open(os.path.join(d, "stdout.txt"), "w") as f:
        rc = subprocess.run([sys.executable, "train.py", *argv], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"python train.py {' '.join(argv)} failed (exit {rc}); see {d}/stdout.txt")
    s = json.load(open(os.path.join(d, "summary.json")))
    return f"{d}: val loss {s['val_loss']:.4f}, sparsity {100 * s['sparsity']:.1f}% ({time.time() - t0:.0f} s)"


def train_runs(groups):
    runs = quality_runs(groups)
    first = [r for r in runs if r[0] != "cpt"]  # CPT starts from the SILU runs' checkpoints
    for batch in (first, [r for r in runs if r[0] == "cpt"]):
        with ThreadPoolExecutor(jobs) as pool:
            for msg in pool.map(run_train, batch):
                print(msg, flush=True)


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
                   **{k: float(np.mean([r[k] for r in per_prompt])) for k in per_prompt[0]})
        rows.append(row)
        print(f"{label:24s} log-lik avg {row['avg_ll']:.3f} best {row['best_ll']:.3f} | distinct-2 "
              f"{row['distinct_2']:.3f} self-BLEU {row['self_bleu']:.3f} unique {row['unique']:.2f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    report = dict(ckpt=ckpt, score_act=infer, n_prompts=n_prompts, prompt_tokens=prompt_tokens,
                  num_samples=num_samples, new_tokens=new_tokens, threads=torch.get_num_threads(), rows=rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "diversity.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {os.path.join(out, 'diversity.json')}")


# -----------------------------------------------------------------------------
# speed: bench.py's own tables, kept as JSON for the README and plot.py


def speed():
    subprocess.run([sys.executable, "build.py"], check=True)
    subprocess.run([sys.executable, "bench.py", f"--ckpt={ckpt}", *([f"--data_dir={data_dir}"] if data_dir else []),
                    f"--json={os.path.join(out, 'bench.json')}"], check=True)


# -----------------------------------------------------------------------------
# the README's tables


def pm(values, f=".3f", scale=1.0):
    """mean ± half the range over seeds (with 2 seeds: the two values are mean ± that)"""
    v = [scale * x for x in values]
    return f"{np.mean(v):{f}} ± {(max(v) - min(v)) / 2:{f.lstrip('+')}}" if len(v) > 1 else f"{v[0]:{f}}"


def quality_rows():
    """Per (group, name): flags, and each seed's summary plus its RELU loss at the switch and at the end."""
    table = {}
    for group, name, seed, argv, d in quality_runs():
        path = os.path.join(d, "summary.json")
        if not os.path.exists(path):
            continue
        evals = [r for r in read_log(os.path.join(d, "log.jsonl")) if r["kind"] == "eval"]
        flags = " ".join(a for a in argv[1:] if not a.startswith(("--seed=", "--out_dir=", "--init_from=")))
        entry = table.setdefault((group, name), dict(flags=flags, runs=[]))
        summary = json.load(open(path))
        # the loss with RELU when the switch came (before any RELU step) and at the end, on the same few
        # validation batches; continued pre-training with RELU switches a trained SILU model at its step 0
        switch = 0 if summary["act"] == "relu" else summary["switch_iter"]
        at_switch = [r for r in evals if r["iter"] <= switch and r["eval_act"] == "relu"]
        has_switch = at_switch and switch < summary["iters"] and (switch > 0 or group == "cpt")
        entry["runs"].append(dict(summary, seed=seed, dir=d, relu_at_switch=at_switch[-1]["val_loss_infer"] if has_switch else None,
                                  relu_at_end=evals[-1]["val_loss_infer"]))
    return table


def alpha_axis(table):
    """StochA p=0.5 from scratch along alpha, as sorted (alpha, name, entry): 0 = no switch ... 1 = RELU from scratch."""
    axis = []
    for (group, name), e in table.items():
        r = e["runs"][0]
        if group != "cpt" and (r["act"] == "stoch" and r["p"] == 0.5 or r["act"] == "relu"):
            axis.append((r["alpha"] if r["act"] == "stoch" else 1.0, name, e))
    return sorted(axis, key=lambda a: a[0])


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


def tables():
    table = quality_rows()
    if table:
        cfg = f"`python train.py {config} <flags> --seed=S`, S in " + ", ".join(map(str, SEEDS))
        print(f"### Quality at matched compute\n\nEach row: {cfg}. Mean ± half the range over the seeds; "
              "'vs SILU' pairs each seed with the SILU run of the same seed (the same init and batches).\n")
        head = ("| row | flags | val loss, nats/token (inference act) | bits/byte | vs SILU | inference act | FFN sparsity | "
                "dead units | RELU loss at the switch -> end | wall s | tokens |")
        silu = os.path.join(out, "quality", f"{slug(SCRATCH[0][0])}-sS", "ckpt.pt")
        for group, title in (("scratch", None), ("alpha", "alpha, from 0 (StochA only) to 1 (RELU from scratch)"),
                             ("cpt", f"continued pre-training: each seed's SILU run, then `--init_from={silu}`")):
            rows = [(name, e) for (g, name), e in table.items() if g == group]
            if not rows:
                continue
            if group == "alpha":  # the whole alpha axis, the rows from scratch included
                rows = [(name, e) for _, name, e in alpha_axis(table)]
            if title:
                print(f"\n{title}:\n")
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
    path = os.path.join(out, "diversity.json")
    if os.path.exists(path):
        rep = json.load(open(path))
        print(f"\n### Diversity\n\n{rep['ckpt']}: {rep['n_prompts']} prompts of {rep['prompt_tokens']} validation "
              f"tokens, {rep['num_samples']} samples of {rep['new_tokens']} tokens each; log-likelihood per token "
              f"under {rep['score_act']}; metrics averaged over prompts.\n")
        print("| sampling | mean log-lik | best-of-N log-lik | distinct-1 | distinct-2 | self-BLEU-4 | unique |\n" + "|---" * 7 + "|")
        for r in rep["rows"]:
            print(f"| {r['label']} | {r['avg_ll']:.3f} | {r['best_ll']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                  f"{r['self_bleu']:.3f} | {r['unique']:.2f} |")
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
        b = json.load(open(path))
        rows = b["rows"]
        print(f"\n### Speed\n\nbench.py {' '.join(b['argv'])}: torch {b['torch']}, {b['threads']} threads, {b['cpu']}; "
              f"1 GiB read {b['roof_cpu']['read_GBps']:.1f} GB/s, copy {b['roof_cpu']['copy_GBps']:.1f} GB/s; "
              f"other processes {b.get('others_cpu_pct', float('nan')):.0f}% CPU.\n")
        print("| d x h | batch | sparsity | dense ms | C fp32 ms | GB/s (roof) | speedup | ideal | C bf16 ms | speedup |\n" + "|---" * 10 + "|")
        for r in rows:
            if r.get("impl") == "C sparse" and r["dtype"] == "float32":
                dense = next(x for x in rows if x.get("impl") == "torch dense" and (x["d"], x["h"], x["B"]) == (r["d"], r["h"], r["B"]))
                bf = next((x for x in rows if x.get("impl") == "C sparse" and x["dtype"] == "bfloat16"
                           and (x["d"], x["h"], x["B"], x["s"]) == (r["d"], r["h"], r["B"], r["s"])), None)
                print(f"| {r['d']}x{r['h']} | {r['B']} | {r['s']:.0f}% | {dense['time_ms']:.3f} | {r['time_ms']:.3f} | "
                      f"{r['GBps']:.1f} ({r['roof_GBps']:.1f}) | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                      + (f"{bf['time_ms']:.3f} | {bf['speedup']:.2f}x |" if bf else "- | - |"))
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
    known = dict(diversity=diversity, speed=speed, tables=tables)
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
