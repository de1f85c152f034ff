"""
A Llama-style decoder whose feed-forward activation can be SILU, RELU or stochastic (StochA).

References:
1) Lomeli et al., "Stochastic activations", Meta FAIR, arXiv 2509.22358 (2025): StochA and Swi+FT.
2) Touvron et al., "LLaMA" (2023): RMSNorm pre-norm, RoPE, the gated FFN w2(act(w1 x) * w3 x).
3) Ainslie et al., "GQA" (2023): grouped-query attention.
4) karpathy/nanoGPT and karpathy/llama2.c, whose shape this file follows.

The FFN is h = act(W1 x) * (W3 x), y = W2 h. With act = relu, every negative W1 x zeroes its unit,
so at inference only W1 must be read in full (see sparse_ffn.c / sparse_ffn.cu).
"""

import math
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTS = ("silu", "relu", "stoch")
T_MAX = float(torch.finfo(torch.float32).max)  # the largest threshold t: the kernels compare in fp32

# -----------------------------------------------------------------------------
# the activations


def silu(x):
    """x * sigmoid(x), also at -inf: there F.silu gives -inf * 0 = NaN, and the limit is 0. The clamp
    changes no value (below -1e4 silu is -0.0 in every float format), and NaN still propagates."""
    return F.silu(x.clamp(min=-1e4))


def stoch_act(x, p, generator=None):
    """StochA: x for x >= 0; for x < 0, silu(x) with probability p and 0 (relu) otherwise.
    One independent draw per element at every call. Autograd gives the paper's gradient:
    1 for x > 0, silu'(x) where silu was drawn, 0 where relu was drawn. p = 0 is exactly relu,
    for every float (-inf gives 0, NaN stays NaN)."""
    check_p(p)
    # draws in fp32 even under bf16 autocast, so the rate is p and not p rounded to bf16's grid
    use_silu = torch.rand(x.shape, device=x.device, generator=generator) < p
    # silu only where x < 0: clamped to [-1e4, 0], which changes none of those values and keeps
    # -inf (silu -> 0) and +inf (no NaN gradient from the branch not taken) finite; NaN passes through
    return torch.where(x < 0, F.silu(x.clamp(-1e4, 0.0)) * use_silu, x)


def gate_t(u, gate, t=0.0):
    """g_t(u) = g(u) where |g(u)| > t, else 0, with g = relu or silu: the sparse kernels' gate.
    A threshold t > 0 makes a SILU model sparse without retraining (CATS, Lee et al. 2024) and a
    RELU model sparser; t = 0 with relu is relu. nan stays nan."""
    a = F.relu(u) if gate == "relu" else silu(u)
    return a if t == 0 and gate == "relu" else torch.where(a.abs() <= t, 0.0, a)


def act_fn(x, act, p=0.0, generator=None):
    """act(x) for act = "silu", "relu" or "stoch" (StochA with probability p)."""
    if act == "stoch":
        return stoch_act(x, p, generator)  # which checks p
    check_act(act, p)  # a bad p is refused whatever the act
    if act == "silu":
        return silu(x)
    return F.relu(x)

# -----------------------------------------------------------------------------
# the small parts


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the mean of squares in fp32, also under bf16 autocast
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    """cos and sin of shape (max_len, head_dim // 2): position m rotates pair i by m * theta^(-2i/hd)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate (x1, x2) pairs, x1 = first half of head_dim, x2 = second half. x: (B, H, T, hd),
    cos/sin: (T, hd/2). Real arithmetic, so it also runs where complex tensors do not."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention: n_head query heads share n_kv_head key/value heads."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.wq = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.cache_k = self.cache_v = None  # (B, n_kv_head, max_len, head_dim) while generating

    def forward(self, x, cos, sin, start_pos=None):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is None:  # a full causal pass over the T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the T new tokens sit at positions start_pos.. and see the cached past
            end = start_pos + T
            self.cache_k[:B, :, start_pos:end] = k
            self.cache_v[:B, :, start_pos:end] = v
            k, v = self.cache_k[:B, :, :end], self.cache_v[:B, :, :end]
            # new token i may see cached position j when j <= start_pos + i; None when T == 1
            mask = None if T == 1 else (torch.arange(end, device=x.device)[None, :]
                                        <= start_pos + torch.arange(T, device=x.device)[:, None])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.wo(y), self.dropout, self.training)


class FeedForward(nn.Module):
    """The gated FFN w2(act(w1 x) * w3 x), act in {silu, relu, stoch}: the method's one line of math, and
    the plain PyTorch reference that the C and CUDA kernels are tested against. lib/attach.py switches
    a model onto the sparse kernels from outside (it packs the weights and gives the module its own forward)."""

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.act, self.p = config.act, config.p
        self.generator = None  # torch.Generator for StochA's draws; None = the global RNG
        self.threshold = 0.0  # t: units with |act(W1 x)| <= t count as zero (GPT.calibrate_thresholds)
        self.stats = None  # a dict while GPT.ffn_stats() counts zeros

    def forward(self, x):
        return F.dropout(self.w2(self.act_fn(self.w1(x)) * self.w3(x)), self.dropout, self.training)

    def act_fn(self, u):
        """This layer's act(u); with a threshold t > 0, units with |act(u)| <= t are zero (act relu or silu)."""
        if self.threshold and self.act not in ("relu", "silu"):
            raise ValueError(f"a threshold needs act relu or silu, not {self.act!r}")
        a = gate_t(u, self.act, self.threshold) if self.threshold else act_fn(u, self.act, self.p, self.generator)
        if self.stats is not None:  # GPT.ffn_stats() is counting
            zero = (a == 0).reshape(-1, a.shape[-1])
            self.stats["zeros"] += zero.sum().item()
            self.stats["count"] += zero.numel()
            self.stats["fired"] |= ~zero.all(0)
        return a


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, cos, sin, start_pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos)
        return x + self.ffn(self.ffn_norm(x))

# -----------------------------------------------------------------------------
# the model


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # GPT-2's BPE cut to 4,096 ids (lib/data.py); padded up to a multiple of 64
    block_size: int = 256  # the longest context, in tokens
    n_layer: int = 8
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads (grouped-query attention); n_head = n_kv_head is plain MHA
    n_embd: int = 192
    ffn_hidden: int = 0  # FFN hidden size; 0 = Llama's rule, 2/3 * 4 * n_embd rounded up to 64
    act: str = "stoch"  # the FFN activation: "silu", "relu" or "stoch" (StochA)
    p: float = 0.5  # StochA: probability of silu (rather than 0) for a negative input
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self):
        if self.ffn_hidden == 0:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_act(self.act, self.p)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must be n_head={self.n_head} times an even head size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")


def check_act(act, p):
    if act not in ACTS:
        raise ValueError(f"unknown act {act!r}, expected one of {ACTS}")
    check_p(p)


def check_threshold(t, name="threshold t"):
    """A threshold the kernels can take: a number in [0, T_MAX] (fp32's range: they compare in fp32)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= T_MAX:  # NaN fails too
        raise ValueError(f"{name} must be a number in [0, {T_MAX:.8g}] (fp32's range), got {t!r}")


def check_p(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:  # NaN fails too
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")


_COMPILED = weakref.WeakKeyDictionary()  # model -> its compiled self (not an attribute: it is a Module too)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        padded_vocab = 64 * math.ceil(config.vocab_size / 64)  # faster matmuls
        self.tok_emb = nn.Embedding(padded_vocab, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, padded_vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.engine = None  # the C decode engine that decode.attach_engine() packs; None: PyTorch decodes
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def check_positions(self, n):
        """n positions fit block_size and the RoPE tables (built at __init__: a block_size raised later is refused)."""
        rows, bs = self.rope_cos.shape[0], self.config.block_size
        if n > min(bs, rows):
            raise ValueError(f"{n} positions exceed " + (f"block_size={bs}" if n > bs else f"the RoPE tables' {rows} "
                             "rows (block_size was raised after the model was built: build it anew)"))

    def check_idx(self, idx):
        """A (B, T) prompt of token ids (B, T >= 1, any integer dtype) on the model's device, each in [0, vocab_size):
        one clear error otherwise, the same for every engine. Returns it as int64."""
        dev, V = self.tok_emb.weight.device, self.config.vocab_size
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) \
                or idx.dim() != 2 or 0 in idx.shape:
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be a (B, T) integer tensor of token ids with B, T >= 1, got {got}")
        if idx.device != dev:
            raise ValueError(f"idx is on {idx.device}, the model on {dev}")
        if dev.type != "meta" and not 0 <= int(idx.min()) <= int(idx.max()) < V:  # meta tensors hold no values
            raise ValueError(f"token ids must be in [0, {V}), got {int(idx.min())}..{int(idx.max())}")
        return idx.long()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def set_act(self, act, p=None, generator=None):
        """Switch every FFN's activation in place (the Swi+FT switch to relu, or StochA sampling)."""
        p = self.config.p if p is None else p
        check_act(act, p)
        self.config.act, self.config.p = act, p
        for block in self.blocks:
            block.ffn.act, block.ffn.p, block.ffn.generator = act, p, generator

    def forward(self, idx, targets=None, start_pos=None):
        """idx: (B, T) token ids. Returns (logits, loss); logits (B, T, vocab_size), or only the
        last position's when there are no targets. start_pos: None for a full pass; an int to run
        the T tokens at positions start_pos.. against the KV cache (see setup_cache)."""
        B, T = idx.shape
        start = 0 if start_pos is None else start_pos
        self.check_positions(start + T)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.drop(self.tok_emb(idx))
        for block in self.blocks:
            x = block(x, cos, sin, start_pos)
        x = self.norm(x)
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :])[..., :self.config.vocab_size], None
        logits = self.lm_head(x)
        # mask the padding in place rather than crop: a crop would copy the (B, T, V) logits
        logits[..., self.config.vocab_size:] = float("-inf")
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits[..., :self.config.vocab_size], loss

    @contextmanager
    def ffn_stats(self):
        """Counts, over the forwards run inside the with-block, per layer: the fraction of exactly-zero
        FFN units act(W1 x) (sparsity) and the fraction of units zero on every token (dead units).
        Yields a list that holds one dict per layer once the block ends."""
        ffns = [block.ffn for block in self.blocks]
        for ffn in ffns:
            ffn.stats = dict(zeros=0, count=0, fired=torch.zeros(ffn.w1.out_features, dtype=torch.bool,
                                                                  device=ffn.w1.weight.device))
        layers = []
        try:
            yield layers
            layers.extend(dict(sparsity=f.stats["zeros"] / max(f.stats["count"], 1),
                               dead=1.0 - f.stats["fired"].float().mean().item()) for f in ffns)
        finally:
            for ffn in ffns:
                ffn.stats = None

    # -------------------------------------------------------------------------
    # thresholds: inference sparsity without retraining (CATS for SILU; also RELU models)

    def set_thresholds(self, ts):
        """Per-layer thresholds t (a list of floats in [0, T_MAX], one per layer; None = 0 everywhere)."""
        ts = [0.0] * len(self.blocks) if ts is None else list(ts)
        if len(ts) != len(self.blocks):
            raise ValueError(f"need {len(self.blocks)} thresholds (one per layer), got {len(ts)}")
        for l, t in enumerate(ts):
            check_threshold(t, f"layer {l}'s threshold")
        for block, t in zip(self.blocks, ts):
            block.ffn.threshold = float(t)

    @torch.no_grad()
    def calibrate_thresholds(self, batches, sparsity):
        """CATS' calibration, layer by layer: each layer's t is the value below which a fraction `sparsity`
        of its |act(W1 x)| falls on `batches` (an iterable of (B, T) token ids: training text, not the
        evaluation's), with the thresholds of the layers before it in place, as they will be at inference:
        they change what the layer sees. A layer already sparser than that gets t = 0. The model's act must
        be relu or silu. Sets and returns the thresholds."""
        if self.config.act not in ("relu", "silu"):
            raise ValueError(f"thresholds need act relu or silu, not {self.config.act!r} (see set_act)")
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        self.set_thresholds(None)
        xs = []  # per batch, the residual stream entering the next block to calibrate
        for idx in batches:
            if idx.shape[1] > self.config.block_size:
                raise ValueError(f"{idx.shape[1]} positions exceed block_size={self.config.block_size}")
            xs.append(self.drop(self.tok_emb(idx)))
        rope = lambda x: (self.rope_cos[:x.shape[1]], self.rope_sin[:x.shape[1]])
        with self.ffn_stats():  # which also keeps attached kernels out: the hook sees every W1 x
            for block in self.blocks:  # one pass to calibrate the block, one to feed the next: 2 model passes in all
                acts = []
                hook = block.ffn.w1.register_forward_hook(lambda m, i, o: acts.append(o.float().flatten()))
                try:
                    for x in xs:
                        block(x, *rope(x))
                finally:
                    hook.remove()
                a = gate_t(torch.cat(acts), self.config.act).abs()
                k = math.floor(sparsity * a.numel())  # the k smallest |act| fall at or below t
                block.ffn.threshold = a.kthvalue(k).values.item() if k > 0 else 0.0
                xs = [block(x, *rope(x)) for x in xs]  # with this block's threshold in place
        return [block.ffn.threshold for block in self.blocks]

    # -------------------------------------------------------------------------
    # generation with a KV cache

    def setup_cache(self, batch_size, max_len=None):
        max_len = max_len or self.config.block_size
        param = self.tok_emb.weight
        for block in self.blocks:
            attn = block.attn
            shape = (batch_size, attn.n_kv_head, max_len, attn.head_dim)
            attn.cache_k = torch.zeros(shape, dtype=param.dtype, device=param.device)
            attn.cache_v = torch.zeros(shape, dtype=param.dtype, device=param.device)

    def clear_cache(self):
        for block in self.blocks:
            block.attn.cache_k = block.attn.cache_v = None

    def compiled(self):
        """This model under torch.compile (dynamic shapes: one compile serves every position), made
        once and kept; the C kernels that attach.attach() adds run inside it as custom ops."""
        if self not in _COMPILED:
            _COMPILED[self] = torch.compile(self, dynamic=True)
        return _COMPILED[self]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, compile=False,
                 engine="auto"):
        """Continue the (B, T) prompt by max_new_tokens tokens, one forward per new token after the
        prompt. temperature 0 is greedy. `generator` drives the sampling (StochA has its own, see
        set_act). compile=True: each step runs through self.compiled() (the first call compiles, tens of
        seconds; Python's per-op overhead is then gone from a decode step). engine: "torch" (this file),
        "c" (the C engine decode.attach_engine() put on self.engine: a step is one C call), or "auto"
        (the C engine where one is attached; it holds a packed copy of the weights, repacked when a generation
        starts after the model changed: see decode.py). Returns (B, T + max_new_tokens) int64 token ids."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        idx = self.check_idx(idx)
        B, T = idx.shape
        self.check_positions(T + max_new_tokens)
        for l, block in enumerate(self.blocks):  # set_thresholds checks them; an attribute set directly is not
            check_threshold(block.ffn.threshold, f"layer {l}'s threshold")
        if engine not in ("auto", "torch", "c"):
            raise ValueError(f"engine must be 'auto', 'torch' or 'c', got {engine!r}")
        use_c = engine == "c" or engine == "auto" and self.engine is not None
        if use_c and (self.engine is None or compile):
            raise ValueError("engine='c' needs decode.attach_engine(model) first" if self.engine is None
                             else "compile=True is for the torch engine (the C engine is compiled C)")
        if use_c:
            step = self.engine.start(self, B, T + max_new_tokens)  # its own KV cache, in C
        else:
            step = self.compiled() if compile else self
            self.setup_cache(B, T + max_new_tokens)
        try:
            logits, _ = step(idx, start_pos=0)  # the prompt in one pass
            for pos in range(T, T + max_new_tokens):
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat((idx, next_id), dim=1)
                if pos + 1 < T + max_new_tokens:
                    logits, _ = step(next_id, start_pos=pos)
            return idx
        finally:
            step.close() if use_c else self.clear_cache()

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        """Build the model from train.py's checkpoint (a path or the loaded dict)."""
        if not isinstance(ckpt, dict):
            ckpt = load_checkpoint(ckpt)
        model = cls(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device)


def load_checkpoint(path):
    """train.py's checkpoint as a dict (on the CPU), or a clear error for a missing or bad file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: corrupt, truncated or not a checkpoint "
                         f"({type(e).__name__})") from None
    missing = {"model", "model_args", "config", "iter_num"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"checkpoint {path} is not one of train.py's: it lacks {sorted(missing)}")
    return ckpt


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of (B, V) logits: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
