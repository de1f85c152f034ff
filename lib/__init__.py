"""
What the scripts at the root import, beside model.py, sparse_ffn.py and decode.py:

    data.py            the corpus and its tokenizer (GPT-2's BPE cut to `vocab` ids), train.bin / val.bin, bits per byte
    checkpoint.py      a run's files (ckpt.pt, log.jsonl, summary.json) and what makes --init_from=resume exact
    configurator.py    --key=value and config-file settings, each checked against its script's rules
    runtime.py         how a run is carried out: DDP, device, autocast, torch.compile, Ctrl-C, tokens/s
    attach.py          attach(model): every FFN of a RELU model onto the kernels, from outside; compiled decoding
    gguf_io.py         a llama GGUF file in (model.GPT) and out (python -m lib.gguf_io --ckpt=... --out=...)
    gguf_tokenizer.py  a GGUF file's tokenizer as a tiktoken Encoding
    bench_e2e.py       bench.py's end-to-end decoding rows, part by part
    bench_llama.py     llama.cpp on the same weights (a GGUF export), for bench.py's rows beside it
"""
