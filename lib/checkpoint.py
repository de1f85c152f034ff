"""
A training run's files in its out_dir, and the state that makes --init_from=resume exact:

    ckpt.pt    the model, the optimizer, the settings, the step, and every process's random states
               (StochA's and dropout's draws, the data order), written atomically
    log.jsonl  one strict JSON row per logged step or evaluation; a resume rewrites it to end where
               its checkpoint does, so that the rows after it are not there twice

train.py writes them; experiments/run.py and experiments/plot.py read the log back.
"""

import json
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from lib.configurator import ConfigError, strict_json
from model import GPTConfig


# -----------------------------------------------------------------------------
# what a checkpoint fixes

# SHAPE: a checkpoint's weights fix the model (setting -> GPTConfig field), for --init_from=resume and
# for --init_from=<ckpt> alike. RUN: what makes a run the run it is (its method, schedule, optimizer,
# batches and data), which --init_from=resume continues exactly. A value on the command line (or in a
# config file) that differs from the checkpoint's is refused with one line; the settings in neither
# list only say how the run is carried out, and may change on resume.
SHAPE = dict(vocab="vocab_size", n_layer="n_layer", n_head="n_head", n_kv_head="n_kv_head", n_embd="n_embd",
             ffn_hidden="ffn_hidden", block_size="block_size")
RUN = ("data", "act", "p", "alpha", "eval_act", "dropout", "max_iters", "lr", "min_lr", "warmup_iters", "batch_size",
       "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip", "seed")


def load_any(path, block_size=None):
    """A checkpoint's dict from train.py's ckpt.pt, or from a GGUF file (gguf_io.as_checkpoint: its model with
    RoPE tables for block_size positions, default its context length, and its tokenizer's path in config)."""
    from lib import gguf_io
    from model import load_checkpoint
    path = gguf_io.resolve(path)  # a model name such as smollm2: its installed file
    if gguf_io.is_gguf(path):
        return gguf_io.as_checkpoint(path, block_size)[0]
    return load_checkpoint(path)


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


# -----------------------------------------------------------------------------
# writing and reading a run's files

def rng_state(data_gen, device):
    """Every random state a training step draws from: torch's (StochA, dropout), the batches', CUDA's."""
    return dict(torch=torch.get_rng_state(), data=data_gen.get_state(),
                cuda=torch.cuda.get_rng_state() if device.startswith("cuda") else None)


def set_rng_state(rng, data_gen, device):
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    if rng["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"])


def save_checkpoint(path, raw_model, optimizer, C, it, data_gen, rank, world):
    """Every rank's RNG states go into rank 0's file, so a DDP run resumes exactly too."""
    rng = rng_state(data_gen, C.device)
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


def load_training_state(ckpt, optimizer, data_gen, rank, world, device):
    """Resume: the optimizer's state and this rank's random states. Returns the step to start from."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], data_gen, device)
    elif rank == 0:
        print(f"warning: checkpoint written by {len(ckpt['rng'])} processes, resuming with {world}: "
              "the data order and StochA draws will differ from an uninterrupted run")
    return ckpt["iter_num"]


def open_out_dir(out_dir, start_iter):
    """Make out_dir, remove a ckpt.pt.tmp left by a kill mid-save (never read), and start log.jsonl:
    empty for a new run; on resume without the rows from after the checkpoint, which are about to be redone."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "ckpt.pt.tmp")):
        os.remove(os.path.join(out_dir, "ckpt.pt.tmp"))
    log_path = os.path.join(out_dir, "log.jsonl")
    if start_iter == 0:
        open(log_path, "w").close()
    elif os.path.exists(log_path):
        rows = read_log(log_path)
        with open(log_path, "w") as f:
            # a train row's iter counts the steps done (kept up to start_iter); evals at start_iter rerun
            f.writelines(strict_json(r) + "\n" for r in rows if r["iter"] < start_iter
                         or (r["iter"] == start_iter and r["kind"] == "train"))


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


def log_row(out_dir, row):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(strict_json(row) + "\n")
