"""
RESULTS.md's speed tables, printed from bench.py's JSON in experiments/results/ (see experiments/results.py, which registers them):
the kernels against dense, the plain kernel against the tuned one, the gates, end to end, a checkpoint's layers.
Each takes `ex`, experiments/run.py as configured, and returns markdown, or None when its stage has not run.
"""

import json
import math
import os




def _bench(ex, name="bench.json"):
    """bench.py's --json output in ex.out, or None (it holds no undefined numbers: plain json reads it)"""
    path = os.path.join(ex.out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def bench_conditions(b):
    roof = b["roof_cpu"]
    huge = roof.get("read_huge_GBps")
    return (f"`python bench.py {' '.join(b['argv'])}`: torch {b['torch']}, {b['threads']} threads, {b['cpu']}; "
            f"a 1 GiB read {roof['read_GBps']:.1f} GB/s" + (f" ({huge:.1f} on huge pages)" if huge else "")
            + f", copy {roof['copy_GBps']:.1f} GB/s; other processes {b.get('others_cpu_pct', math.nan):.0f}% CPU.")


def _kernel(r):
    """a timed implementation of the sparse FFN (torch gather, C plain, C tuned)"""
    return r.get("dense_ms") is not None and "s" in r and "d" in r


def kernel_cell(k, b):
    """ms, speedup (the dense ms it divides), GB/s as % of the roof before it / of the 1 GiB read"""
    gib = k.get("gib_pct", 100 * k["GBps"] / b["roof_cpu"]["read_GBps"])
    return f"{k['time_ms']:.3f}, {k['speedup']:.2f}x ({k['dense_ms']:.3f}), {k['roof_pct']:.0f}% / {gib:.0f}%"


KERNEL_NOTE = ("Each cell: ms; the speedup over PyTorch's dense fp32 FFN, whose calls alternate with the cell's, with that "
               "dense median in brackets (speedup = it / ms); and GB/s as % of the read roof measured just before the row "
               "(a 256 MiB read on huge pages, as the kernels' weights are) / as % of the 1 GiB read at the start "
               "(PyTorch's allocator). 'ideal' = the fp32 speedup at equal GB/s, 3 / (1 + 2(1 - s)).")


def speed_table(ex):
    b = _bench(ex)
    if b is None:
        return None
    rows = b["rows"]
    key = lambda x: (x["d"], x["h"], x["B"], x["s"])
    cols = list(dict.fromkeys((r["impl"], r["dtype"]) for r in rows if _kernel(r)))
    cols.sort(key=lambda c: c[0] != "torch gather")  # the torch reference first, then the C kernels as bench.py ran them
    lines = [bench_conditions(b) + "\n", KERNEL_NOTE + "\n",
             "| d x h | batch | sparsity | " + " | ".join(f"{i} {dt}" for i, dt in cols) + " | ideal | "
             "dense on huge pages |\n" + "|---" * (5 + len(cols)) + "|"]
    for k in dict.fromkeys(key(r) for r in rows if _kernel(r)):
        d, h, B, s = k
        at = [r for r in rows if "d" in r and "s" in r and key(r) == k]
        cells = [next((kernel_cell(r, b) for r in at if (r["impl"], r["dtype"]) == c), "-") for c in cols]
        huge = next((r for r in rows if r.get("impl") == "dense hugepg" and (r["d"], r["h"], r["B"]) == (d, h, B)), None)
        ideal = next(r["ideal"] for r in at if "ideal" in r)
        lines.append(f"| {d}x{h} | {B} | {s:.0f}% | " + " | ".join(cells) + f" | {ideal:.2f}x | "
                     + (f"{huge['speedup']:.2f}x" if huge else "-") + " |")
    return "\n".join(lines)


def plain_table(ex):
    """The plain kernel (sffn_forward_plain) against the tuned one (sffn_forward), side by side: what the tuning buys."""
    b = _bench(ex, "bench_plain.json")
    if b is None:
        return None
    rows = [r for r in b["rows"] if r.get("impl") in ("C plain", "C tuned")]
    dts = list(dict.fromkeys(r["dtype"] for r in rows))
    key = lambda r: (r["d"], r["h"], r["B"], r["s"])
    lines = [bench_conditions(b) + "\n", "Each cell: the plain kernel's ms (its GB/s as % of the read roof measured before it) -> the "
             "tuned kernel's ms (%): tuned / plain speedup. Both read the same packed weights; 'ideal' = the fp32 speedup "
             "over dense at equal GB/s, 3 / (1 + 2(1 - s)).\n",
             "| d x h | batch | sparsity | ideal | " + " | ".join(dts) + " |\n" + "|---" * (4 + len(dts)) + "|"]
    for k in dict.fromkeys(key(r) for r in rows):
        at = {(r["impl"], r["dtype"]): r for r in rows if key(r) == k}
        cells = []
        for dt in dts:
            p_, t_ = at.get(("C plain", dt)), at.get(("C tuned", dt))
            cells.append("-" if not (p_ and t_) else f"{p_['time_ms']:.3f} ({p_['roof_pct']:.0f}%) -> {t_['time_ms']:.3f} "
                         f"({t_['roof_pct']:.0f}%): {p_['time_ms'] / t_['time_ms']:.2f}x")
        ideal = next(r["ideal"] for r in at.values() if r["dtype"] == "float32") if ("C plain", "float32") in at else math.nan
        lines.append(f"| {k[0]}x{k[1]} | {k[2]} | {k[3]:.0f}% | {ideal:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gates_table(ex):
    """The kernel at the frontier's sparsities with the relu gate and with the silu gate and a threshold (CATS)."""
    bs = [(g, _bench(ex, f"bench_{g}.json")) for g in ("relu", "silu")]
    bs = [(g, b) for g, b in bs if b]
    if not bs:
        return None
    cols = [(g, impl, dt) for g, b in bs for impl, dt in dict.fromkeys((r["impl"], r["dtype"]) for r in b["rows"] if _kernel(r))]
    lines = [" ".join(bench_conditions(b) for _, b in bs) + "\n",
             "d=2048 h=8192, batch 1. Each cell: ms, speedup over dense (the dense ms it divides), % of the roofs, as above.\n",
             "| sparsity | " + " | ".join(f"{g}: {impl} {dt}" for g, impl, dt in cols) + " |\n" + "|---" * (1 + len(cols)) + "|"]
    for s in sorted({r["s"] for _, b in bs for r in b["rows"] if _kernel(r)}):
        cells = []
        for g, impl, dt in cols:
            b = dict(bs)[g]
            k = next((r for r in b["rows"] if _kernel(r) and (r["impl"], r["dtype"], r["s"]) == (impl, dt, s)), None)
            cells.append(kernel_cell(k, b) if k else "-")
        lines.append(f"| {s:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _e2e_parts(parts):
    """ms of FFN, projections, attention, output layer, and the rest, from either breakdown: PyTorch's (its 'rest'
    holds the Python) or the C engine's (its 'rest' and the Python apart)."""
    named = ("FFN", "attention projections", "attention (", "output layer")
    ms = [sum(v["ms"] for k, v in parts.items() if k.startswith(n)) for n in named]
    return ms + [sum(v["ms"] for k, v in parts.items() if not k.startswith(named))]


def e2e_table(ex):
    b = _bench(ex)
    e2e = [r for r in b["rows"] if r.get("impl", "").startswith("e2e")] if b else []
    if not e2e:
        return None
    lines = []
    for model in dict.fromkeys(r["model"] for r in e2e):
        mine = [r for r in e2e if r["model"] == model]
        dense = next((r["tokens_per_s"] for r in mine if r["impl"] == "e2e dense"), math.nan)
        sp = next((r["sparsity"] for r in mine if "sparsity" in r), None)
        lines += [f"{'' if not lines else chr(10)}{model}" + (f" ({sp:.1f}% of the FFN units zero, mean over layers, on the prompt and decoded tokens)" if sp else "")
                  + ": batch 1, greedy, KV cache, tokens/s over the whole generate() call; one step split into parts, "
                  "each timed on its own ('rest' = the step minus the parts):\n",
                  "| engine | tokens/s | vs our dense | one step, ms: FFN / projections / attention / output layer / rest |\n"
                  + "|---" * 4 + "|"]
        for r in mine:
            if "failed" in r:
                lines.append(f"| {r['impl'][4:]} | failed ({r['failed']}) | - | - |")
                continue
            parts = (r.get("breakdown") or {}).get("parts")
            cell = " / ".join(f"{v:.2f}" for v in _e2e_parts(parts)) if parts else (
                f"llama.cpp {r['llama_cpp']}; {r['same_tokens']}/{r['n_tokens']} greedy tokens as ours with silu" if "llama_cpp" in r else "-")
            lines.append(f"| {r['impl'][4:]} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense:.2f}x | {cell} |")
    return "\n".join(lines)


def layers_table(ex):
    b = _bench(ex)
    layers = [r for r in b["rows"] if r.get("impl") == "ckpt layer"] if b else []
    if not layers:
        return None
    lines = ["The checkpoint's real activations, per layer, on validation text with RELU ('dead': zero on every token; "
             "'union of N tokens': the units zero for all of N consecutive tokens, what a batch of N sees); batch 1 times "
             "on 64 of the real FFN inputs:\n",
             "| layer | sparsity | dead | union of 4 tokens | union of 16 | dense ms | C fp32 ms | speedup |\n" + "|---" * 8 + "|"]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['s']:.1f}% | {r['dead']:.1f}% | {r['union4']:.1f}% | {r['union16']:.1f}% | "
                     f"{r['dense_ms']:.3f} | {r['sparse_float32_ms']:.3f} | {r['dense_ms'] / r['sparse_float32_ms']:.2f}x |")
    return "\n".join(lines)


DECODE_PAIRS = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}  # llama.cpp's type at about the same bytes per weight


def decode_table(ex):
    """The C decode engine (decode.c) beside PyTorch and llama.cpp, from bench.py's run with --llama=True."""
    b = _bench(ex, "bench_engine.json")
    rows = [r for r in b["rows"] if r.get("impl", "").startswith("e2e") and "compiled" not in r["impl"]] if b else []
    if not rows:
        return None
    lines = [bench_conditions(b) + " Batch 1, greedy, a 16-token prompt and 32 new tokens; tokens/s over the whole "
             "generate() call for ours (the prompt included), over the 32 decode steps for llama.cpp. A C engine row's "
             "parts are decode.c's own timers per generated token ('Python': the sampling and the loop around it); "
             "'at the roof': the tokens/s if a step's bytes (weights, KV cache) moved at the read roof measured before it."]
    ks = [r for r in b["rows"] if _kernel(r) and r["impl"] == "C tuned" and (r["d"], r["B"], r["s"]) == (2048, 1, 90.0)]
    if ks:  # the FFN kernel alone, from the same run
        lines.append("\nThe sparse FFN kernel alone in the same run, d=2048 h=8192, batch 1, 90% zero: "
                     + "; ".join(f"{k['dtype']} {k['time_ms']:.3f} ms, {k['speedup']:.2f}x PyTorch's dense fp32 "
                                 f"(ideal at equal GB/s {k['ideal']:.2f}x), {k['roof_pct']:.0f}% of the read roof" for k in ks) + ".")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = next((r["tokens_per_s"] for r in mine if r["impl"] == "e2e dense"), math.nan)
        llama = {r["impl"][len("e2e llama.cpp "):]: r for r in mine if r["impl"].startswith("e2e llama.cpp") and "tokens_per_s" in r}
        lines += [f"\n{model}:\n", "| engine | tokens/s | vs PyTorch dense | vs llama.cpp | ms per token: FFN / projections / "
                  "attention / output layer / rest / Python | at the roof |\n" + "|---" * 6 + "|"]
        for r in mine:
            name = r["impl"][4:]
            if "failed" in r:
                lines.append(f"| {name} | failed ({r['failed']}) | - | - | - | - |")
                continue
            dt = name.split()[-1] if name.startswith("C engine") else None
            ll = llama.get(DECODE_PAIRS.get(dt))
            vs = f"{r['tokens_per_s'] / ll['tokens_per_s']:.2f}x ({DECODE_PAIRS[dt]})" if ll else "-"
            bd = r.get("breakdown") if name.startswith("C engine") else None
            order = ("FFN", "attention projections", "attention (RoPE", "output layer", "rest", "Python")
            parts = " / ".join(f"{next(v['ms'] for k, v in bd['parts'].items() if k.startswith(o)):.3f}"
                               for o in order) if bd else "-"
            roof = f"{bd['roof_GBps'] * 1e9 / bd['bytes']:.0f}" if bd else "-"
            if name.startswith("llama.cpp"):
                parts = f"llama.cpp {r['llama_cpp']}; {r['same_tokens']}/{r['n_tokens']} greedy tokens as ours with silu"
            name = "PyTorch, dense" if name == "dense" else f"PyTorch + the C sparse FFN, {name.split()[-1]}" \
                if name.startswith("sparse") else name
            lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense:.2f}x | {vs} | {parts} | {roof} |")
    return "\n".join(lines)
