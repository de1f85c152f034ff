"""
The C decode engine: model.generate's steps through decode.c, one C call per step for the whole forward of
the new token(s); Python keeps the tokenizer and the sampling (model.sample_next).

    import decode
    decode.attach_engine(model)                          # weights packed once, fp32 (a snapshot, as attach())
    decode.attach_engine(model, dtype=torch.bfloat16)    # or bf16 / fp16 / int8 (per-row scales) weights
    model.generate(idx, 64, temperature=0)               # now through the C engine (engine="auto")
    model.generate(idx, 64, temperature=0, engine="torch")  # the PyTorch reference, unchanged
    decode.detach_engine(model)

The FFN runs sparse_ffn.c's sparse kernel where the model is sparse (act relu, or silu with a threshold:
ffn="auto"), or dense: W1 and W3 stacked in one GEMV, then W2 (ffn="dense": the baseline bench.py times).
The engine reads the model's act and thresholds when a generation starts, so set_act / set_thresholds after
attaching hold.
It runs eval-mode inference only: act="stoch" (StochA sampling draws per element) and dropout in training
mode are refused with one line; decode those with engine="torch". Threads: torch.get_num_threads().
"""

import torch

import sparse_ffn
from model import GPT, check_threshold
from sparse_ffn import DTYPE_CODES, GATES, DenseLinear, SparseFFN

FFN_CHOICES = ("auto", "sparse", "dense")
PARTS = ("rest (embedding, norms, residuals)", "attention projections", "attention (RoPE, cache, softmax)",
         "FFN", "output layer + final norm")  # decode.h's DEC_REST .. DEC_HEAD


def _lib():
    return sparse_ffn._mods["c"].lib, sparse_ffn._mods["c"].ffi


def _fingerprint(model):
    """What the packed weights were made from: every parameter's and buffer's storage, version counter (bumped by
    every in-place write: an optimizer step, load_state_dict, a no_grad edit), dtype, device and shape, and the
    vocabulary size. act, p and the thresholds are not in it: the engine reads those when a generation starts."""
    ts = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr() if t.device.type != "meta" else 0, t._version, t.dtype, t.device, t.shape)
                 for t in ts) + (model.norm.eps, model.config.vocab_size)


def _sizes(model):
    """decode.c's sizes, each from the tensor it bounds (never from the config alone, which can change after the
    model was built), checked against each other; a ValueError where they disagree."""
    c, blocks = model.config, model.blocks
    n_emb, d = model.tok_emb.weight.shape
    rope_len, half = model.rope_cos.shape
    hd = 2 * half
    a = blocks[0].attn
    n_head, n_kv_head, h = a.wq.weight.shape[0] // hd, a.wk.weight.shape[0] // hd, blocks[0].ffn.w1.weight.shape[0]
    want = dict(wq=(n_head * hd, d), wk=(n_kv_head * hd, d), wv=(n_kv_head * hd, d), wo=(d, n_head * hd),
                w1=(h, d), w3=(h, d), w2=(d, h))
    for l, b in enumerate(blocks):
        got = dict(wq=b.attn.wq.weight, wk=b.attn.wk.weight, wv=b.attn.wv.weight, wo=b.attn.wo.weight,
                   w1=b.ffn.w1.weight, w3=b.ffn.w3.weight, w2=b.ffn.w2.weight)
        for name, t in got.items():
            if tuple(t.shape) != want[name]:
                raise ValueError(f"the C engine needs every layer of one shape: layer {l}'s {name} is "
                                 f"{tuple(t.shape)}, expected {want[name]}")
    if n_head * hd != d or n_head % n_kv_head or model.rope_sin.shape != model.rope_cos.shape:
        raise ValueError(f"the model's weights disagree: d={d}, head size {hd} (the RoPE tables), {n_head} query "
                         f"and {n_kv_head} key/value heads")
    if not 1 <= c.vocab_size <= n_emb or tuple(model.lm_head.weight.shape) != (n_emb, d):
        raise ValueError(f"vocab_size={c.vocab_size} does not fit the embedding's {n_emb} rows")
    return dict(n_layer=len(blocks), d=d, n_head=n_head, n_kv_head=n_kv_head, h=h, n_emb=n_emb, vocab=c.vocab_size,
                rope_len=rope_len)


class Engine:
    """A model's weights packed for decode.c. Engine(model, dtype, ffn): see the module's docstring.
    The packed weights are a copy; check() (at the start of every generation) repacks them when the model changed
    since (a training step, load_state_dict, model.to(...)), or refuses in one line where it cannot."""

    def __init__(self, model, dtype=None, ffn="auto", variant="tuned"):
        if ffn not in FFN_CHOICES:
            raise ValueError(f"ffn must be one of {FFN_CHOICES}, got {ffn!r}")
        if variant not in sparse_ffn.VARIANTS:
            raise ValueError(f"variant must be one of {sparse_ffn.VARIANTS}, got {variant!r}")
        if dtype is not None and dtype not in DTYPE_CODES:
            raise TypeError(f"the C engine's weight dtype must be one of {list(DTYPE_CODES)}, got {dtype}")
        self.want_dtype, self.ffn, self.variant = dtype, ffn, variant  # dtype None: the model's, at each pack
        self.stats = None  # the last generation's: seconds per part, steps, tokens, active units
        self.repacks = 0  # how often check() found the model changed and packed it again
        self._pack(model)

    def _pack(self, model):
        if not isinstance(model, GPT):
            raise TypeError(f"the C engine runs a model.GPT, got {type(model).__name__}")
        if model.tok_emb.weight.device.type != "cpu":
            raise ValueError(f"the C engine runs on the CPU; the model is on {model.tok_emb.weight.device}")
        if sparse_ffn.backends()["c"] is not True:
            raise ValueError(f"the C engine needs the C kernel: {sparse_ffn.backends()['c']}")
        self.dtype = model.tok_emb.weight.dtype if self.want_dtype is None else self.want_dtype
        if self.dtype not in DTYPE_CODES:
            raise TypeError(f"the C engine's weight dtype must be one of {list(DTYPE_CODES)}, got {self.dtype}")
        n = _sizes(model)
        lib, ffi = _lib()
        f32 = lambda t: t.detach().float().contiguous().clone()  # a copy: the engine is a snapshot
        self.keep = []  # every tensor whose memory decode.c reads: alive as long as the engine

        def ptr(t, kind="void *"):
            if t is None:
                return ffi.NULL
            self.keep.append(t)
            return ffi.cast(kind, t.data_ptr())
        dense = lambda w: DenseLinear(w, self.dtype)
        self.sparse = [self.ffn == "sparse" or self.ffn == "auto" and (b.ffn.act == "relu" or b.ffn.threshold > 0)
                       for b in model.blocks]
        layers = ffi.new("DecLayer[]", n["n_layer"])
        for L, block, sparse in zip(layers, model.blocks, self.sparse):
            a = block.attn
            qkv, wo = dense(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight])), dense(a.wo.weight)
            L.attn_norm, L.ffn_norm = ptr(f32(block.attn_norm.weight), "float *"), ptr(f32(block.ffn_norm.weight), "float *")
            L.wqkv, L.sqkv, L.wo, L.so = ptr(qkv.w), ptr(qkv.scales, "float *"), ptr(wo.w), ptr(wo.scales, "float *")
            if sparse:
                k = SparseFFN(block.ffn, dtype=self.dtype, backend="c", mode="sparse")
                L.w1, L.w32, L.s132 = ptr(k.w1), ptr(k.w32), ptr(k.scales, "float *")
            else:
                w13, w2 = dense(torch.cat([block.ffn.w1.weight, block.ffn.w3.weight])), dense(block.ffn.w2.weight)
                L.w13, L.s13, L.w2, L.s2 = ptr(w13.w), ptr(w13.scales, "float *"), ptr(w2.w), ptr(w2.scales, "float *")
        head = dense(model.lm_head.weight[:n["vocab"]])  # the padded rows are never sampled
        m = ffi.new("DecModel *")
        for k, v in n.items():
            setattr(m, k, v)
        m.dtype, m.eps = DTYPE_CODES[self.dtype], model.norm.eps
        m.plain_ffn = self.variant == "plain"  # the sparse FFN by the plain C kernel (bench.py times both)
        m.emb, m.norm = ptr(f32(model.tok_emb.weight), "float *"), ptr(f32(model.norm.weight), "float *")
        m.head, m.shead = ptr(head.w), ptr(head.scales, "float *")
        m.rope_cos, m.rope_sin = ptr(f32(model.rope_cos), "float *"), ptr(f32(model.rope_sin), "float *")
        m.layers = layers
        self._m, self._layers, self.sizes = m, layers, n
        self.config, self.vocab = model.config, n["vocab"]
        self._packed_from = _fingerprint(model)

    def __repr__(self):
        n = sum(self.sparse)
        return f"Engine(dtype={self.dtype}, FFN sparse in {n} of {len(self.sparse)} layers)"

    def __deepcopy__(self, memo):  # a copy of the model gets no engine: attach one to it
        return None

    def __reduce__(self):  # nor does a pickled one (torch.save(model)): the engine is a cache of C pointers
        return _no_engine, ()

    def check(self, model):
        """One clear error where the engine would not compute model's function (act stoch, dropout in training,
        a threshold the kernels cannot take); repacks first where the model changed since it was packed."""
        if model.engine is not self:
            raise ValueError("this engine was attached to another model")
        if _fingerprint(model) != self._packed_from:
            self._pack(model)  # raises, in one line, where the model can no longer be packed (another device)
            self.repacks += 1
        if model.training and model.config.dropout > 0:
            raise ValueError("the C engine runs inference: the model is in training mode with dropout "
                             f"{model.config.dropout} (call model.eval(), or generate with engine='torch')")
        for l, block in enumerate(model.blocks):
            f = block.ffn
            if f.act not in GATES:
                raise ValueError(f"the C engine runs act relu or silu; layer {l} has act={f.act!r} (StochA draws per "
                                 "element: generate with engine='torch')")
            check_threshold(f.threshold, f"layer {l}'s threshold")
            self._layers[l].gate, self._layers[l].t = GATES[f.act], f.threshold

    def start(self, model, batch, max_len):
        """A generation of `batch` sequences of up to max_len positions: its own KV cache, freed by close()."""
        for name, v in (("batch", batch), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.check(model)
        model.check_positions(max_len)
        return Session(self, batch, max_len)


def _no_engine():
    return None


class Session:
    """One generation's KV cache and activations in C. session(idx, start_pos) -> (logits (B, 1, vocab), None),
    as GPT.forward(idx, start_pos=...) returns them."""

    def __init__(self, engine, batch, max_len):
        lib, ffi = _lib()
        self.engine, self.batch, self.max_len, self.pos = engine, batch, max_len, 0
        self.keep = engine.keep  # the weights this session's pointers read, even if the engine repacks meanwhile
        p = lib.dec_new(engine._m, batch, max_len)
        if p == ffi.NULL:
            raise MemoryError(f"the C engine could not allocate a KV cache of {batch} x {max_len} positions "
                              "(the arguments were checked: this is the memory)")
        self._p = ffi.gc(p, lib.dec_free)  # freed by close(), or when the session is collected

    def __call__(self, idx, start_pos):
        lib, ffi = _lib()
        B, T = idx.shape if isinstance(idx, torch.Tensor) and idx.dim() == 2 else (0, 0)
        if (self._p is None or type(idx) is not torch.Tensor or idx.dtype != torch.int64 or idx.device.type != "cpu"
                or B != self.batch or T < 1 or start_pos != self.pos or start_pos + T > self.max_len):
            self._refuse(idx, start_pos)
        idx = idx.contiguous()
        logits = torch.empty(B, self.engine.vocab)
        rc = lib.dec_step(self._p, ffi.cast("int64_t *", idx.data_ptr()), B, T, start_pos,
                          ffi.cast("float *", logits.data_ptr()), torch.get_num_threads())
        if rc < 0:  # decode.c checks the token ids itself: say which one it refused
            self._refuse(idx, start_pos)
        self.pos += T
        return logits[:, None, :], None

    def _refuse(self, idx, start_pos):
        """The one-line error for arguments the step cannot take (off the hot path: called once they failed)."""
        if self._p is None:
            raise ValueError("this session is closed")
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2 or idx.device.type != "cpu":
            got = (f"{tuple(idx.shape)} {idx.dtype} on {idx.device}" if isinstance(idx, torch.Tensor)
                   else type(idx).__name__)
            raise TypeError(f"idx must be a (B, T) int64 CPU tensor, got {got}")
        if idx.shape[0] != self.batch or idx.shape[1] < 1:
            raise ValueError(f"idx must be ({self.batch}, T >= 1) for this session, got {tuple(idx.shape)}")
        T = idx.shape[1]
        if start_pos != self.pos or start_pos + T > self.max_len:  # the cache holds exactly positions < self.pos
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1}: the cache holds {self.pos} of at most "
                             f"{self.max_len} (block_size={self.engine.config.block_size})")
        n_emb = self.engine._m.n_emb
        if not 0 <= int(idx.min()) <= int(idx.max()) < n_emb:
            raise ValueError(f"token ids must be in [0, {n_emb}), got {int(idx.min())}..{int(idx.max())}")
        raise MemoryError("decode.c could not grow its scratch memory")

    def stats(self):
        """Seconds per part (PARTS) summed over this session's steps, and its counts."""
        lib, ffi = _lib()
        s, n = ffi.new("double[]", len(PARTS)), ffi.new("int64_t[]", 4)
        lib.dec_stats(self._p, s, n)
        return dict(seconds=dict(zip(PARTS, s)), steps=n[0], tokens=n[1],
                    sparsity=1 - n[2] / n[3] if n[3] else None)

    def close(self):
        if self._p is not None:
            self.engine.stats = self.stats()
            _lib()[1].release(self._p)  # dec_free now, not at garbage collection
            self._p = None


def attach_engine(model, dtype=None, ffn="auto", variant="tuned"):
    """Pack model's weights for the C engine and make it model.generate's default. Returns the engine.
    variant "plain": the sparse FFN by the plain C kernel (sffn_forward_plain), to time what the tuned one buys."""
    model.engine = None
    model.engine = Engine(model, dtype, ffn, variant)
    return model.engine


def detach_engine(model):
    model.engine = None
