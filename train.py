"""
Pre-train with stochastic activations (StochA), then switch to RELU for the final fraction alpha of
the steps (Swi+FT), so that the model comes out with a sparse FFN. Baselines are flags:

    python train.py --p=0.5                                     # StochA for 90% of the steps, then RELU (the default)
    python train.py --act=silu --alpha=0 --out_dir=out-silu     # SILU, no switch
    python train.py --act=relu --out_dir=out-relu               # RELU from scratch
    python train.py --act=silu --alpha=0.1 --out_dir=out-swift  # Swi+FT from SILU
    python train.py --init_from=out-silu/ckpt.pt --out_dir=out-cpt --act=stoch --max_iters=200  # continued pre-training
    python train.py --init_from=resume                          # continue out/ckpt.pt's run exactly (also after Ctrl-C)
    python train.py config/gpu.py                               # a config file of `key = value` lines, then flags
    torchrun --standalone --nproc_per_node=2 train.py --out_dir=out-ddp  # DDP (gloo on CPU, nccl on CUDA)

Each run has its own out_dir: out/, the default, is the main job's, which sample.py and bench.py read by
default. These are the README's commands (a test runs them).

Writes out_dir/ckpt.pt (atomically, at every eval, on Ctrl-C / SIGTERM and at the end),
out_dir/log.jsonl (every logged row) and out_dir/summary.json.

What a checkpoint fixes (SHAPE and RUN below). --init_from=resume continues its run exactly: the model's
shape, and the method, schedule, optimizer, batches and data (act, p, alpha, eval_act, max_iters, lr,
min_lr, warmup_iters, batch_size, grad_accum, weight_decay, betas, grad_clip, dropout, seed, data) are
the checkpoint's, and a flag or config-file value that differs from them is refused with one line, since
it would change a run that is partly done (a new max_iters or alpha moves the switch to RELU and the
learning rate's cosine). What may differ on resume only says how the rest is carried out: evaluation
(eval_interval, eval_iters, final_eval_iters), log_interval, data_root (where the tokens are cached),
device, dtype and compile. --init_from=<ckpt> starts a new run from another run's weights: the weights
fix the model's shape (a different shape flag is refused), everything else is this run's own.
"""

import gc
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (ConfigError, between, cli, configure, device as device_rule, either, existing_dir, existing_file,
                          is_setting, new_dir, one_of, positive_int, strict_json)
from data import VOCAB_RULE, prepare, token_bytes, tokenizer, tokenizer_name
from model import ACTS, GPT, GPTConfig, load_checkpoint

# -----------------------------------------------------------------------------
# defaults: a run that finishes in about ten minutes on a 2-core laptop CPU
out_dir = "out"
data = "shakespeare"  # or a .txt file / a folder of .txt files
data_root = "data"  # where tokenized corpora are cached
vocab = 4096  # GPT-2's BPE cut to its first vocab-1 merges + <|endoftext|>; 50257 = GPT-2's own
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), or a checkpoint path (continued pre-training)
# the method
act = "stoch"  # the activation before the switch: "stoch", "silu" or "relu"
p = 0.5  # StochA: probability of silu for a negative input
alpha = 0.1  # the final fraction of the steps trained with relu (Swi+FT); 0 = no switch
eval_act = "auto"  # the inference activation; auto = relu, or silu for a SILU run with alpha=0
# model: 4.0M parameters, 3.2M of them the transformer body (deeper and narrower is sparser)
n_layer = 8
n_head = 4
n_kv_head = 2
n_embd = 192
ffn_hidden = 0  # 0 = 8/3 * n_embd rounded up to 64
block_size = 128
dropout = 0.0
# optimizer: AdamW, linear warmup then cosine decay to min_lr
batch_size = 8  # sequences per micro-step, per process
grad_accum = 1
max_iters = 1500  # 1.5M tokens, about one pass over the corpus
lr = 3e-3  # with 2e-3 the RELU model ends less sparse; 4e-3 kills units
min_lr = 3e-4
warmup_iters = 100
weight_decay = 0.3
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation and logging
eval_interval = 250  # evaluate and checkpoint every eval_interval steps
eval_iters = 12  # validation batches per evaluation (always the same ones)
final_eval_iters = 40  # validation batches for summary.json
log_interval = 25
# system
device = "auto"  # auto = cuda > mps > cpu
dtype = "auto"  # auto = bfloat16 on CUDA when supported, else float32
compile = None  # None = torch.compile where it works: CUDA, or a CPU with a C++ compiler
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if is_setting(k, v)}

# bf16 dense tensor-core peaks (FLOP/s) for MFU; an unknown GPU gets no MFU rather than a wrong one
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


RULES = dict(
    out_dir=new_dir, data=either(one_of("shakespeare"), existing_file, existing_dir), data_root=new_dir,
    vocab=VOCAB_RULE, init_from=either(one_of("scratch", "resume"), existing_file),
    act=one_of(*ACTS), p=between(0, 1), alpha=between(0, 1), eval_act=one_of("auto", *ACTS),
    n_layer=positive_int, n_head=positive_int, n_kv_head=positive_int, n_embd=positive_int,
    ffn_hidden=between(0, integer=True), block_size=positive_int, dropout=between(0, 1, hi_open=True),
    batch_size=positive_int, grad_accum=positive_int, max_iters=positive_int, lr=between(0, lo_open=True),
    min_lr=between(0), warmup_iters=between(0, integer=True), weight_decay=between(0), beta1=between(0, 1, hi_open=True),
    beta2=between(0, 1, hi_open=True), grad_clip=between(0), eval_interval=positive_int, eval_iters=positive_int,
    final_eval_iters=positive_int, log_interval=positive_int, device=device_rule,
    dtype=one_of("auto", "float32", "bfloat16", "float16"), compile=one_of(None, True, False), seed=between(0, integer=True),
)


def check_config(C):
    """What the rules cannot see alone: settings that constrain each other."""
    if C.min_lr > C.lr:
        raise ConfigError(f"min_lr={C.min_lr} must not exceed lr={C.lr}")
    GPTConfig(vocab_size=C.vocab, block_size=C.block_size, n_layer=C.n_layer, n_head=C.n_head, n_kv_head=C.n_kv_head,
              n_embd=C.n_embd, ffn_hidden=C.ffn_hidden, act=C.act, p=C.p, dropout=C.dropout)  # head sizes etc.


def compile_choice(setting, device_type):
    """(use torch.compile?, why). Auto compiles on CUDA, and on a CPU when a C++ compiler is
    there for inductor (1.3x faster training on 2 CPU cores); never on MPS (experimental)."""
    if setting is not None:
        return setting, "set by --compile"
    if device_type == "cuda":
        return True, "CUDA"
    if device_type == "cpu":
        cxx = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("clang++") or shutil.which("c++")
        return (True, f"CPU, C++ compiler {cxx}") if cxx else (False, "CPU without a C++ compiler")
    return False, f"not on {device_type}"


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return name  # the rules checked that it exists


def get_batch(path, gen, batch_size, block_size, device):
    data = np.memmap(path, dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT, to avoid a leak
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it, C):
    if it < C.warmup_iters:
        return C.lr * (it + 1) / (C.warmup_iters + 1)
    progress = (it - C.warmup_iters) / max(1, C.max_iters - C.warmup_iters)
    return C.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (C.lr - C.min_lr)


@torch.no_grad()
def evaluate(model, act, p, val_path, C, device, ctx, n_batches, tbytes):
    """Mean validation loss (nats per token), bits per byte and per-layer FFN stats with the given
    activation, on fixed batches. tbytes[id] is a token's length in UTF-8 bytes, so bits per byte =
    summed nats / summed bytes / ln 2, comparable across tokenizers. The RNG is forked so that
    evaluating never changes what training draws (exact resume)."""
    devices = [torch.cuda.current_device()] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        was_act, was_p = model.config.act, model.config.p
        model.eval()
        model.set_act(act, p)
        gen = torch.Generator().manual_seed(1234)
        nats, n_bytes = 0.0, 0
        with model.ffn_stats() as layers:
            for _ in range(n_batches):
                x, y = get_batch(val_path, gen, C.batch_size, C.block_size, device)
                with ctx:
                    nats += model(x, y)[1].item() * y.numel()  # the mean over the batch's tokens, summed
                n_bytes += tbytes[y].sum().item()
        model.set_act(was_act, was_p)
        model.train()
    return dict(loss=nats / (n_batches * C.batch_size * C.block_size), bpb=nats / max(n_bytes, 1) / math.log(2),
                sparsity=sum(l["sparsity"] for l in layers) / len(layers),
                dead=sum(l["dead"] for l in layers) / len(layers), layers=layers)


def save_checkpoint(path, raw_model, optimizer, C, it, data_gen, rank, world):
    """Every rank's RNG states go into rank 0's file, so a DDP run resumes exactly too."""
    rng = dict(torch=torch.get_rng_state(), data=data_gen.get_state(),
               cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() and C.device.startswith("cuda") else None)
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if rank == 0:
        ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=asdict(raw_model.config),
                    config=vars(C), iter_num=it, rng=rngs)
        tmp = path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def read_log(path):
    """The rows of a log.jsonl. A run killed mid-append can leave a torn last line; the checkpoint,
    not the log, is the truth, so unreadable lines are dropped, and said so, rather than fatal."""
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("iter"), int) and row.get("kind") in ("train", "eval"):
                    rows.append(row)
                    continue
            except ValueError:
                pass
            bad += line.strip() != ""
    if bad:
        print(f"{path}: dropped {bad} unreadable line(s), e.g. torn by a kill mid-write")
    return rows


def log_row(C, master, **row):
    if master:
        with open(os.path.join(C.out_dir, "log.jsonl"), "a") as f:
            f.write(strict_json(row) + "\n")


# What a checkpoint fixes. SHAPE: its weights fix the model (setting -> GPTConfig field), for
# --init_from=resume and for --init_from=<ckpt> alike. RUN: what makes a run the run it is (its method,
# schedule, optimizer, batches and data), which --init_from=resume continues exactly. A value on the
# command line (or in a config file) that differs from the checkpoint's is refused with one line; the
# settings in neither list only say how the run is carried out, and may change on resume.
SHAPE = dict(vocab="vocab_size", n_layer="n_layer", n_head="n_head", n_kv_head="n_kv_head", n_embd="n_embd",
             ffn_hidden="ffn_hidden", block_size="block_size")
RUN = ("data", "act", "p", "alpha", "eval_act", "dropout", "max_iters", "lr", "min_lr", "warmup_iters", "batch_size",
       "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip", "seed")


def inference_act(eval_act, act, alpha):
    """eval_act with auto resolved: relu, or silu for a SILU run with no switch."""
    if eval_act != "auto":
        return eval_act
    return "silu" if act == "silu" and alpha == 0 else "relu"


def refuse_changes(overrides, path, model_args, saved_config=None):
    """One ConfigError naming every setting given with another value than the checkpoint at `path`
    fixes: its model's shape, and with saved_config (resume) the run's RUN settings. Returns the
    fixed values, which the caller takes."""
    shape = {k: model_args[m] for k, m in SHAPE.items()}
    given = dict(overrides)
    if given.get("ffn_hidden") == 0:  # 0 = the default size for the model's width
        given["ffn_hidden"] = GPTConfig(n_embd=shape["n_embd"], n_head=shape["n_head"], n_kv_head=shape["n_kv_head"],
                                        ffn_hidden=0).ffn_hidden
    changed = [k for k in SHAPE if k in given and given[k] != shape[k]]
    if changed:
        raise ConfigError(f"{' and '.join(f'--{k}={overrides[k]}' for k in changed)}, but the checkpoint's model has "
                          f"{' and '.join(f'{k} {shape[k]}' for k in changed)} ({path}): its weights fix the model's shape")
    if saved_config is None:
        return shape
    run = {k: saved_config[k] for k in RUN if k in saved_config}
    if "eval_act" in given:
        given["eval_act"] = inference_act(given["eval_act"], run.get("act"), run.get("alpha"))
    same = lambda k: given[k] == run[k] or k == "data" and os.path.normpath(given[k]) == os.path.normpath(run[k])
    changed = [k for k in RUN if k in given and k in run and not same(k)]
    if changed:
        raise ConfigError(f"{' and '.join(f'--{k}={given[k]}' for k in changed)}, but {path} was trained with "
                          f"{' and '.join(f'{k}={run[k]}' for k in changed)}; resume continues that run exactly "
                          f"(start a new run from its weights with --init_from={path} to change it)")
    return dict(shape, **run)


def main(argv):
    cfg = dict(DEFAULTS)
    overrides = configure(cfg, argv, RULES)
    ckpt = source = None
    if cfg["init_from"] == "resume":  # the saved run, with only what does not change it changed
        out_dir = cfg["out_dir"]
        path = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path)
        fixed = refuse_changes(overrides, path, ckpt["model_args"], ckpt["config"])
        cfg.update({k: v for k, v in ckpt["config"].items() if k in DEFAULTS})
        cfg.update(overrides)
        cfg.update(fixed, init_from="resume", out_dir=out_dir)  # written where it was read
    elif cfg["init_from"] != "scratch":  # continued pre-training from another run's weights: a new run
        source = load_checkpoint(cfg["init_from"])
        cfg.update(refuse_changes(overrides, cfg["init_from"], source["model_args"]))
    if ckpt is not None or source is not None:
        configure(cfg, [], RULES)  # the checkpoint's saved settings pass the same rules
    C = SimpleNamespace(**cfg)
    check_config(C)

    ddp = int(os.environ.get("RANK", -1)) != -1
    C.device = pick_device(C.device)
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if C.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if C.device.startswith("cuda"):
            C.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(C.device)
    master = rank == 0
    device_type = C.device.split(":")[0]
    if C.dtype == "auto":
        C.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = getattr(torch, C.dtype)
    ctx = torch.autocast(device_type, dtype=ptdtype) if device_type == "cuda" and C.dtype != "float32" else nullcontext()
    use_compile, compile_why = compile_choice(C.compile, device_type)
    C.eval_act = inference_act(C.eval_act, C.act, C.alpha)  # resolved, so that checkpoints carry it for sample.py
    eval_act = C.eval_act
    switch_iter = C.max_iters - round(C.alpha * C.max_iters)  # act before it, relu from it on

    data_dir = prepare(C.data, C.data_root, C.vocab) if master else None
    if ddp:  # rank 0 prepares the data once, the others wait for it
        box = [data_dir]
        dist.broadcast_object_list(box, src=0)
        data_dir = box[0]
    C.data_dir = data_dir  # stored in checkpoints, so that sample.py, bench.py, experiments.py read the same ids
    train_path, val_path = os.path.join(data_dir, "train.bin"), os.path.join(data_dir, "val.bin")
    tbytes = torch.from_numpy(token_bytes(tokenizer(C.vocab))).to(C.device)
    for path in (train_path, val_path):
        n = os.path.getsize(path) // 2
        if n <= C.block_size:
            raise ConfigError(f"{path} holds {n} tokens, not more than block_size={C.block_size}: "
                             "use more text or a smaller --block_size")

    torch.manual_seed(C.seed + rank)
    data_gen = torch.Generator().manual_seed(C.seed + 1000 + rank)
    if source is not None:  # continued pre-training from another run's weights
        model_args = dict(source["model_args"], act=C.act, p=C.p, dropout=C.dropout)
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(source["model"])
        del source
    else:  # from scratch, or resuming this run's own checkpoint
        model_args = ckpt["model_args"] if ckpt is not None else dict(
            vocab_size=C.vocab, block_size=C.block_size, n_layer=C.n_layer, n_head=C.n_head, n_kv_head=C.n_kv_head,
            n_embd=C.n_embd, ffn_hidden=C.ffn_hidden, act=C.act, p=C.p, dropout=C.dropout)
        model = GPT(GPTConfig(**model_args))
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
    model.to(C.device)
    raw = model

    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=C.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                                  lr=C.lr, betas=(C.beta1, C.beta2), fused=device_type == "cuda")
    start_iter = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = ckpt["iter_num"]
        if len(ckpt["rng"]) == world:
            rng = ckpt["rng"][rank]
            torch.set_rng_state(rng["torch"])
            data_gen.set_state(rng["data"])
            if rng["cuda"] is not None and device_type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        elif master:
            print(f"warning: checkpoint written by {len(ckpt['rng'])} processes, resuming with {world}: "
                  "the data order and StochA draws will differ from an uninterrupted run")
        del ckpt
    scaler = torch.amp.GradScaler(device_type, enabled=C.dtype == "float16")

    def wrap(compiled):
        m = torch.compile(raw) if compiled else raw
        return DDP(m, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None) if ddp else m
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if use_compile and device_type == "cpu":
        # inductor's CPU kernels accumulate the embedding's gradient with atomic adds, in a different
        # order each run; deterministic mode keeps compiled training (and resume) bit-exact
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill: nothing reads it
    model = wrap(use_compile)

    if master:
        os.makedirs(C.out_dir, exist_ok=True)
        if os.path.exists(os.path.join(C.out_dir, "ckpt.pt.tmp")):  # left by a kill mid-save: never read
            os.remove(os.path.join(C.out_dir, "ckpt.pt.tmp"))
        log_path = os.path.join(C.out_dir, "log.jsonl")
        if start_iter == 0:
            open(log_path, "w").close()
        elif os.path.exists(log_path):  # drop rows from after the checkpoint: they are about to be redone
            rows = read_log(log_path)
            with open(log_path, "w") as f:
                # a train row's iter counts the steps done (kept up to start_iter); evals at start_iter rerun
                f.writelines(strict_json(r) + "\n" for r in rows if r["iter"] < start_iter
                             or (r["iter"] == start_iter and r["kind"] == "train"))
        tokens_per_iter = C.batch_size * C.block_size * C.grad_accum * world
        name = torch.cuda.get_device_name() if device_type == "cuda" else device_type
        print(f"device {C.device} ({name}), dtype {C.dtype}, compile {use_compile} ({compile_why}), "
              f"processes {world}, threads {torch.get_num_threads()}")
        print(f"model: {raw.num_params() / 1e6:.2f}M parameters, {raw.config.n_layer} layers, d={raw.config.n_embd}, "
              f"ffn_hidden={raw.config.ffn_hidden}; data {data_dir}; {tokens_per_iter:,} tokens per step")
        print(f"schedule: {C.act}" + (f" (p={C.p})" if C.act == "stoch" else "") + f" for steps [0, {switch_iter})"
              + (f", relu for [{switch_iter}, {C.max_iters}) (alpha={C.alpha})" if switch_iter < C.max_iters else "")
              + f"; evaluated with {eval_act}")
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device_type == "cuda" and C.dtype != "float32" else None
    flops_per_token = 6 * raw.num_params() + 12 * raw.config.n_layer * raw.config.n_embd * C.block_size

    stop = []  # set by Ctrl-C / SIGTERM: checkpoint at the next step boundary, then exit
    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if master:
            print(f"\nsignal {signum}: checkpointing at the next step (again to abort)", flush=True)
    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def step():  # one optimizer step's forwards and backwards; `model` may change to eager
        loss_sum = 0.0
        for micro in range(C.grad_accum):
            x, y = get_batch(train_path, data_gen, C.batch_size, C.block_size, C.device)
            sync = nullcontext() if not ddp or micro == C.grad_accum - 1 else model.no_sync()
            with sync, ctx:
                loss = model(x, y)[1] / C.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    ckpt_path = os.path.join(C.out_dir, "ckpt.pt")
    run_start = time.time()
    t0, tokens = time.time(), 0
    it = start_iter
    compiling = True
    timed = [0, 0.0]  # tokens and seconds of the logged training steps, for the summary's tokens/s
    while True:
        cur_act = C.act if it < switch_iter else "relu"
        if raw.config.act != cur_act:
            raw.set_act(cur_act, C.p)
            compiling = True
            if master and it > start_iter:
                print(f"iter {it}: switching the FFN activation to {cur_act} (Swi+FT)")
        lr = get_lr(it, C)
        for group in optimizer.param_groups:
            group["lr"] = lr

        halt = bool(stop)
        if ddp:  # every process must stop at the same step
            flag = torch.tensor([float(halt)], device=C.device)
            dist.all_reduce(flag)
            halt = flag.item() > 0
        if (it % C.eval_interval == 0 or it == C.max_iters) and master and not halt:
            t_eval = time.time()
            res = evaluate(raw, cur_act, C.p, val_path, C, C.device, ctx, C.eval_iters, tbytes)
            row = dict(kind="eval", iter=it, act=cur_act, val_loss=res["loss"], val_bpb=res["bpb"])
            if eval_act != cur_act:
                res = evaluate(raw, eval_act, C.p, val_path, C, C.device, ctx, C.eval_iters, tbytes)
            row.update(eval_act=eval_act, val_loss_infer=res["loss"], val_bpb_infer=res["bpb"], sparsity=res["sparsity"],
                       dead=res["dead"])
            log_row(C, master, **row)
            print(f"iter {it}: val loss {row['val_loss']:.4f} ({cur_act}), {res['loss']:.4f} nats/token = "
                  f"{res['bpb']:.3f} bits/byte ({eval_act}), {eval_act} sparsity {100 * res['sparsity']:.1f}%, "
                  f"dead units {100 * res['dead']:.1f}%")
            t0 += time.time() - t_eval  # tokens/s counts training time only
        if (it % C.eval_interval == 0 and it > start_iter) or it == C.max_iters or halt:
            save_checkpoint(ckpt_path, raw, optimizer, C, it, data_gen, rank, world)
        if it == C.max_iters or halt:
            break

        compiled_now = use_compile and compiling
        if compiled_now:  # the first step, and the first after the switch, compile
            t_compile = time.time()
            rng = (torch.get_rng_state(), data_gen.get_state(),
                   torch.cuda.get_rng_state() if device_type == "cuda" else None)
            try:
                loss_sum = step()
            except Exception as e:  # inductor needs a working compiler and toolchain: fall back to eager
                if master:
                    first_line = (str(e).strip().splitlines() or [""])[0][:200]
                    print(f"torch.compile failed ({type(e).__name__}: {first_line}); "
                          "training eagerly (--compile=False skips the attempt)")
                torch.set_rng_state(rng[0])  # redo the step exactly as it would have run
                data_gen.set_state(rng[1])
                if rng[2] is not None:
                    torch.cuda.set_rng_state(rng[2])
                optimizer.zero_grad(set_to_none=True)
                use_compile = False
                model = wrap(False)
                loss_sum = step()
            else:
                if master:
                    print(f"iter {it}: compiled the {cur_act} training step in {time.time() - t_compile:.0f} s")
        else:
            loss_sum = step()
        if C.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), C.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        tokens += C.batch_size * C.block_size * C.grad_accum * world
        it += 1
        if compiled_now:  # tokens/s counts training, not compiling
            compiling = False
            t0, tokens = time.time(), 0

        if it % C.log_interval == 0 and master:
            dt = time.time() - t0
            tok_s = tokens / dt if tokens else None  # None right after a compiling step
            timed[0] += tokens
            timed[1] += dt if tokens else 0.0
            loss_val = loss_sum.item()
            mfu = f", MFU {100 * flops_per_token * tok_s / (peak * world):.1f}%" if peak and tok_s else ""
            speed = f"{tok_s:,.0f} tok/s" if tok_s else "compiling"
            print(f"iter {it}: loss {loss_val:.4f}, lr {lr:.2e}, act {cur_act}, {speed}{mfu}", flush=True)
            log_row(C, master, kind="train", iter=it, loss=loss_val, lr=lr, act=cur_act, tok_per_s=tok_s)
            t0, tokens = time.time(), 0

    seconds = time.time() - run_start
    summary = None
    if master and it == C.max_iters and not halt:
        res = evaluate(raw, eval_act, C.p, val_path, C, C.device, ctx, C.final_eval_iters, tbytes)
        summary = dict(val_loss=res["loss"], val_bpb=res["bpb"], sparsity=res["sparsity"], dead_fraction=res["dead"], act=C.act, p=C.p,
                       alpha=C.alpha, eval_act=eval_act, switch_iter=switch_iter, iters=C.max_iters,
                       tokens=C.max_iters * C.batch_size * C.block_size * C.grad_accum * world,
                       seconds=round(seconds, 1), train_tok_per_s=round(timed[0] / timed[1]) if timed[1] else None,
                       compile=use_compile, vocab=C.vocab, tokenizer=tokenizer_name(C.vocab), resumed_from=start_iter, device=C.device,
                       device_name=torch.cuda.get_device_name() if device_type == "cuda" else device_type,
                       threads=torch.get_num_threads(), processes=world, dtype=C.dtype, params=raw.num_params(),
                       val_tokens=C.final_eval_iters * C.batch_size * C.block_size, data=data_dir,
                       sparsity_per_layer=[l["sparsity"] for l in res["layers"]],
                       dead_per_layer=[l["dead"] for l in res["layers"]])
        with open(os.path.join(C.out_dir, "summary.json"), "w") as f:
            f.write(strict_json(summary, indent=1))
        print(f"done in {seconds:.0f} s: val loss {summary['val_loss']:.4f} nats/token = {summary['val_bpb']:.3f} bits/byte "
              f"with {eval_act}, FFN sparsity {100 * summary['sparsity']:.1f}% (layers "
              f"{' / '.join(f'{100 * s:.0f}' for s in summary['sparsity_per_layer'])}), dead units "
              f"{100 * summary['dead_fraction']:.1f}%, training {summary['train_tok_per_s'] or 0:,} tok/s "
              f"-> {os.path.join(C.out_dir, 'summary.json')}")
    elif master and halt:
        print(f"stopped at iter {it}; continue with: python train.py --init_from=resume --out_dir={C.out_dir}")
    for s, handler in old_handlers.items():
        signal.signal(s, handler)
    torch.use_deterministic_algorithms(was_deterministic)
    if ddp:
        # DDP's reducer holds the process group: dropped here, gloo's threads stop while Python is whole (with
        # the group alive until exit, rank 1 aborted at exit in ~1 run of 16 on 2 busy cores: "terminate called
        # without an active exception"). Then together, so that no rank tears gloo down while rank 0 evaluates
        model = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    # On Linux, glibc hands every freed 200 MB logits buffer back to the OS and faults it in again at
    # the next step: a third of a CPU step went to the kernel. Keeping freed memory in the heap
    # (measured: 407 -> ~600 tok/s, 1 thread) needs these set before the process starts, so re-exec.
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    cli(main)
