"""
A GGUF file's tokenizer as a tiktoken Encoding (lib/gguf_io.py reads the model): a byte-level BPE (GGUF's
tokenizer.ggml.model "gpt2") whose tokens are written in GPT-2's printable alphabet, its merges, its special
tokens, and its pre-tokenizer (the rule that splits text into words before BPE), which is named, not stored: the
names we know are in PRE_TOKENIZERS; any other is refused, since a guessed split gives other ids silently.

    from lib import gguf_tokenizer
    enc = gguf_tokenizer.tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    enc.encode("<|im_start|>user\nhi<|im_end|>", allowed_special="all"), enc.chat("hi"), enc.eot_token
    gguf_tokenizer.vocab_from_tiktoken(data.tokenizer(4096))  # GPT-2's cut BPE as GGUF's tokens and merges
"""

import functools
import hashlib
import os

# the pre-tokenizers we know, by GGUF's tokenizer.ggml.pre name: how text is split into words before BPE
# (llama.cpp's llama-vocab.cpp holds the same list). "smollm" splits every digit alone first, then GPT-2's
# split; in one pattern, a run of spaces before a digit stays whole (\s+(?=\p{N})), as it does there.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {
    "gpt-2": GPT2_SPLIT,
    "smollm": r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of the special tokens


def _byte_decoder():
    """GPT-2's byte-level BPE writes each byte as a printable character: the inverse of that table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def tokenizer(path):
    """The file's tokenizer as a tiktoken Encoding: mergeable ranks from its tokens (a token's id is its rank,
    which is BPE's merge order when, as in these files, each merge's result has a higher id than the last),
    its special tokens (types control and user-defined), and its pre-tokenizer's split pattern; named after the
    pre-tokenizer, the size and a digest of the vocabulary (data/<corpus>/<name>/ holds its ids). Cached per file."""
    return _tokenizer(os.path.abspath(path), os.path.getmtime(path))


@functools.lru_cache(maxsize=4)
def _tokenizer(path, mtime):
    from lib.gguf_io import _reader
    return make_tokenizer(_reader(path), path)


def make_tokenizer(r, path):
    """The tokenizer of an open gguf.GGUFReader r (of the file at path, named in errors)."""
    import tiktoken
    from lib.gguf_io import GGUFError, _field
    kind, pre = _field(r, "tokenizer.ggml.model"), _field(r, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported "
                        "(a SentencePiece 'llama' tokenizer is not)")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: unknown pre-tokenizer {pre!r} (known: {', '.join(PRE_TOKENIZERS)}); its split rule "
                        "decides the ids, so it is not guessed")
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    merges = _field(r, "tokenizer.ggml.merges")
    if not tokens or types is None or len(types) != len(tokens) or merges is None:
        raise GGUFError(f"{path}: the tokenizer lacks its tokens, token types or merges")
    dec = _byte_decoder()
    ranks, special = {}, {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (CONTROL, USER_DEFINED):
            special[tok] = i
            continue
        try:
            b = bytes(dec[c] for c in tok)
        except KeyError:
            raise GGUFError(f"{path}: token {i} ({tok!r}) is not in byte-level BPE's alphabet") from None
        ranks[b] = i
    last = -1
    for m in merges:  # tiktoken merges by the rank of the result: it must follow the merge order
        a, _, b = m.partition(" ")
        got = ranks.get(bytes(dec[c] for c in a + b), -2)
        if got <= last:
            raise GGUFError(f"{path}: merge {m!r} yields id {got}, not above the previous merge's {last}; "
                            "tiktoken needs the merge order to be the id order")
        last = got
    digest = hashlib.sha256(repr((pre, tokens, list(types), merges)).encode()).hexdigest()[:12]
    name = f"{pre}-{len(tokens)}-{digest}"
    enc = tiktoken.Encoding(name, pat_str=PRE_TOKENIZERS[pre], mergeable_ranks=ranks, special_tokens=special)
    eos, bos = _field(r, "tokenizer.ggml.eos_token_id"), _field(r, "tokenizer.ggml.bos_token_id")
    return _Tokenizer(enc, eos if eos is not None else special.get("<|endoftext|>", len(tokens) - 1), bos,
                      _field(r, "tokenizer.chat_template"), bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
                      tokens, list(types), merges, pre)


def vocab_from_tiktoken(enc):
    """A tiktoken byte-level BPE (data.tokenizer's GPT-2 cut, say) as GGUF's vocabulary: the tokens in id order
    in GPT-2's printable alphabet, each merged token's merge (its bytes split by the lower ranks until two parts
    are left, as GPT-2's merges list was made), and its special tokens as control tokens."""
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in enc._special_tokens.values()}
    to_str = {b: c for c, b in _byte_decoder().items()}
    text = lambda b: "".join(to_str[x] for x in b)
    tokens, types, merges = [], [], []
    special = {i: t for t, i in enc._special_tokens.items()}
    for i in range(enc.n_vocab):
        if i in special:
            tokens.append(special[i]); types.append(CONTROL)
            continue
        b = enc.decode_single_token_bytes(i)
        tokens.append(text(b)); types.append(1)
        if len(b) > 1:
            parts = [bytes([x]) for x in b]
            while len(parts) > 2:
                j = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], 1 << 62))
                parts[j:j + 2] = [parts[j] + parts[j + 1]]
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    return dict(tokens=tokens, types=types, merges=merges, pre="gpt-2")


class _Tokenizer:
    """A tiktoken Encoding (every method of it works on this object) with what the GGUF file adds: the
    end-of-sequence id (eot_token, which separates documents in train.bin), bos, the chat template, and the
    raw vocabulary (for writing it back out)."""

    def __init__(self, enc, eos, bos, chat_template, add_bos, tokens, types, merges, pre):
        self.enc, self.eot_token, self.bos_token, self.chat_template, self.add_bos = enc, eos, bos, chat_template, add_bos
        self.gguf_vocab = dict(tokens=tokens, types=types, merges=merges, pre=pre)
        self.name, self.n_vocab = enc.name, len(tokens)

    def __getattr__(self, name):  # encode, decode, decode_single_token_bytes, ...
        return getattr(self.enc, name)

    def chat(self, prompt):
        """prompt as one user turn in the model's chat template, ready for the assistant's answer (jinja2,
        which torch already installs, renders it); the prompt itself where the model has no template."""
        if not self.chat_template:
            return prompt
        import jinja2.sandbox
        t = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        bos = self.enc.decode([self.bos_token]) if self.bos_token is not None else ""
        return t.render(messages=[dict(role="user", content=prompt)], add_generation_prompt=True, bos_token=bos)
