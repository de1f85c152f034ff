"""
llama.cpp on the same weights: the engine a user who wants fast CPU decoding would run instead. bench.py's
end-to-end table calls llama_table() where llama-cpp-python and gguf are installed (`python bench.py --full`):
the model is written as a Llama GGUF in f32, f16 and q8_0 and decoded greedily by llama.cpp in a child process,
with the same threads, prompt and token count as ours.
"""

import json
import os
import sys

import numpy as np
import torch



def write_gguf(model, path, qtype):
    """model as a Llama GGUF (llama.cpp's own layout): norms in f32, every matrix in qtype (F32, F16 or
    Q8_0). wq and wk rows are permuted from our half-split RoPE to llama.cpp's adjacent pairs, as
    llama.cpp's convert_hf_to_gguf.py does. The vocabulary is placeholder names: we feed token ids."""
    import gguf
    c = model.config
    hd = c.n_embd // c.n_head
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(max(c.block_size, 256))  # llama.cpp's smallest cache; a longer one costs nothing here
    w.add_embedding_length(c.n_embd); w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.ffn_hidden); w.add_head_count(c.n_head); w.add_head_count_kv(c.n_kv_head)
    w.add_rope_dimension_count(hd); w.add_rope_freq_base(c.rope_theta); w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[qtype]); w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size); w.add_token_types([2, 3, 3] + [1] * (c.vocab_size - 3))
    w.add_bos_token_id(1); w.add_eos_token_id(2)

    def pairs(t, heads):  # half-split rows -> adjacent pairs, per head
        return t.reshape(heads, 2, t.shape[0] // heads // 2, -1).transpose(1, 2).reshape(t.shape)

    def add(name, t):
        a = t.detach().float().cpu().numpy()
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a.astype(np.float32))
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    add("token_embd.weight", model.tok_emb.weight[:c.vocab_size])
    for i, b in enumerate(model.blocks):
        add(f"blk.{i}.attn_norm.weight", b.attn_norm.weight)
        add(f"blk.{i}.attn_q.weight", pairs(b.attn.wq.weight, c.n_head))
        add(f"blk.{i}.attn_k.weight", pairs(b.attn.wk.weight, c.n_kv_head))
        add(f"blk.{i}.attn_v.weight", b.attn.wv.weight); add(f"blk.{i}.attn_output.weight", b.attn.wo.weight)
        add(f"blk.{i}.ffn_norm.weight", b.ffn_norm.weight)
        add(f"blk.{i}.ffn_gate.weight", b.ffn.w1.weight); add(f"blk.{i}.ffn_up.weight", b.ffn.w3.weight)
        add(f"blk.{i}.ffn_down.weight", b.ffn.w2.weight)
    add("output_norm.weight", model.norm.weight)
    add("output.weight", model.lm_head.weight[:c.vocab_size])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


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


def llama_table(model, label, prompt, n, roof_now):
    """llama.cpp's greedy decode of the same weights, same threads, prompt and token count; tokens/s over
    the n decode steps alone (ours also count the prefill: a few % against us). llama.cpp's Llama architecture gates with SILU, so its tokens are checked
    against ours with act = silu (the export's check); the bytes and the time per token do not depend on it.
    roof_now(dev): the read GB/s right now. Returns bench.py's rows."""
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
    for qtype, bytes_per in (("F32", 4), ("F16", 2), ("Q8_0", 34 / 32)):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"model-{qtype}.gguf")
            write_gguf(model, path, qtype)
            ctx = max(c.block_size, 256)
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
        by = weights * bytes_per
        roof = roof_now("cpu")
        print(f"  {'llama.cpp ' + qtype.lower():24s} {tps:8.1f} tokens/s  {1e3 / tps:7.2f} ms/token  "
              f"({same}/{n} greedy tokens as ours with silu; weights {by / 1e6:.1f} MB, {by * tps / 1e9:.1f} GB/s "
              f"= {100 * by * tps / 1e9 / roof:.0f}% of {roof:.1f})", flush=True)
        rows.append(dict(device="cpu", impl=f"e2e llama.cpp {qtype.lower()}", model=label, tokens_per_s=tps,
                         weight_bytes=by, same_tokens=same, n_tokens=n, llama_cpp=res["version"]))
    return rows
