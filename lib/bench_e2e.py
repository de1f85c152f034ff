"""
bench.py's end-to-end rows: decoding tokens/s through model.generate, dense and with the sparse kernels attached,
each step timed part by part against the bytes it must read; and the random d=2048 model they run on. `ctx` is
a Settings: what bench.py hands over (its settings, its timers and the list its rows go to).
"""

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from lib import attach as attach_mod
import sparse_ffn
from model import GPT, GPTConfig


@dataclass
class Settings:
    tokens: int  # new tokens per generate() call
    dev_dtypes: Callable  # dev -> the weight dtypes to time there
    full: bool  # every dtype and +linear row, not only the first dtype
    compiled: bool  # also model.generate(compile=True)
    llama: bool  # also llama.cpp on the same weights
    origin_gguf: Optional[str]  # the GGUF file the checkpoint came from, timed by llama.cpp as it is
    bench: Callable  # bench.py's timer: median seconds of a list of calls on dev
    sync: Callable  # dev -> None, waits for the device
    roof_now: Callable  # dev -> the read GB/s measured now
    rows: list  # where the rows go (bench.py writes them to its --json)


def sparse_model(dev, prompt, n_new, d=2048, h=8192, n_layer=2, target=0.9):
    """Random weights, FFN-heavy (small vocab, few layers). Every token embedding shares a direction
    e, and each W1 row gets a negative component along e, sized so that the unit fires on 10% of
    the calibration tokens (RELU sparsity ~90%): first random tokens, then twice the greedy
    continuation of `prompt` that e2e_table decodes. Tied logits shift equally: argmax intact."""
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=n_layer, n_head=16, n_kv_head=4, n_embd=d,
                       ffn_hidden=h, act="relu")
    model = GPT(config).to(dev).eval()
    e = torch.randn(d, device=dev)
    e /= e.norm()
    with torch.no_grad():
        model.tok_emb.weight += 2.0 * e
        calib = torch.randint(config.vocab_size, (8, 48), device=dev)
        for _ in range(3):
            for block in model.blocks:  # layer by layer: each one's inputs depend on the ones before
                xs = []
                hk = block.ffn.register_forward_hook(lambda m, a, y: xs.append(a[0].reshape(-1, d)))
                model(calib)
                hk.remove()
                u, ue = xs[0] @ block.ffn.w1.weight.T, xs[0] @ e  # (tokens, h), (tokens,) with ue > 0
                # unit j fires when u_j - delta_j ue > 0, i.e. u_j / ue > delta_j: on 1 - target of the tokens
                block.ffn.w1.weight -= torch.quantile(u / ue[:, None], target, dim=0)[:, None] * e
            calib = model.generate(prompt, n_new, temperature=0.0)
    return model


def step_bytes(c, fbytes, lbytes, s, pos):
    """Bytes one decode step must read, by part, for config c: the FFN (fbytes per weight, a fraction s of its units
    zero: W1 in full, W3 rows and W2 columns of the active ones), the attention projections (lbytes per weight)
    and the fp32 KV cache over pos positions. The output layer's are its weight's bytes."""
    L, d, h, kv = c.n_layer, c.n_embd, c.ffn_hidden, c.n_kv_head * (c.n_embd // c.n_head)
    return dict(ffn=L * d * h * fbytes * (1 + 2 * (1 - s)), proj=L * (2 * d * d + 2 * d * kv) * lbytes,
                kv=L * 2 * pos * kv * 4)


def breakdown(ctx, dev, model, prompt, s, wbytes, lbytes=4):
    """Where one decoded token's time goes: each part timed on its own, on the inputs it sees in a real
    step (batch 1, the prompt in the KV cache), all layers in turn as in a step (so the weights come from
    memory, not cache); 'rest' is the whole step minus the parts (norms, residuals, embedding, Python and
    dispatch). Bytes: what the part must read (weights, the KV cache); wbytes: FFN bytes per weight (None:
    dense fp32), lbytes: the projections' and output layer's."""
    T = prompt.shape[1]
    blocks = list(model.blocks)
    model.setup_cache(1, T + 1)
    tok = prompt[:, -1:]
    attn_in, ffn_in, cos, sin = [], [], model.rope_cos[T:T + 1], model.rope_sin[T:T + 1]
    hooks = [h for b in blocks for h in (b.attn.register_forward_hook(lambda m, a, y: attn_in.append(a[0])),
                                         b.ffn.register_forward_hook(lambda m, a, y: ffn_in.append(a[0])))]
    with torch.no_grad():
        model(prompt[:, :-1], start_pos=0)
        attn_in.clear(); ffn_in.clear()
        model(tok, start_pos=T - 1)
        for hk in hooks:
            hk.remove()
        attn_out = [b.attn.n_head * b.attn.head_dim for b in blocks]
        y_in = [torch.randn(1, 1, n, device=dev) for n in attn_out]
        last = torch.randn(1, 1, model.config.n_embd, device=dev)
        step = ctx.bench([lambda: model(tok, start_pos=T - 1)], dev)
        ffn = ctx.bench([lambda: [b.ffn(x) for b, x in zip(blocks, ffn_in)]], dev)
        proj = ctx.bench([lambda: [(b.attn.wq(x), b.attn.wk(x), b.attn.wv(x), b.attn.wo(y))
                               for b, x, y in zip(blocks, attn_in, y_in)]], dev)
        attn = ctx.bench([lambda: [b.attn(x, cos, sin, T - 1) for b, x in zip(blocks, attn_in)]], dev)
        head = ctx.bench([lambda: model.lm_head(model.norm(last))], dev)
    model.clear_cache()
    by = step_bytes(model.config, 4 if wbytes is None else wbytes, lbytes, 0 if wbytes is None else s / 100, T)
    parts = [("FFN", ffn, by["ffn"]), ("attention projections", proj, by["proj"]),
             ("attention (RoPE, cache, softmax)", attn - proj, by["kv"]),
             ("output layer + final norm", head, model.lm_head.weight.numel() * lbytes)]
    parts.append(("rest (norms, residuals, Python)", step - sum(p[1] for p in parts), 0))
    return show_parts(parts, step, ctx.roof_now(dev))


def show_parts(parts, step, roof):
    """Print (name, seconds, bytes) per part of a step of `step` seconds against the read roof (GB/s)."""
    for name, t, by in parts:
        print(f"    {name:34s} {t * 1e3:7.3f} ms {100 * t / step:5.1f}%  {by / 1e6:8.2f} MB"
              + (f" {by / max(t, 1e-9) / 1e9:6.1f} GB/s ({100 * by / max(t, 1e-9) / 1e9 / roof:3.0f}% of {roof:.1f})" if by else ""))
    total = sum(p[2] for p in parts)
    print(f"    {'one step':34s} {step * 1e3:7.3f} ms 100.0%  {total / 1e6:8.2f} MB {total / step / 1e9:6.1f} GB/s "
          f"({100 * total / step / 1e9 / roof:3.0f}% of {roof:.1f}); at the roof: {roof * 1e9 / total:.0f} tokens/s")
    return dict(step_ms=step * 1e3, roof_GBps=roof, bytes=total,
                parts={name: dict(ms=t * 1e3, bytes=by) for name, t, by in parts})


E2E_SECONDS = 1.0  # seconds of timed generations per C engine row


def engine_rows(ctx, model, label, prompt, n, ref):
    """The C engine (decode.py): the FFN dense and sparse, per weight dtype. A row's breakdown is decode.c's own
    timers over the whole generate() call, per generated token, beside the bytes a step must read; 'Python' is
    the rest of the call (sampling, the loop). ref: the dense PyTorch tokens."""
    import decode
    c = model.config
    out_rows = {}
    print(f"\n  the C engine (decode.c: one C call per token), same prompt and tokens; {torch.get_num_threads()} threads")
    for dt in ctx.dev_dtypes("cpu"):
        engines = {ffn: decode.Engine(model, dt, ffn) for ffn in ("dense", "sparse")}
        runs = {ffn: [] for ffn in engines}
        t_end = time.perf_counter() + 2 * E2E_SECONDS
        # dense and sparse alternate, run by run, for at least 2 x E2E_SECONDS: a shared host's bandwidth drifts
        # over seconds, and one generation of the small model lasts ~15 ms; the first run of each is a warm-up
        while min(len(r) for r in runs.values()) < 6 or time.perf_counter() < t_end:
            for ffn, engine in engines.items():
                model.engine = engine
                t0 = time.perf_counter()
                out = model.generate(prompt, n, temperature=0.0)
                runs[ffn].append((time.perf_counter() - t0, engine.stats, out))
        for ffn in engines:
            # the median run, with its own part timers
            t, st, out = sorted(runs[ffn][1:], key=lambda r: r[0])[(len(runs[ffn]) - 1) // 2]
            b = dt.itemsize
            s = st["sparsity"] if ffn == "sparse" else 0.0
            pos = prompt.shape[1] + n / 2  # the mean position a step attends over
            by = step_bytes(c, b, b, s, pos)
            parts = [(name, sec / n, by) for (name, sec), by in zip(st["seconds"].items(), (
                0, by["proj"], by["kv"], by["ffn"], c.vocab_size * c.n_embd * b))]
            parts.append(("Python (sampling, the loop)", t / n - sum(p[1] for p in parts), 0))
            name = f"C engine {ffn} {str(dt)[6:]}"
            same = "same tokens as dense" if torch.equal(out, ref) else "tokens differ from dense (rounding)"
            print(f"  {name:33s} {n / t:8.1f} tokens/s  {1e3 * t / n:7.2f} ms/token  ({same})"
                  + (f"; FFN sparsity {100 * s:.1f}% (units run)" if ffn == "sparse" else "") + "; per token:", flush=True)
            bd = show_parts(parts, t / n, ctx.roof_now("cpu"))
            out_rows[ffn, dt] = dict(device="cpu", impl=f"e2e {name}", model=label, tokens_per_s=n / t,
                                     sparsity=100 * s, breakdown=bd)
            ctx.rows.append(out_rows[ffn, dt])
        dense, sparse = out_rows["dense", dt], out_rows["sparse", dt]
        ideal = dense["breakdown"]["bytes"] / sparse["breakdown"]["bytes"]
        print(f"  sparse / dense, {str(dt)[6:]}: {sparse['tokens_per_s'] / dense['tokens_per_s']:.2f}x "
              f"(ideal, bytes dense / bytes sparse: {ideal:.2f}x)")
    decode.detach_engine(model)
    return out_rows


def e2e_table(ctx, dev, model, label, prompt):
    n = min(ctx.tokens, model.config.block_size - prompt.shape[1])
    with torch.no_grad(), model.ffn_stats() as stats:
        model(model.generate(prompt, n, temperature=0.0))
    s = 100 * sum(st["sparsity"] for st in stats) / len(stats)
    print(f"\nend to end, {label}: batch 1, {prompt.shape[1]}-token prompt + {n} new tokens, greedy, KV cache; "
          f"tokens/s over the whole generate() call; relu sparsity {s:.1f}% (mean over layers, on those tokens)")
    ref = None
    # dense; the sparse FFN per weight dtype; and on the CPU the same with the projections and the output
    # layer through the C kernel's dense GEMV in that dtype too (attach(linear=True))
    # compiled: the same through model.generate(compile=True), dense and with everything in the C kernel
    linear_ok = dev == "cpu" and sparse_ffn.backends()["c"] is True
    configs = [("dense", None, False, False)] + [(str(dt)[6:], dt, False, False) for dt in ctx.dev_dtypes(dev)
                                                 if ctx.full or dt == ctx.dev_dtypes(dev)[0]]
    configs += [(str(dt)[6:], dt, True, False) for dt in ctx.dev_dtypes(dev) if linear_ok and ctx.full]
    if ctx.compiled:
        configs += ([("dense", None, False, True)] + [(str(dt)[6:], dt, False, True) for dt in ctx.dev_dtypes(dev)]
                    + [(str(dt)[6:], dt, True, True) for dt in ctx.dev_dtypes(dev) if linear_ok])
    for name, dt, linear, comp in configs:
        if dt is not None:
            attach_mod.attach(model, dtype=dt, linear=linear)
            name = f"sparse {model.blocks[0].ffn.kernel.backend} {name}" + (" +linear" if linear else "")
        if comp:
            name += " compiled"
            torch._dynamo.reset()  # one configuration's graphs at a time (dynamo's recompile limit)
        ts = []
        for i in range(4):  # a warm-up (and the compile), then the median of three timed runs
            ctx.sync(dev); t0 = time.perf_counter()
            out = model.generate(prompt, n, temperature=0.0, compile=comp)
            ctx.sync(dev); ts.append(time.perf_counter() - t0)
        t = float(np.median(ts[1:]))
        ref = out if ref is None else ref
        same = "same tokens as dense" if torch.equal(out, ref) else "tokens differ from dense (rounding)"
        tps = n / t
        print(f"  {name:33s} {tps:8.1f} tokens/s  {1e3 / tps:7.2f} ms/token  ({same})"
              + ("" if comp else "; one step, part by part:"), flush=True)
        parts = None if comp else breakdown(ctx, dev, model, prompt, s, None if dt is None else dt.itemsize,
                                            4 if not linear else dt.itemsize)
        attach_mod.detach(model)
        ctx.rows.append(dict(device=dev, impl=f"e2e {name}", model=label, tokens_per_s=tps, sparsity=s, breakdown=parts))
    ours = engine_rows(ctx, model, label, prompt, n, ref) if dev == "cpu" and linear_ok else {}
    if ctx.llama and dev == "cpu":
        from lib.bench_llama import llama_table
        theirs = llama_table(model, label, prompt, n, ctx.roof_now, ctx.origin_gguf)
        ctx.rows.extend(theirs)
        pairs = [(f"C engine sparse {str(dt)[6:]}", ours.get(("sparse", dt)), f"llama.cpp {q}",
                  next((r for r in theirs if r["impl"] == f"e2e llama.cpp {q}" and "tokens_per_s" in r), None))
                 for dt, q in ((torch.float32, "f32"), (torch.bfloat16, "f16"), (torch.int8, "q8_0"))]
        said = [f"{a} / {b}: {ra['tokens_per_s'] / rb['tokens_per_s']:.2f}x" for a, ra, b, rb in pairs if ra and rb]
        if said:
            print("  against llama.cpp at about equal bytes per weight: " + "; ".join(said))
        best = max((r for r in ours.values()), key=lambda r: r["tokens_per_s"], default=None)
        fastest = max((r for r in theirs if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"], default=None)
        if best and fastest:
            print(f"  our fastest row ({best['impl'][4:]}) / llama.cpp's fastest ({fastest['impl'][4:]}): "
                  f"{best['tokens_per_s'] / fastest['tokens_per_s']:.2f}x")
