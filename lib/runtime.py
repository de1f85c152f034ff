"""
How train.py's run is carried out, none of which changes what it computes: the processes (DDP under
torchrun), the device and its precision, torch.compile with its fallback to eager, a stop asked for
by Ctrl-C or SIGTERM, and the throughput the log reports (tokens/s, and MFU where the GPU's peak is
known).
"""

import gc
import os
import shutil
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lib.checkpoint import rng_state, set_rng_state

# bf16 dense tensor-core peaks (FLOP/s) for MFU; an unknown GPU gets no MFU rather than a wrong one
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


# -----------------------------------------------------------------------------
# processes and device

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return name  # the rules checked that it exists


def device_name(device_type):
    return torch.cuda.get_device_name() if device_type == "cuda" else device_type


def setup_ddp(C):
    """Under torchrun (RANK is set) join the process group, gloo on CPU and nccl on CUDA with one GPU
    per process (C.device becomes this process's). Returns (ddp, rank, world); plain python: (False, 0, 1)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    dist.init_process_group(backend="nccl" if C.device.startswith("cuda") else "gloo")
    if C.device.startswith("cuda"):
        C.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(C.device)
    return True, dist.get_rank(), dist.get_world_size()


def end_ddp():
    """Leave the process group, all ranks together, after the caller has dropped its DDP wrapper.
    DDP's reducer holds the process group: dropped here, gloo's threads stop while Python is whole (with
    the group alive until exit, rank 1 aborted at exit in ~1 run of 16 on 2 busy cores: "terminate called
    without an active exception"). Then together, so that no rank tears gloo down while rank 0 evaluates."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def any_stop(stop, ddp, device):
    """Whether a stop was asked for, in any process: under DDP every process must stop at the same step."""
    halt = bool(stop)
    if ddp:
        flag = torch.tensor([float(halt)], device=device)
        dist.all_reduce(flag)
        halt = flag.item() > 0
    return halt


def catch_stop_signals(master):
    """Ctrl-C and SIGTERM ask the loop to checkpoint at the next step boundary, then exit; a second
    one aborts. Returns the list a request lands in, and the handlers to put back at the end."""
    stop = []
    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if master:
            print(f"\nsignal {signum}: checkpointing at the next step (again to abort)", flush=True)
    return stop, {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}


def autocast(C, device_type):
    """Resolves dtype=auto into C.dtype (bfloat16 on CUDA when supported, else float32) and returns the
    context the forwards run in: autocast on CUDA in 16 bits, else plain float32."""
    if C.dtype == "auto":
        C.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cuda" and C.dtype != "float32":
        return torch.autocast(device_type, dtype=getattr(torch, C.dtype))
    return nullcontext()


# -----------------------------------------------------------------------------
# torch.compile

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


def deterministic_if_compiled(use_compile, device_type):
    """Returns the deterministic-algorithms setting to put back at the end."""
    was = torch.are_deterministic_algorithms_enabled()
    if use_compile and device_type == "cpu":
        # inductor's CPU kernels accumulate the embedding's gradient with atomic adds, in a different
        # order each run; deterministic mode keeps compiled training (and resume) bit-exact
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill: nothing reads it
    return was


def wrap(raw, compiled, ddp, device_type):
    """The model that training calls: compiled or not, in DDP or not. `raw` stays the plain module that
    evaluation, the checkpoints and the switch of activation use."""
    m = torch.compile(raw) if compiled else raw
    return DDP(m, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None) if ddp else m


def compiled_step(model, step, eager, optimizer, data_gen, device, master, it, act):
    """step(model) where the model's graph is new, so the step compiles it, which needs inductor's
    compiler and toolchain to work. If they fail: one line, and the step redone with eager() from the
    same random states, exactly as --compile=False runs it. Returns (loss, the model training goes on
    with, whether that model is compiled)."""
    t_compile = time.time()
    rng = rng_state(data_gen, device)
    try:
        loss_sum = step(model)
    except Exception as e:
        if master:
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"torch.compile failed ({type(e).__name__}: {first_line}); "
                  "training eagerly (--compile=False skips the attempt)")
        set_rng_state(rng, data_gen, device)
        optimizer.zero_grad(set_to_none=True)
        model = eager()
        return step(model), model, False
    if master:
        print(f"iter {it}: compiled the {act} training step in {time.time() - t_compile:.0f} s")
    return loss_sum, model, True


# -----------------------------------------------------------------------------
# throughput

def peak_flops(device_type, dtype):
    """The GPU's 16-bit peak from PEAK_FLOPS, or None: on a CPU, in float32, or for an unknown GPU."""
    if device_type != "cuda" or dtype == "float32":
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)


class Throughput:
    """Training tokens per second over each logged interval, and MFU where the peak is known. Evaluations
    and compiling steps are not counted: the caller pauses the clock around them, or restarts it."""

    def __init__(self, tokens_per_step, flops_per_token, peak, world):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak * world if peak else None  # every process's device
        self.timed_tokens, self.timed_s = 0, 0.0  # over the logged intervals, for the summary
        self.restart()

    def restart(self):
        self.t0, self.tokens = time.time(), 0

    def pause(self, seconds):
        self.t0 += seconds

    def step(self):
        self.tokens += self.tokens_per_step

    def lap(self):
        """(tokens/s since the restart, its text for the log line): None and "compiling" right after a
        compiling step."""
        dt = time.time() - self.t0
        tok_s = self.tokens / dt if self.tokens else None
        self.timed_tokens += self.tokens
        self.timed_s += dt if self.tokens else 0.0
        mfu = f", MFU {100 * self.flops_per_token * tok_s / self.peak:.1f}%" if self.peak and tok_s else ""
        return tok_s, (f"{tok_s:,.0f} tok/s" if tok_s else "compiling") + mfu

    def overall(self):
        """Tokens/s over all logged intervals, for summary.json; None if none was timed."""
        return round(self.timed_tokens / self.timed_s) if self.timed_s else None
