"""
RESULTS.md's tables for SmolLM2-135M (experiments/smollm.py's stages), printed from their JSON in experiments/results/ (experiments/results.py
registers them). Each takes `ex`, experiments/run.py as configured, and returns markdown, or None when its stage has
not run.
"""

import math
import os

from experiments.results_speed import _bench as _load  # a JSON file in ex.out, or None

RUN_SLUGS = ("swift", "stocha", "silu")  # experiments/smollm.py's RUNS, as experiments/results/smol/<slug>/summary.json


def parity_table(ex):
    p = _load(ex, "smol_parity.json")
    if p is None:
        return None
    return (f"`python -m experiments.smollm parity`: {p['file']} read by lib/gguf_io.py (dequantized to fp32, model.py) and by llama.cpp "
            f"(llama-cpp-python), {p['threads']} threads.\n\n"
            "| what | ours | llama.cpp | agreement |\n|---|---|---|---|\n"
            f"| token ids of {p['texts']} texts (prose, code, digits, whitespace runs, 5 scripts, emoji, special tokens; "
            f"{p['tokens_compared']} tokens) | | | {p['texts_identical']} of {p['texts']} identical |\n"
            f"| next token over {p['tokens']} tokens of Shakespeare (val) | | | {100 * p['agree']:.1f}% the same, "
            f"mean KL(llama.cpp ‖ ours) {p['kl']:.4f} nats, largest logit gap {p['max_abs_logit_diff']:.2f} |\n"
            f"| loss on those tokens, nats/token | {p['loss_ours']:.3f} | {p['loss_llama']:.3f} | |")


def _layers(v):
    return " ".join(f"{100 * x:.0f}" for x in v)


def cpt_table(ex):
    q = _load(ex, "smol_cpt.json")
    if q is None:
        return None
    base = q["original"][0]
    lines = [f"Validation: the same {q['eval_tokens']:,} tokens of Shakespeare (24 batches of 4 x 256) for every row; "
             f"CATS thresholds calibrated on {q['calibration_tokens']:,} training tokens. Δ = bits/byte minus the "
             "original SILU model's (lower is better). Per-layer sparsity: % of zero FFN units in layers 0..29.\n",
             "| model | training | val nats/token | val bits/byte | Δ bits/byte | FFN sparsity | dead units | "
             "per layer (%) |\n|---|---|---|---|---|---|---|---|"]
    for r in q["original"]:
        lines.append(f"| {r['name']} | none | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['val_bpb'] - base['val_bpb']:+.4f} "
                     f"| {100 * r['sparsity']:.1f}% | {100 * r['dead_fraction']:.1f}% | {_layers(r['sparsity_per_layer'])} |")
    runs = [_load(ex, os.path.join("smol", slug, "summary.json")) for slug in RUN_SLUGS]
    for r in [r for r in runs if r]:
        how = (f"{r['iters']} steps, {r['tokens']:,} tokens, `{r['flags']}`; switch at {r['switch_iter']}"
               if r["alpha"] > 0 else f"{r['iters']} steps, {r['tokens']:,} tokens, `{r['flags']}`")
        lines.append(f"| {r['name']} ({r['eval_act']} at inference) | {how} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
                     f"{r['val_bpb'] - base['val_bpb']:+.4f} | {100 * r['sparsity']:.1f}% | {100 * r['dead_fraction']:.1f}% "
                     f"| {_layers(r['sparsity_per_layer'])} |")
    t = _load(ex, "smol_throughput.json")
    if t:
        lines.append(f"\nA training step of {t['tokens_per_step']:,} tokens (eager fp32, AdamW, {t['threads']} threads), "
                     f"measured alone by `python -m experiments.smollm throughput`: {t['tok_per_s']['silu']:.0f} tokens/s with silu, "
                     f"{t['tok_per_s']['relu']:.0f} with relu; MFU {100 * t['mfu']['silu']:.0f}% / {100 * t['mfu']['relu']:.0f}% "
                     f"of the {t['matmul_GFLOPs']:.0f} GFLOP/s torch's own fp32 GEMM reaches here "
                     f"({t['flops_per_token'] / 1e9:.2f} GFLOP per token).")
    return "\n".join(lines)


def _e2e(rows, impl):
    return next((r for r in rows if r.get("impl") == impl and "tokens_per_s" in r), None)


def decode_table(ex):
    runs = [(name, _load(ex, f"smol_decode_{name}.json")) for name in ("stocha", "cats")]
    runs = [(n, b) for n, b in runs if b]
    if not runs:
        return None
    b0 = runs[0][1]
    lines = [f"`python -m experiments.smollm decode` (bench.py): torch {b0['torch']}, {b0['threads']} threads, {b0['cpu']}; a 1 GiB read "
             f"{b0['roof_cpu']['read_GBps']:.1f} GB/s. Batch 1, greedy, a 16-token prompt of Shakespeare + 32 new tokens; "
             "tokens/s over the whole generate() call (median of >= 1 s of runs). Bytes: what one step must read (the "
             "weights of every part, the FFN's at its sparsity; the KV cache), and the GB/s that time reached. "
             "llama.cpp reads the same weights written as GGUF in f32 / f16 / q8_0, and the original Q4_1 file.\n",
             "| model | engine | weights | tokens/s | ms/token | MB per token | GB/s | FFN sparsity | sparse / dense (ideal) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b in runs:
        label = dict(stocha="CPT StochA + Swi+FT (RELU)", cats="original + CATS")[name]
        rows = b["rows"]
        for dt in ("float32", "bfloat16", "int8"):
            d, s = _e2e(rows, f"e2e C engine dense {dt}"), _e2e(rows, f"e2e C engine sparse {dt}")
            for kind, r in (("dense", d), ("sparse", s)):
                if r is None:
                    continue
                bd = r["breakdown"]
                ratio = (f"{s['tokens_per_s'] / d['tokens_per_s']:.2f}x ({d['breakdown']['bytes'] / s['breakdown']['bytes']:.2f}x)"
                         if kind == "sparse" and d else "")
                lines.append(f"| {label} | our C step, FFN {kind} | {dt} | {r['tokens_per_s']:.1f} | {1e3 / r['tokens_per_s']:.2f} | "
                             f"{bd['bytes'] / 1e6:.1f} | {bd['bytes'] * r['tokens_per_s'] / 1e9:.1f} | "
                             f"{r['sparsity']:.1f}% | {ratio} |")
        for r in rows:
            if r.get("impl", "").startswith("e2e llama.cpp") and "tokens_per_s" in r:
                lines.append(f"| {label} | llama.cpp {r.get('llama_cpp', '')} | {r['impl'][14:]} | {r['tokens_per_s']:.1f} | "
                             f"{1e3 / r['tokens_per_s']:.2f} | {r['weight_bytes'] / 1e6:.1f} (weights) | "
                             f"{r['weight_bytes'] * r['tokens_per_s'] / 1e9:.1f} | dense | |")
        t = _e2e(rows, "e2e dense")
        if t:
            lines.append(f"| {label} | PyTorch eager | float32 | {t['tokens_per_s']:.1f} | {1e3 / t['tokens_per_s']:.2f} | | | "
                         f"dense | |")
    return "\n".join(lines)


def parts_table(ex):
    """Where a step's time goes, part by part, for the C engine's rows of the continued model."""
    b = _load(ex, "smol_decode_stocha.json")
    if b is None:
        return None
    rows = [r for r in b["rows"] if r.get("impl", "").startswith("e2e C engine") and r.get("breakdown")]
    if not rows:
        return None
    parts = list(rows[0]["breakdown"]["parts"])
    lines = ["Each cell: ms per token / MB it must read / GB/s reached (the part's bytes over its time).\n",
             "| row | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
    for r in rows:
        cells = []
        for p in parts:
            c = r["breakdown"]["parts"][p]
            cells.append(f"{c['ms']:.2f} / {c['bytes'] / 1e6:.1f} / {c['bytes'] / max(c['ms'], 1e-9) / 1e6:.1f}"
                         if c["bytes"] else f"{c['ms']:.2f}")
        lines.append(f"| {r['impl'][4:]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diversity_table(ex):
    lines = []
    for name, label in (("original", "SmolLM2-135M-Instruct as it is (SILU)"), ("stocha", "after CPT StochA + Swi+FT (RELU)")):
        d = _load(ex, os.path.join("smol", name, "diversity.json"))
        if d is None:
            continue
        if not lines:
            lines = [f"`python -m experiments.smollm diversity` (run.py's diversity stage): {d['n_prompts']} prompts of "
                     f"{d['prompt_tokens']} tokens of Shakespeare (val), {d['num_samples']} samples of {d['new_tokens']} "
                     "tokens each; every sample scored by the deterministic model (its inference act). Higher log-likelihood "
                     "is better quality; higher distinct-n and lower self-BLEU are more diverse. Compare rows at equal "
                     "log-likelihood.\n",
                     "| model | sampler | avg log-lik | best-of-N log-lik | distinct-1 | distinct-2 | distinct-3 | self-BLEU-4 "
                     "| unique |", "|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            sb = "n/a" if r["self_bleu"] is None or (isinstance(r["self_bleu"], float) and math.isnan(r["self_bleu"])) \
                else f"{r['self_bleu']:.3f}"
            lines.append(f"| {label} | {r['label']} | {r['avg_ll']:.3f} | {r['best_ll']:.3f} | {r['distinct_1']:.3f} | "
                         f"{r['distinct_2']:.3f} | {r['distinct_3']:.3f} | {sb} | {r['unique']:.2f} |")
    return "\n".join(lines) or None
