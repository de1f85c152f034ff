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
fix the model's shape (a different shape flag is refused), everything else is this run's own. --init_from=FILE.gguf
(or a model name: smollm2) does the same from a llama-architecture GGUF file (lib/gguf_io.py): its weights, and its
tokenizer, which then tokenizes the corpus (data/<corpus>/<its name>/) and goes with every checkpoint of the run
(--tokenizer). config/smollm2.py holds the settings for SmolLM2-135M on 2 cores.

main(), at the bottom, is the run step by step, the switch to RELU in its loop. lib/checkpoint.py holds what
a checkpoint stores and fixes; lib/runtime.py how the run is carried out (DDP, device, compile, Ctrl-C, tok/s).
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from lib.checkpoint import inference_act, load_any, load_training_state, log_row, open_out_dir, refuse_changes, save_checkpoint
from lib.checkpoint import read_log  # noqa: F401 (experiments/run.py and the tests read logs through train)
from lib.configurator import (ConfigError, between, cli, configure, device as device_rule, either, existing_dir, existing_file,
                          is_setting, new_dir, one_of, positive_int, strict_json)
from lib.data import VOCAB_RULE, check_vocab, get_tokenizer, prepare, token_bytes
from lib.gguf_io import MODELS
from model import ACTS, GPT, GPTConfig, load_checkpoint
from lib.runtime import (Throughput, any_stop, autocast, catch_stop_signals, compile_choice, compiled_step,
                     deterministic_if_compiled, device_name, end_ddp, peak_flops, pick_device, setup_ddp, wrap)

# -----------------------------------------------------------------------------
# defaults: a run that finishes in about ten minutes on a 2-core laptop CPU
out_dir = "out"
data = "shakespeare"  # or a .txt file / a folder of .txt files
data_root = "data"  # where tokenized corpora are cached
vocab = 4096  # GPT-2's BPE cut to its first vocab-1 merges + <|endoftext|>; 50257 = GPT-2's own
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), or a checkpoint or GGUF path (continued pre-training)
tokenizer = "gpt2"  # "gpt2" (cut to vocab), or a GGUF file's own; an --init_from checkpoint or GGUF fixes it
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

RULES = dict(
    out_dir=new_dir, data=either(one_of("shakespeare"), existing_file, existing_dir), data_root=new_dir,
    vocab=VOCAB_RULE, init_from=either(one_of("scratch", "resume", *MODELS), existing_file),
    tokenizer=either(one_of("gpt2"), existing_file),
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
    if C.tokenizer == "gpt2":
        check_vocab(C.vocab)
    GPTConfig(vocab_size=C.vocab, block_size=C.block_size, n_layer=C.n_layer, n_head=C.n_head, n_kv_head=C.n_kv_head,
              n_embd=C.n_embd, ffn_hidden=C.ffn_hidden, act=C.act, p=C.p, dropout=C.dropout)  # head sizes etc.


# -----------------------------------------------------------------------------
# the run's settings: what the command line asks for, and what a checkpoint fixes

def resolve_config(argv):
    """The defaults, then config files and flags, checked by RULES. Resume takes the saved run, with
    only what does not change it changed; --init_from=<ckpt> takes the weights' shape. Returns
    (C, the checkpoint to resume or None, the checkpoint whose weights start a new run or None)."""
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
    elif cfg["init_from"] != "scratch":  # continued pre-training from another run's (or a GGUF's) weights: a new run
        source = load_any(cfg["init_from"], cfg["block_size"])
        cfg.update(refuse_changes(overrides, cfg["init_from"], source["model_args"]))
    saved = (ckpt or source or {}).get("config", {})
    if ckpt is not None or source is not None:  # the weights fix the tokenizer, as they fix the vocabulary's size
        tok = saved.get("tokenizer", "gpt2")
        if overrides.get("tokenizer", tok) != tok:
            raise ConfigError(f"--tokenizer={overrides['tokenizer']}, but {cfg['init_from']}'s model reads {tok}")
        cfg["tokenizer"] = tok
    if ckpt is not None or source is not None:
        configure(cfg, [], RULES)  # the checkpoint's saved settings pass the same rules
    C = SimpleNamespace(**cfg)
    check_config(C)
    return C, ckpt, source


# -----------------------------------------------------------------------------
# data, model, optimizer

def setup_data(C, master, ddp):
    """Tokenize the corpus once (rank 0 does, the others wait) into C.data_dir, which checkpoints keep so
    that sample.py, bench.py and experiments/run.py read the same ids. Returns train.bin's and val.bin's
    paths and every token's length in bytes (for bits per byte)."""
    data_dir = prepare(C.data, C.data_root, C.vocab, C.tokenizer) if master else None
    if ddp:
        box = [data_dir]
        dist.broadcast_object_list(box, src=0)
        data_dir = box[0]
    C.data_dir = data_dir
    train_path, val_path = os.path.join(data_dir, "train.bin"), os.path.join(data_dir, "val.bin")
    enc = get_tokenizer(C.tokenizer, C.vocab)
    C.tokenizer_name = enc.name  # in every checkpoint: sample.py, bench.py and experiments/run.py check data by it
    tbytes = torch.from_numpy(token_bytes(enc)).to(C.device)
    for path in (train_path, val_path):
        n = os.path.getsize(path) // 2
        if n <= C.block_size:
            raise ConfigError(f"{path} holds {n} tokens, not more than block_size={C.block_size}: "
                             "use more text or a smaller --block_size")
    return train_path, val_path, tbytes


def get_batch(path, gen, batch_size, block_size, device):
    data = np.memmap(path, dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT, to avoid a leak
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def build_model(C, ckpt, source):
    """From scratch; from this run's checkpoint (resume); or from another run's weights (continued
    pre-training), with this run's act, p and dropout."""
    if source is not None:
        model_args, weights = dict(source["model_args"], act=C.act, p=C.p, dropout=C.dropout), source["model"]
    elif ckpt is not None:
        model_args, weights = ckpt["model_args"], ckpt["model"]
    else:
        model_args, weights = dict(vocab_size=C.vocab, block_size=C.block_size, n_layer=C.n_layer, n_head=C.n_head,
                                   n_kv_head=C.n_kv_head, n_embd=C.n_embd, ffn_hidden=C.ffn_hidden, act=C.act, p=C.p,
                                   dropout=C.dropout), None
    model = GPT(GPTConfig(**model_args))
    if weights is not None:
        model.load_state_dict(weights)
    return model.to(C.device)


def make_optimizer(model, C, device_type):
    """AdamW, with weight decay on the matrices only (not on the norms' gains)."""
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=C.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                             lr=C.lr, betas=(C.beta1, C.beta2), fused=device_type == "cuda")


# -----------------------------------------------------------------------------
# one step, its learning rate, and an evaluation

def get_lr(it, C):
    if it < C.warmup_iters:
        return C.lr * (it + 1) / (C.warmup_iters + 1)
    progress = (it - C.warmup_iters) / max(1, C.max_iters - C.warmup_iters)
    return C.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (C.lr - C.min_lr)


def forward_backward(model, next_batch, grad_accum, scaler, ctx, ddp):
    """One optimizer step's forwards and backwards over grad_accum micro-batches (DDP averages the
    gradients on the last one only). Returns the step's loss as a tensor."""
    loss_sum = 0.0
    for micro in range(grad_accum):
        x, y = next_batch()
        sync = nullcontext() if not ddp or micro == grad_accum - 1 else model.no_sync()
        with sync, ctx:
            loss = model(x, y)[1] / grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


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


def evaluate_and_log(raw, it, act, C, val_path, ctx, tbytes):
    """Evaluate with the activation training uses now, and with the inference one (C.eval_act) where
    it differs; the sparsity is the inference activation's. One log row, one printed line."""
    res = evaluate(raw, act, C.p, val_path, C, C.device, ctx, C.eval_iters, tbytes)
    row = dict(kind="eval", iter=it, act=act, val_loss=res["loss"], val_bpb=res["bpb"])
    if C.eval_act != act:
        res = evaluate(raw, C.eval_act, C.p, val_path, C, C.device, ctx, C.eval_iters, tbytes)
    row.update(eval_act=C.eval_act, val_loss_infer=res["loss"], val_bpb_infer=res["bpb"], sparsity=res["sparsity"],
               dead=res["dead"])
    log_row(C.out_dir, row)
    print(f"iter {it}: val loss {row['val_loss']:.4f} ({act}), {res['loss']:.4f} nats/token = "
          f"{res['bpb']:.3f} bits/byte ({C.eval_act}), {C.eval_act} sparsity {100 * res['sparsity']:.1f}%, "
          f"dead units {100 * res['dead']:.1f}%")


# -----------------------------------------------------------------------------
# the report: the run's first lines, and its summary

def describe_run(C, raw, world, use_compile, compile_why, switch_iter, tokens_per_step, device_type):
    """Where the run happens, the model and the data, and the schedule of activations."""
    print(f"device {C.device} ({device_name(device_type)}), dtype {C.dtype}, compile {use_compile} ({compile_why}), "
          f"processes {world}, threads {torch.get_num_threads()}")
    print(f"model: {raw.num_params() / 1e6:.2f}M parameters, {raw.config.n_layer} layers, d={raw.config.n_embd}, "
          f"ffn_hidden={raw.config.ffn_hidden}; data {C.data_dir}; {tokens_per_step:,} tokens per step")
    print(f"schedule: {C.act}" + (f" (p={C.p})" if C.act == "stoch" else "") + f" for steps [0, {switch_iter})"
          + (f", relu for [{switch_iter}, {C.max_iters}) (alpha={C.alpha})" if switch_iter < C.max_iters else "")
          + f"; evaluated with {C.eval_act}")


def write_summary(res, raw, C, switch_iter, world, seconds, tok_s, compiled, resumed_from):
    """summary.json from the final evaluation `res`, and the line that ends the run."""
    summary = dict(val_loss=res["loss"], val_bpb=res["bpb"], sparsity=res["sparsity"], dead_fraction=res["dead"], act=C.act,
                   p=C.p, alpha=C.alpha, eval_act=C.eval_act, switch_iter=switch_iter, iters=C.max_iters,
                   tokens=C.max_iters * C.batch_size * C.block_size * C.grad_accum * world,
                   seconds=round(seconds, 1), train_tok_per_s=tok_s, compile=compiled, vocab=C.vocab,
                   tokenizer=C.tokenizer_name, resumed_from=resumed_from, device=C.device,
                   device_name=device_name(C.device.split(":")[0]), threads=torch.get_num_threads(), processes=world,
                   dtype=C.dtype, params=raw.num_params(), val_tokens=C.final_eval_iters * C.batch_size * C.block_size,
                   data=C.data_dir, sparsity_per_layer=[l["sparsity"] for l in res["layers"]],
                   dead_per_layer=[l["dead"] for l in res["layers"]])
    path = os.path.join(C.out_dir, "summary.json")
    with open(path, "w") as f:
        f.write(strict_json(summary, indent=1))
    print(f"done in {seconds:.0f} s: val loss {summary['val_loss']:.4f} nats/token = {summary['val_bpb']:.3f} bits/byte "
          f"with {C.eval_act}, FFN sparsity {100 * summary['sparsity']:.1f}% (layers "
          f"{' / '.join(f'{100 * s:.0f}' for s in summary['sparsity_per_layer'])}), dead units "
          f"{100 * summary['dead_fraction']:.1f}%, training {summary['train_tok_per_s'] or 0:,} tok/s -> {path}")
    return summary


# -----------------------------------------------------------------------------

def main(argv):
    C, ckpt, source = resolve_config(argv)
    C.device = pick_device(C.device)
    ddp, rank, world = setup_ddp(C)
    master = rank == 0
    device_type = C.device.split(":")[0]
    ctx = autocast(C, device_type)
    use_compile, compile_why = compile_choice(C.compile, device_type)
    C.eval_act = inference_act(C.eval_act, C.act, C.alpha)  # resolved, so that checkpoints carry it for sample.py
    switch_iter = C.max_iters - round(C.alpha * C.max_iters)  # act before it, relu from it on
    train_path, val_path, tbytes = setup_data(C, master, ddp)

    torch.manual_seed(C.seed + rank)
    data_gen = torch.Generator().manual_seed(C.seed + 1000 + rank)
    raw = build_model(C, ckpt, source)  # the plain module; `model` below is what training calls
    del source
    optimizer = make_optimizer(raw, C, device_type)
    start_iter = 0
    if ckpt is not None:
        start_iter = load_training_state(ckpt, optimizer, data_gen, rank, world, C.device)
        del ckpt
    scaler = torch.amp.GradScaler(device_type, enabled=C.dtype == "float16")
    was_deterministic = deterministic_if_compiled(use_compile, device_type)
    model = wrap(raw, use_compile, ddp, device_type)

    tokens_per_step = C.batch_size * C.block_size * C.grad_accum * world
    if master:
        open_out_dir(C.out_dir, start_iter)
        describe_run(C, raw, world, use_compile, compile_why, switch_iter, tokens_per_step, device_type)
    flops_per_token = 6 * raw.num_params() + 12 * raw.config.n_layer * raw.config.n_embd * C.block_size  # for MFU
    speed = Throughput(tokens_per_step, flops_per_token, peak_flops(device_type, C.dtype), world)
    stop, old_handlers = catch_stop_signals(master)
    next_batch = lambda: get_batch(train_path, data_gen, C.batch_size, C.block_size, C.device)
    step = lambda m: forward_backward(m, next_batch, C.grad_accum, scaler, ctx, ddp)
    eager = lambda: wrap(raw, False, ddp, device_type)  # if compiling fails
    ckpt_path = os.path.join(C.out_dir, "ckpt.pt")
    run_start = time.time()
    it = start_iter
    compiling = True  # the first step compiles, and the first after the switch
    while True:
        # the method's switch (Swi+FT): train with act (StochA by default) until switch_iter, then with relu
        act_now = C.act if it < switch_iter else "relu"
        if raw.config.act != act_now:
            raw.set_act(act_now, C.p)
            compiling = True
            if master and it > start_iter:
                print(f"iter {it}: switching the FFN activation to {act_now} (Swi+FT)")
        lr = get_lr(it, C)
        for group in optimizer.param_groups:
            group["lr"] = lr

        halt = any_stop(stop, ddp, C.device)
        if (it % C.eval_interval == 0 or it == C.max_iters) and master and not halt:
            t_eval = time.time()
            evaluate_and_log(raw, it, act_now, C, val_path, ctx, tbytes)
            speed.pause(time.time() - t_eval)  # tokens/s counts training time only
        if (it % C.eval_interval == 0 and it > start_iter) or it == C.max_iters or halt:
            save_checkpoint(ckpt_path, raw, optimizer, C, it, data_gen, rank, world)
        if it == C.max_iters or halt:
            break

        compiled_now = use_compile and compiling
        if compiled_now:
            loss_sum, model, use_compile = compiled_step(model, step, eager, optimizer, data_gen, C.device, master,
                                                         it, act_now)
        else:
            loss_sum = step(model)
        if C.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), C.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        speed.step()
        it += 1
        if compiled_now:  # tokens/s counts training, not compiling
            compiling = False
            speed.restart()

        if it % C.log_interval == 0 and master:
            tok_s, speed_text = speed.lap()
            loss_val = loss_sum.item()
            print(f"iter {it}: loss {loss_val:.4f}, lr {lr:.2e}, act {act_now}, {speed_text}", flush=True)
            log_row(C.out_dir, dict(kind="train", iter=it, loss=loss_val, lr=lr, act=act_now, tok_per_s=tok_s))
            speed.restart()

    seconds = time.time() - run_start
    summary = None
    if master and it == C.max_iters and not halt:
        res = evaluate(raw, C.eval_act, C.p, val_path, C, C.device, ctx, C.final_eval_iters, tbytes)
        summary = write_summary(res, raw, C, switch_iter, world, seconds, speed.overall(), use_compile, start_iter)
    elif master and halt:
        print(f"stopped at iter {it}; continue with: python train.py --init_from=resume --out_dir={C.out_dir}")
    for s, handler in old_handlers.items():
        signal.signal(s, handler)
    torch.use_deterministic_algorithms(was_deterministic)
    if ddp:
        model = None  # the DDP wrapper goes first: it holds the process group (see end_ddp)
        end_ddp()
    return summary


if __name__ == "__main__":
    # On Linux, glibc hands every freed 200 MB logits buffer back to the OS and faults it in again at
    # the next step: a third of a CPU step went to the kernel. Keeping freed memory in the heap
    # (measured: 407 -> ~600 tok/s, 1 thread) needs these set before the process starts, so re-exec.
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    cli(main)
