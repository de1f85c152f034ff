"""
The paper's claims in miniature: reruns every table and figure of the README's Results section.

    python experiments.py quality        # matched-compute sweep, alpha sweep, continued pre-training (~35 min, 2 cores)
    python experiments.py diversity      # StochA sampling vs temperature and top-p, from one checkpoint (~5 min)
    python experiments.py speed          # bench.py on set sparsities and on the checkpoint's real activations
    python experiments.py tables         # the README's tables, as markdown, from what the stages wrote
    python plot.py                       # the figures (needs matplotlib), from the same files

Every quality run is `python train.py config/sweep.py <its flags> --seed=S --out_dir=...`; the tables
print each row's flags so any row can be rerun by hand. A run whose summary.json exists is skipped, so
an interrupted stage continues where it stopped. Flags: --out=out-exp (where everything goes),
--jobs=1 (quality runs at a time; with 2, each gets 1 thread), --seeds=1337,1338,
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

# -----------------------------------------------------------------------------
out = "out-exp"
jobs = 1
seeds = "1337,1338"
ckpt = "out/ckpt.pt"
data_dir = "data/shakespeare"
# diversity: N samples of new_tokens after each of n_prompts prompts of prompt_tokens from val.bin
n_prompts = 8
prompt_tokens = 32
num_samples = 8
new_tokens = 48
# -----------------------------------------------------------------------------

# (name, flags) of the matched-compute rows: same model, data, steps and seeds (config/sweep.py)
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
# continued pre-training: 100 more steps from each seed's SILU run (the paper's CPT table)
CPT_BASE = "--max_iters=100 --lr=5e-4 --min_lr=5e-5 --warmup_iters=10 --eval_interval=10"
CPT = [
    ("CPT: SILU (control)", "--act=silu --alpha=0"),
    ("CPT: RELU at once", "--act=relu --alpha=0"),
    ("CPT: Swi+FT (SILU then RELU)", "--act=silu --alpha=0.3"),
    ("CPT: StochA p=0.5 + Swi+FT", "--act=stoch --p=0.5 --alpha=0.3"),
]
# diversity: (label, act, p, temperature, top_p); act None = the checkpoint's inference act
SAMPLERS = ([(f"StochA p={p}, greedy", "stoch", p, 0.0, None) for p in (0.3, 0.5, 0.7, 1.0)]
            + [("greedy", None, None, 0.0, None)]
            + [(f"temperature {t}", None, None, t, None) for t in (0.1, 0.2, 0.5, 0.8, 1.0)]
            + [(f"top-p {q}", None, None, 1.0, q) for q in (0.2, 0.5, 0.8, 0.9, 0.95)])


def slug(name):
    return re.sub("-+", "-", "".join(c if c.isalnum() or c in ".=" else "-" for c in name)).strip("-")


def quality_runs():
    """Every quality run as (group, name, seed, argv, out_dir), in an order that respects CPT's inputs."""
    runs = []
    for group, rows in (("scratch", SCRATCH), ("alpha", ALPHAS)):
        for name, flags in rows:
            for seed in SEEDS:
                d = os.path.join(out, "quality", f"{slug(name)}-s{seed}")
                runs.append((group, name, seed, ["config/sweep.py", *flags.split(), f"--seed={seed}", f"--out_dir={d}"], d))
    for name, flags in CPT:
        for seed in SEEDS:
            src = os.path.join(out, "quality", f"{slug(SCRATCH[0][0])}-s{seed}", "ckpt.pt")
            d = os.path.join(out, "quality", f"{slug(name)}-s{seed}")
            runs.append(("cpt", name, seed, ["config/sweep.py", *CPT_BASE.split(), *flags.split(), f"--init_from={src}",
                                              f"--seed={seed}", f"--out_dir={d}"], d))
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


def quality():
    runs = quality_runs()
    first = [r for r in runs if r[0] != "cpt"]  # CPT starts from the SILU runs' checkpoints
    for batch in (first, [r for r in runs if r[0] == "cpt"]):
        with ThreadPoolExecutor(jobs) as pool:
            for msg in pool.map(run_train, batch):
                print(msg, flush=True)


# -----------------------------------------------------------------------------
# diversity against temperature and top-p, at equal quality


def diversity():
    from model import GPT, load_checkpoint
    from sample import distinct_n, mean_log_likelihood, self_bleu
    state = load_checkpoint(ckpt)
    model = GPT.from_checkpoint(state).eval()
    infer = state["config"].get("eval_act", model.config.act)
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
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
    for name, extra in (("bench.json", []), ("bench_ckpt.json", [f"--ckpt={ckpt}", f"--data_dir={data_dir}", "--e2e=False",
                                                                 "--sizes=2048x8192", "--batches=1"])):
        path = os.path.join(out, name)
        subprocess.run([sys.executable, "bench.py", f"--json={path}", *extra], check=True)


if __name__ == "__main__":
    from configurator import configure
    args = [a for a in sys.argv[1:] if a.startswith("--")]
    stages = [a for a in sys.argv[1:] if not a.startswith("--")]
    configure(globals(), args)
    SEEDS = [int(s) for s in seeds.split(",")]
    known = dict(quality=quality, diversity=diversity, speed=speed)
    if not stages or set(stages) - set(known) - {"tables"}:
        sys.exit(f"usage: python experiments.py {{{'|'.join(list(known) + ['tables'])}}} [--key=value ...]")
    for stage in stages:
        if stage == "tables":
            import tables
            tables.main(out)
        else:
            known[stage]()
