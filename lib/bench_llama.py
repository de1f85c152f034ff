"""
llama.cpp on the same weights: the engine a user who wants fast CPU decoding would run instead. bench.py's
end-to-end table calls llama_table() where llama-cpp-python and gguf are installed (`python bench.py --full`):
the model is written as a Llama GGUF in f32, f16 and q8_0 and decoded greedily by llama.cpp in a child process,
with the same threads, prompt and token count as ours.
"""

import json
import os
import sys

import torch

from lib import gguf_io

# run in a child process: llama.cpp is third-party C code, and a crash there must not end bench.py
LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp
path, threads, n, ctx, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=len(prompt), n_threads=threads, n_threads_batch=threads, verbose=False)
V = llm.n_vocab()
ts = []
while len(ts) < 4 or sum(ts[1:]) < 1.0:  # a warm-up, then the median of the timed runs (1 s of them at least, as ours)
    llm.reset()
    for tok in prompt:  # token by token, untimed: its batched q8_0 prefill crashed on an AVX-512 Xeon
        llm.eval([tok])
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,)))))
        llm.eval([out[-1]])
    ts.append(time.perf_counter() - t0)
print(json.dumps(dict(seconds=sorted(ts[1:])[(len(ts) - 2) // 2], tokens=out, version=llama_cpp.__version__)))
"""


def llama_table(model, label, prompt, n, roof_now, origin=None):
    """llama.cpp's greedy decode of the same weights, same threads, prompt and token count; tokens/s over
    the n decode steps alone (ours also count the prefill: a few % against us). llama.cpp's Llama architecture gates with SILU, so its tokens are checked
    against ours with act = silu (the export's check); the bytes and the time per token do not depend on it.
    roof_now(dev): the read GB/s right now. origin: the GGUF file the model was imported from (or continued
    from), timed as it is too (its own quantization, e.g. Q4_1). Returns bench.py's rows."""
    rows = []
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"\n  llama.cpp: skipped ({e.name} is not installed; `pip install llama-cpp-python gguf` builds "
              "llama.cpp from source, 6-20 min on 2 cores)")
        return rows
    import subprocess
    import tempfile
    T = torch.get_num_threads()
    c = model.config
    act = model.blocks[0].ffn.act
    model.set_act("silu")
    with torch.no_grad():
        ours = model.generate(prompt, n, temperature=0.0)[0, prompt.shape[1]:].tolist()
    model.set_act(act)
    weights = sum(p.numel() for n_, p in model.named_parameters() if p.dim() == 2 and "tok_emb" not in n_)
    weights += c.vocab_size * c.n_embd  # the output layer (tied: tok_emb is read as the output layer)
    print(f"\n  llama.cpp on the same weights ({label}), {T} threads, its default settings (f16 KV cache):")
    files = [("F32", 4), ("F16", 2), ("Q8_0", 34 / 32)] + ([("file", None)] if origin else [])
    for qtype, bytes_per in files:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"model-{qtype}.gguf")
            if qtype == "file":  # the original file: its matrices' bytes as stored
                import gguf
                path = origin
                r = gguf.GGUFReader(origin)
                qtype = "original " + "/".join(sorted({t.tensor_type.name for t in r.tensors if len(t.shape) == 2}))
                by_file = sum(int(t.n_bytes) for t in r.tensors if len(t.shape) == 2)
            else:
                gguf_io.write(model, path, qtype)
            ctx = min(max(c.block_size, 256), 4096)
            r = subprocess.run([sys.executable, "-c", LLAMA_CHILD, path, str(T), str(n), str(ctx),
                                json.dumps(prompt[0].tolist())], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
            last = (r.stderr.strip().splitlines() or [""])[-1][:120]
            print(f"  {'llama.cpp ' + qtype.lower():24s} failed on this machine ({why}) {last}", flush=True)
            rows.append(dict(device="cpu", impl=f"e2e llama.cpp {qtype.lower()}", model=label, failed=why))
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        tps = n / res["seconds"]
        same = sum(a == b for a, b in zip(res["tokens"], ours))
        by = weights * bytes_per if bytes_per else by_file
        roof = roof_now("cpu")
        print(f"  {'llama.cpp ' + qtype.lower():24s} {tps:8.1f} tokens/s  {1e3 / tps:7.2f} ms/token  "
              f"({same}/{n} greedy tokens as ours with silu; weights {by / 1e6:.1f} MB, {by * tps / 1e9:.1f} GB/s "
              f"= {100 * by * tps / 1e9 / roof:.0f}% of {roof:.1f})", flush=True)
        rows.append(dict(device="cpu", impl=f"e2e llama.cpp {qtype.lower()}", model=label, tokens_per_s=tps,
                         weight_bytes=by, same_tokens=same, n_tokens=n, llama_cpp=res["version"]))
    return rows


LOGITS_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
path, ids, texts, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=path, n_ctx=max(512, len(ids)), n_batch=max(512, len(ids)), logits_all=True,
                      verbose=False, n_threads=int(sys.argv[5]))
toks = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
llm.eval(ids)
np.save(out, np.array(llm.scores[:len(ids)], dtype=np.float32))
print(json.dumps(toks))
"""


def llama_logits(path, ids, texts, threads=2):
    """llama.cpp on a GGUF file, in a child process: its logits at every position of ids ((T, vocab) fp32), and its
    token ids for each of texts (special tokens parsed, no BOS added)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scores.npy")
        r = subprocess.run([sys.executable, "-c", LOGITS_CHILD, path, json.dumps(ids), json.dumps(texts), out,
                            str(threads)], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {path}: {r.stderr.strip()[-500:]}")
        import numpy as np
        return torch.from_numpy(np.load(out)), json.loads(r.stdout.strip().splitlines()[-1])
