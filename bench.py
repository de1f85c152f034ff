"""
Times the sparse RELU FFN y = W2 (relu(W1 x) * (W3 x)) against PyTorch's dense gated FFN, with the
napkin math beside every number: batch-1 decoding is memory bound, so the bytes that must move are
d*h*b*(1 + 2(1-s)) (W1 in full, W3 rows and W2 columns of the active units; b = bytes per weight).

    python bench.py                                   # dense, plain and tuned kernels, batch 1, both sizes; one e2e row
    python bench.py --full                            # batches 1/4/16, 0..99% sparsity, the torch gather, compiled, llama.cpp
    python bench.py --sizes=2048x8192 --batches=1 --sparsities=90 --e2e=False
    python bench.py --ckpt=out/ckpt.pt                # a trained model's real sparsity, on its own val text
    python bench.py --ckpt=smollm2 --cats=80 --llama=True --synthetic=False  # a GGUF model, CATS-sparse, vs llama.cpp
    python bench.py --json=bench.json                 # every row as JSON too
    python bench.py --gate=silu --e2e=False           # the silu gate with a threshold (CATS) at each sparsity

Weights are random; W1 is built so that exactly a fraction s of the hidden units is zero for x
(for B > 1: zero for every row of the batch, the union, each active unit firing on each row with
the rate an independent per-token sparsity gives). Each implementation rotates over copies of its
weights (--rotate_mb in all) so that, as in a many-layer model, they come from memory, not cache.
Times are medians of many calls after a warm-up; a speedup is the ratio of the row's median to that of
torch dense, whose calls alternate with the row's. "C plain" is sffn_forward_plain, the kernel in one
screen; "C tuned" is sffn_forward: the ratio of the two is what the tuning buys on this machine. The kernels' packed weights sit on huge pages; the
"dense hugepg" row puts dense's there too, to show what that alone is worth. The roof of each row is the
read bandwidth (on huge pages) measured just before it (a shared host drifts by 20-30%);
the last line says how much CPU other processes used meanwhile. The C kernel is built on first use
(with cffi and a C compiler); the CUDA rows need `python build.py` on a machine with CUDA torch and
nvcc. Without a kernel, bench.py times the torch gather fallback only, and says so. The end-to-end rows are in
lib/bench_e2e.py, llama.cpp's in lib/bench_llama.py.
"""

import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from lib import bench_e2e
import sparse_ffn
from lib.configurator import between, configure, either, existing_dir, existing_file, int_list, new_file, one_of, positive_int
from lib.data import checkpoint_data
from lib.checkpoint import load_any
from lib.gguf_io import MODELS, is_gguf
from lib.gguf_io import resolve as gguf_resolve
from model import GPT, GPTConfig, gate_t

# -----------------------------------------------------------------------------
devices = ""  # "cpu", "cuda" or "cpu,cuda"; empty: cpu, and cuda when there is one
sizes = ""  # d x h pairs; empty: the default model's FFN and 2048x8192
full = False  # the full grid: the defaults marked "--full" below
batches = ""  # empty: 1 (--full: 1,4,16)
sparsities = ""  # percent of the hidden units that are zero (the union over a batch); empty: 0,50,90 (--full: 0,50,80,90,95,99)
dtypes = "float32,bfloat16,int8"  # weight dtypes of the sparse kernels (x and y stay fp32 on the CPU; int8: CPU only)
gate = "relu"  # the kernel rows' gate: relu, or silu with the threshold t that zeroes s% of the units (CATS)
gather = None  # also time the pure-torch gather; None: with --full
min_time = 0.25  # seconds of timed calls per row (at least min_reps calls)
min_reps = 10
roof_mb = 1024  # MiB summed to measure the read roof (the roof before each row sums a quarter of it)
rotate_mb = 1024  # weight copies per implementation, up to this many MB: out of the caches (some hosts have 100+ MB)
threads = 0  # torch threads; 0 = torch's default
e2e = True  # decoding tokens/s through model.generate, dense vs sparse
llama = None  # and llama.cpp on the same weights, where llama-cpp-python and gguf are installed; None: with --full
compiled = None  # and model.generate(compile=True) (torch.compile; ~30 s per row to compile); None: with --full
e2e_tokens = 32
ckpt = ""  # a train.py checkpoint, a GGUF file or a model name (smollm2): its sparsity on real text, kernels on its inputs
cats = 0.0  # with --ckpt: CATS thresholds calibrated to this % of zero FFN units on its training text (0: none)
synthetic = True  # the end-to-end table of the random d=2048 model too
data_dir = ""  # the checkpoint's tokenized text; empty = the one it was trained on
json = ""  # write the rows here
seed = 0
# -----------------------------------------------------------------------------


def _arg(a):  # --full means --full=True
    return a + "=True" if a.startswith("--") and "=" not in a else a


def listed(allowed):  # a comma-separated list of these names
    return lambda v: None if v and all(x in allowed for x in v.split(",")) else f"a comma-separated list of {', '.join(allowed)}"


def dxh_list(v):
    try:
        ok = all(len(p) == 2 and min(p) >= 1 for p in (tuple(int(x) for x in s.split("x")) for s in v.split(",")))
    except ValueError:
        ok = False
    return None if ok else "a comma-separated list of d x h pairs like 256x704,2048x8192"


RULES = dict(
    devices=either(one_of(""), listed(["cpu"] + (["cuda"] if torch.cuda.is_available() else []))),
    full=one_of(True, False), sizes=either(one_of(""), dxh_list), batches=either(one_of(""), int_list(1)),
    sparsities=either(one_of(""), int_list(0, 100)), dtypes=listed(["float32", "bfloat16", "float16", "int8"]),
    gate=one_of("relu", "silu"), gather=one_of(None, True, False), min_time=between(0, lo_open=True),
    min_reps=positive_int, roof_mb=between(1, integer=True), rotate_mb=between(0), threads=between(0, integer=True), e2e=one_of(True, False),
    e2e_tokens=positive_int, llama=one_of(None, True, False), compiled=one_of(None, True, False),
    ckpt=either(one_of("", *MODELS), existing_file), cats=between(0, 100, hi_open=True), synthetic=one_of(True, False),
    data_dir=either(one_of(""), existing_dir), json=either(one_of(""), new_file),
    seed=between(0, integer=True),
)
try:  # every setting, and the checkpoint and its data, checked before minutes of benchmarking
    configure(globals(), [_arg(a) for a in sys.argv[1:]], RULES)
    if ckpt:
        ckpt_state = load_any(ckpt)
        data_dir = checkpoint_data(ckpt_state, data_dir)
        # the GGUF file the model came from (itself, or the --init_from of its run): llama.cpp times it as it is
        origin_gguf = next((p for p in (gguf_resolve(ckpt), gguf_resolve(ckpt_state["config"].get("init_from", "")))
                            if p and is_gguf(p)), None)
    elif cats:
        raise ValueError("--cats needs --ckpt")
except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
batches = batches or ("1,4,16" if full else "1")
sparsities = sparsities or ("0,50,80,90,95,99" if full else "0,50,90")
gather, llama, compiled = (full if v is None else v for v in (gather, llama, compiled))
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
ints = lambda s: [int(v) for v in str(s).split(",") if v != ""]
default = GPTConfig()
size_list = [tuple(int(v) for v in s.split("x")) for s in (sizes or f"{default.n_embd}x{default.ffn_hidden},2048x8192").split(",")]
device_list = devices.split(",") if devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
dtype_list = [getattr(torch, n) for n in dtypes.split(",")]
if "cuda" in device_list and dtype_list == [torch.int8]:
    sys.exit("error: int8 weights run on the CPU only: give --dtypes another dtype for cuda")


def dev_dtypes(dev):  # int8 weights run on the CPU only
    return [dt for dt in dtype_list if dev == "cpu" or dt != torch.int8]


def ffn_bytes(d, h, dt, active):
    """Bytes a sparse FFN call must read: W1, and W3 row + W2 column of each active unit (int8: + their fp32 scales)."""
    return (d * dt.itemsize + (4 if dt == torch.int8 else 0)) * (h + 2 * active)
rows = []

# -----------------------------------------------------------------------------
# conditions, roofs, timing


def cpu_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_busy():
    """(busy, total) jiffies of all CPUs, for the load others put on the machine during the run."""
    try:
        v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)
    except OSError:
        return None


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(fns, dev, against=None):
    """Median seconds of one call, rotating over fns (one per weight copy). With `against` (another list),
    blocks of its calls alternate with blocks of these, and both medians come back: on a shared host the
    bandwidth drifts over seconds, so two implementations timed one after the other can be 5-10% off. A block
    lasts half of min_time (8 calls at least): the calls after a switch run slow (2-core Xeon, d=2048, the
    kernel alternating with dense: batch 1 2% slower in blocks of 1 call than of 8, batches 4 and 16 3-10%
    slower in blocks of 8 than unpaired), and in blocks this long the median passes over them."""
    groups, block = [fns] + ([against] if against else []), []
    for g in groups:  # the warm-up (every copy's first call sets up its scratch), and the block size
        for f in g:
            f()
        sync(dev); t0 = time.perf_counter()
        for f in g[:3] * 2:
            f()
        sync(dev); block.append(max(8, math.ceil(min_time / 2 * 6 / (time.perf_counter() - t0))) if against else 1)
    times, start, i = [[] for _ in groups], time.perf_counter(), [0] * len(groups)
    while len(times[0]) < min_reps or time.perf_counter() - start < min_time * len(groups):
        for k, (g, ts) in enumerate(zip(groups, times)):
            for _ in range(block[k]):
                f = g[i[k] % len(g)]
                i[k] += 1
                if dev == "cuda":
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record(); f(); e1.record(); e1.synchronize()
                    ts.append(e0.elapsed_time(e1) / 1e3)
                else:
                    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    med = [float(np.median(ts)) for ts in times]
    return tuple(med) if against else med[0]


def huge(n, dev):  # n floats of ones: on huge pages on the CPU, as the kernels' packed weights are
    return (sparse_ffn.huge_empty(n) if dev == "cpu" else torch.empty(n, device=dev)).fill_(1.0)


def read_bandwidth(dev):
    """GB/s of a roof_mb sum (1 GiB by default; a pure read, like the kernels) and of a roof_mb copy (read + write), in memory from
    PyTorch's allocator, and of the same sum on huge pages (None where they are the same: not the CPU)."""
    a = torch.randn(roof_mb << 18, device=dev)
    b = torch.empty_like(a)
    t_sum, t_copy = bench([lambda: a.sum()], dev), bench([lambda: b.copy_(a)], dev)
    read, copy = a.nbytes / t_sum / 1e9, 2 * a.nbytes / t_copy / 1e9
    del a, b
    if dev != "cpu":
        return read, copy, None
    hp = huge(roof_mb << 18, dev)
    return read, copy, hp.nbytes / bench([lambda: hp.sum()], dev) / 1e9


_roof_buf = {}


def roof_now(dev):
    """Read GB/s right now (a 256 MiB sum on huge pages, median of 5): on a shared host the memory bandwidth
    drifts by 20-30% over seconds, so each row is compared with the roof measured just before it."""
    if dev not in _roof_buf:
        _roof_buf[dev] = huge(roof_mb << 16, dev)
    a = _roof_buf[dev]
    a.sum()
    ts = []
    for _ in range(5):
        sync(dev); t0 = time.perf_counter(); a.sum(); sync(dev); ts.append(time.perf_counter() - t0)
    return a.nbytes / float(np.median(ts)) / 1e9


def copies(make, nbytes):
    # all of rotate_mb, even for a small FFN: some hosts' last-level caches hold 480 MiB
    return [make() for _ in range(max(1, min(4096, math.ceil(rotate_mb * 2**20 / nbytes))))]


def show(row):
    row["gib_pct"] = 100 * row["GBps"] / meta[f"roof_{row['device']}"]["read_GBps"]  # against the 1 GiB read
    rows.append(row)
    fmt = lambda v, f, w: format(v, f).rjust(w) if v is not None else "-".rjust(w)
    print(f"{row['impl']:13s} {row['dtype']:8s} {row['d']:5d} {row['h']:5d} {row['B']:3d} {fmt(row['s'], '.1f', 5)} "
          f"{fmt(row.get('s_token'), '.1f', 5)} {row['time_ms']:8.3f} {row['GBps']:6.1f} {row['roof_GBps']:6.1f} {row['roof_pct']:5.0f}% {row['gib_pct']:5.0f}% "
          f"{fmt(row.get('speedup'), '.2f', 6)}x {fmt(row.get('ideal'), '.2f', 5)}x", flush=True)

# -----------------------------------------------------------------------------
# inputs with a chosen union sparsity


def make_case(d, h, B, s, gen):
    """x (B, d) and weights with exactly round(s*h) units zero for all B rows: W1 x hits targets
    (least squares), kept 0.2+ away from 0. Active units fire per row with the independent rate
    r = 1 - s^(1/B), at least once. Returns x, w1, w3, w2, the active count and per-token sparsity."""
    x = torch.randn(B, d, generator=gen)
    w1, w3 = torch.randn(h, d, generator=gen) / d**0.5, torch.randn(h, d, generator=gen) / d**0.5
    w2 = torch.randn(d, h, generator=gen) / h**0.5
    n_on = h - round(s * h)
    q = 1.0 if s in (0, 1) else (1 - s ** (1 / B)) / (1 - s)  # P(fires on a row | active for the batch)
    fire = torch.rand(n_on, B, generator=gen) < q
    fire[torch.arange(n_on), torch.randint(B, (n_on,), generator=gen)] = True
    sign = -torch.ones(h, B, dtype=torch.float64)
    on = torch.randperm(h, generator=gen)[:n_on]
    sign[on] = fire.double() * 2 - 1
    X, W = x.double(), w1.double()
    target = sign * (W @ X.T).abs().mean() * (0.2 + torch.rand(h, B, generator=gen, dtype=torch.float64))
    w1 = (W - (W @ X.T - target) @ torch.linalg.solve(X @ X.T, X)).float()
    return x, w1, w3, w2, n_on, 100 * (1 - fire.sum().item() / (h * B))


def kernel_table(dev):
    native = "c" if dev == "cpu" else "cuda"
    if sparse_ffn.backends()[native] is not True:
        print(f"(no {native.upper()} sparse rows: {sparse_ffn.backends()[native]})")
    print(f"\n{'impl':13s} {'dtype':8s} {'d':>5s} {'h':>5s} {'B':>3s} {'s%':>5s} {'tok%':>5s} {'ms':>8s} {'GB/s':>6s} "
          f"{'roof':>6s} {'%roof':>6s} {'%1GiB':>6s} {'speedup':>7s} {'ideal':>6s}")
    gen = torch.Generator().manual_seed(seed)
    for d, h in size_list:
        for B in ints(batches):
            dense_ms, dense_fns = {}, {}
            for s in ints(sparsities):
                x, w1, w3, w2, n_on, s_tok = make_case(d, h, B, s / 100, gen)
                act, thr = F.relu, 0.0
                if gate == "silu":  # thr halfway between the n_on-th and next largest |silu| (max over the batch)
                    act = F.silu
                    a = F.silu(x @ w1.T).abs().amax(0).sort(descending=True).values
                    thr = 0.0 if n_on == h else (a[n_on].item() + (a[n_on - 1].item() if n_on else 2 * a[0].item() + 1)) / 2
                    s_tok = 100 * (F.silu(x @ w1.T).abs() <= thr).float().mean().item()
                x = x.to(dev)
                if not dense_ms:  # dense does not depend on s: once per (size, batch), per dtype on GPU
                    for dt in ([torch.float32] if dev == "cpu" else dev_dtypes(dev)):
                        by = 3 * d * h * dt.itemsize
                        # PyTorch's allocator, as users run it, and (CPU) the same weights on huge pages,
                        # as the kernels' are: how much of a kernel's edge at low sparsity that alone is
                        for name, alloc in [("torch dense", None)] + [("dense hugepg", sparse_ffn.huge_empty)] * (dev == "cpu"):
                            mk = (lambda w: w.to(dev, dt, copy=True)) if alloc is None else (lambda w: alloc(w.shape, dt).copy_(w))
                            ws = copies(lambda: [mk(w) for w in (w1, w3, w2)], by)
                            fns = [lambda w=w, xd=x.to(dt): F.linear(act(F.linear(xd, w[0])) * F.linear(xd, w[1]), w[2]) for w in ws]
                            roof = roof_now(dev)
                            bench(fns, dev)  # an untimed round: the first after an allocation can be slow
                            t = bench(fns, dev)
                            show(dict(device=dev, impl=name, dtype=str(dt)[6:], d=d, h=h, B=B, s=None, roof_GBps=roof,
                                      time_ms=t * 1e3, GBps=by / t / 1e9, roof_pct=100 * by / t / 1e9 / roof,
                                      speedup=dense_ms[dt] / t if dt in dense_ms else 1.0))
                            if alloc is None:  # the speedups' baseline: kept, to be timed again beside each kernel row
                                dense_ms[dt], dense_fns[dt] = t, fns
                            else:
                                del ws, fns
                impls = [("cuda", dt, "tuned") for dt in dev_dtypes(dev)] if dev == "cuda" else \
                    [("c", dt, v) for dt in dev_dtypes(dev) for v in ("plain", "tuned")]
                if gather:
                    impls.append(("torch", torch.float32 if dev == "cpu" else dev_dtypes(dev)[0], "tuned"))
                for backend, dt, variant in impls:
                    if backend != "torch" and sparse_ffn.backends()[backend] is not True:
                        continue
                    base = torch.float32 if dev == "cpu" else dt
                    ks = copies(lambda: sparse_ffn.SparseFFN(w1, w3, w2, dtype=dt, device=dev, backend=backend,
                                                             mode="sparse", variant=variant), 3 * d * h * dt.itemsize)
                    xk = x.to(ks[0].in_dtype)
                    out = torch.empty_like(xk)
                    roof = roof_now(dev)
                    tm, td = bench([lambda k=k: k(xk, out=out, gate=gate, t=thr) for k in ks], dev, against=dense_fns[base])
                    by = ffn_bytes(d, h, dt, n_on)
                    # silu: 16-bit weights move W1 x, so units near the threshold can cross it: count what ran
                    assert ks[0].last_active is None or abs(ks[0].last_active - n_on) <= (gate == "silu") * h // 100, \
                        (ks[0].last_active, n_on)
                    if gate == "silu" and ks[0].last_active is not None:
                        by = ffn_bytes(d, h, dt, ks[0].last_active)
                    name = {"c": f"C {variant}", "cuda": "CUDA sparse", "torch": "torch gather"}[backend]
                    show(dict(device=dev, impl=name, dtype=str(dt)[6:], d=d, h=h, B=B, s=float(s), s_token=s_tok, roof_GBps=roof,
                              active=n_on, time_ms=tm * 1e3, GBps=by / tm / 1e9, roof_pct=100 * by / tm / 1e9 / roof,
                              dense_ms=td * 1e3, speedup=td / tm, ideal=3 * d * h * base.itemsize / by, gate=gate, t=thr))
                    del ks

# -----------------------------------------------------------------------------
# a trained checkpoint: real sparsity per layer, and the kernels on its real FFN inputs


def ckpt_table(dev):
    """The checkpoint's model with its inference act (relu for train.py's runs; a GGUF's silu, made sparse by
    --cats thresholds): per layer, its sparsity on val text and the kernels on its real FFN inputs."""
    model = GPT.from_checkpoint(ckpt_state, dev).eval()
    act = ckpt_state.get("config", {}).get("eval_act", "relu")
    model.set_act(act if act in ("relu", "silu") else "relu")
    T = min(model.config.block_size, ckpt_state.get("config", {}).get("block_size", 256))
    windows = lambda path, n: torch.from_numpy(np.stack([
        val[i:i + T].astype(np.int64) for val in [np.memmap(path, dtype=np.uint16, mode="r")]
        for i in np.linspace(0, len(val) - T - 1, n).astype(int)])).to(dev)
    if cats:
        ts = model.calibrate_thresholds(windows(os.path.join(data_dir, "train.bin"), 16).split(4), cats / 100)
        print(f"\nCATS: thresholds for {cats:g}% zero units per layer on 16 x {T} training tokens: "
              + " ".join(f"{t:.3g}" for t in ts))
    path = os.path.join(data_dir, "val.bin")
    idx = windows(path, 8)
    inputs = []
    hooks = [b.ffn.register_forward_hook(lambda m, a, y: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
             for b in model.blocks]
    with torch.no_grad(), model.ffn_stats() as stats:
        model(idx, targets=idx)
    for hk in hooks:
        hk.remove()
    print(f"\n{ckpt}: {model.config.n_layer} layers, d={model.config.n_embd}, h={model.config.ffn_hidden}; "
          f"{idx.numel()} tokens of {path}, act={model.config.act}" + (f", CATS at {cats:g}%" if cats else ""))
    print("s% = zero units per token, dead% = zero on every token, B=4 / B=16 s% = zero for all of 4 / 16\n"
          "consecutive tokens (the union a batch would see); times: batch 1, 64 of the real tokens in turn")
    print(f"{'layer':>5s} {'s%':>6s} {'dead%':>6s} {'B=4 s%':>8s} {'B=16 s%':>9s} {'dense ms':>9s} "
          + " ".join(f"{'sparse ' + str(dt)[6:]:>16s}" for dt in dev_dtypes(dev)))
    for l, (block, st, xs) in enumerate(zip(model.blocks, stats, inputs)):
        f = block.ffn
        u = gate_t(xs @ f.w1.weight.T, f.act, f.threshold) != 0  # (tokens, h) active
        union = lambda B: 100 * (1 - u[: len(u) // B * B].view(-1, B, u.shape[1]).any(1).float().mean().item())
        rows_ = [xs[i:i + 1].contiguous() for i in range(0, len(xs), max(1, len(xs) // 64))]  # 64 real tokens
        w = (block.ffn.w1.weight, block.ffn.w3.weight, block.ffn.w2.weight)
        g = F.relu if f.act == "relu" else F.silu  # the dense FFN, without thresholds
        td = bench([lambda r=r: F.linear(g(F.linear(r, w[0])) * F.linear(r, w[1]), w[2]) for r in rows_], dev)
        row = dict(device=dev, impl="ckpt layer", layer=l, s=100 * st["sparsity"], dead=100 * st["dead"],
                   union4=union(4), union16=union(16), dense_ms=td * 1e3)
        cells = []
        for dt in dev_dtypes(dev):
            k = sparse_ffn.SparseFFN(block.ffn, dtype=dt)
            t = bench([lambda r=r.to(k.in_dtype): k(r, gate=f.act, t=f.threshold) for r in rows_], dev)
            row[f"sparse_{str(dt)[6:]}_ms"] = t * 1e3
            cells.append(f"{t * 1e3:7.3f} ms {td / t:4.2f}x")
        rows.append(row)
        print(f"{l:5d} {row['s']:6.1f} {row['dead']:6.1f} {row['union4']:8.1f} {row['union16']:9.1f} {td * 1e3:9.3f} "
              + " ".join(f"{c:>16s}" for c in cells))
    return model

# -----------------------------------------------------------------------------

busy0, t_self0 = cpu_busy(), time.process_time()
meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_name(), argv=sys.argv[1:])
print(f"bench.py: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_name()} "
      f"({os.cpu_count()} logical CPUs), Python {platform.python_version()}")
print(f"backends: {sparse_ffn.backends()}; C kernel: {sparse_ffn.c_info()}")
for dev in device_list:
    if dev == "cuda":  # the rules let cuda through only when this torch sees a GPU
        meta["gpu"] = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
        print(f"\nGPU: {meta['gpu']}")
    rd, cp, rd_huge = read_bandwidth(dev)
    meta[f"roof_{dev}"] = dict(read_GBps=rd, copy_GBps=cp, read_huge_GBps=rd_huge)
    huge_note = f"; on huge pages, as the kernels' weights are, the {roof_mb} MiB sum reads {rd_huge:.1f} GB/s" if rd_huge else ""
    print(f"\n[{dev}] memory: read {rd:.1f} GB/s ({roof_mb} MiB sum), copy {cp:.1f} GB/s ({roof_mb} MiB copy, read + write "
          f"counted){huge_note}.\nThe kernels only read: 'roof' below is the read GB/s of a {roof_mb // 4} MiB sum"
          f"{' on huge pages' if rd_huge else ''} measured just before each row (it drifts on a shared host),\n"
          "'%1GiB' the same GB/s against the 1 GiB read (PyTorch's allocator, no huge pages)")
    print("s% = hidden units zero for the whole batch (the union), tok% = zero per token; GB/s = bytes that\n"
          "must move / median time (W1 + the active W3 rows and W2 columns); speedup over torch dense "
          f"({'fp32' if dev == 'cpu' else 'same dtype'}),\ntimed in blocks alternating with the row's; "
          "ideal = dense bytes / these bytes (the speedup at equal GB/s).\nRows whose weights fit in cache (small d, h) "
          "can beat the roof.")
    kernel_table(dev)
    ctx = bench_e2e.Settings(e2e_tokens, dev_dtypes, full, compiled, llama, origin_gguf if ckpt else None, bench, sync,
                             roof_now, rows)
    if ckpt:
        e2e_model = ckpt_table(dev)
        if e2e:
            val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
            bench_e2e.e2e_table(ctx, dev, e2e_model, f"checkpoint {ckpt}", torch.from_numpy(val[:16].astype(np.int64))[None].to(dev))
    if e2e and synthetic:
        prompt = torch.randint(512, (1, 16), device=dev)
        bench_e2e.e2e_table(ctx, dev, bench_e2e.sparse_model(dev, prompt, e2e_tokens), "random d=2048 h=8192, 2 layers, "
                            "vocab 512, W1 biased to ~90% sparsity", prompt)
if busy0:
    busy1, ncpu = cpu_busy(), os.cpu_count()
    ours = (time.process_time() - t_self0) * os.sysconf("SC_CLK_TCK")
    others = 100 * max(0.0, (busy1[0] - busy0[0] - ours) / max(1, busy1[1] - busy0[1]))
    meta["others_cpu_pct"] = others
    print(f"\nother processes used {others:.0f}% of the {ncpu} CPUs during this run"
          + (": the machine was shared, timings are noisy" if others > 10 else ""))
if json:
    from lib.configurator import strict_json
    with open(json, "w") as f:
        f.write(strict_json(dict(meta, rows=rows), indent=1))
    print(f"wrote {len(rows)} rows to {json}")
