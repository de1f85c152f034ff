"""
Sample from a trained model with any FFN activation, and measure the samples' quality and diversity.

    python sample.py                                            # the checkpoint's inference act (relu)
    python sample.py --act=stoch --p=0.7 --temperature=0        # StochA sampling: greedy, yet diverse
    python sample.py --temperature=0.8 --top_p=0.9 --prompt="ROMEO:"
    python sample.py --prompt=FILE:prompt.txt --num_samples=10 --json=report.json
    python sample.py --engine_dtype=int8                        # the C engine with int8 weights
    python sample.py --engine=torch                             # the PyTorch reference decodes
    python sample.py --ckpt=smollm2 --prompt="What is a sonnet?"  # a GGUF model, in its chat template

Decoding runs through the C engine (decode.py: one C call per token, the sparse FFN inside it) wherever it
can: on the CPU, with the C kernel built, for act relu or silu. StochA sampling (act=stoch) draws per element
and stays on PyTorch; the output says which engine decoded, and how fast.

A model imported from a GGUF file (--ckpt=FILE.gguf, a model name such as smollm2, or a run continued from one)
reads its own tokenizer; an instruct model's prompt goes through its chat template (--chat), and each sample
ends at its end-of-sequence token.

Quality: each sample's mean log-likelihood per generated token under the deterministic model (the
checkpoint's inference activation, --score_act), and the best of N by it, as the paper selects.
Diversity over the N samples, on tokens: distinct-1/2/3 (unique n-grams / all n-grams, higher is
more diverse) and self-BLEU-4 (each sample scored against the others, lower is more diverse).
"""

import math
import time
from collections import Counter
from types import SimpleNamespace

import torch

from lib.configurator import (between, cli, configure, device as device_rule, either, existing_file, is_setting, new_file,
                          one_of, optional, positive_int, strict_json)
from lib.checkpoint import load_any
from lib.data import get_tokenizer
from lib.gguf_io import MODELS
from model import ACTS, GPT

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"  # train.py's checkpoint, a GGUF file, or a model name (smollm2)
prompt = ""  # text, or FILE:path; empty = start a new document (<|endoftext|>)
act = "auto"  # auto = the checkpoint's inference activation; or silu, relu, stoch
p = 0.7  # StochA's probability of silu for negative inputs, with --act=stoch
score_act = "auto"  # the deterministic activation that scores the samples; auto = as act=auto
num_samples = 5
max_new_tokens = 100
temperature = 0.0  # 0 = greedy
top_k = None
top_p = None
seed = 1337
device = "cpu"
engine = "auto"  # auto = the C engine where it can run (CPU, C kernel built, act relu or silu); c; torch
engine_dtype = "float32"  # the C engine's weights: float32, bfloat16, float16 or int8
chat = None  # None = the prompt in the model's chat template where it has one (an instruct GGUF); True; False
json = ""  # write the report (samples, scores, diversity) to this path
quiet = False  # print the report only, not the samples
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if is_setting(k, v)}
RULES = dict(
    ckpt=either(one_of(*MODELS), existing_file), prompt=lambda v: None if not v.startswith("FILE:") or existing_file(v[5:]) is None
    else "text, or FILE: and an existing file", act=one_of("auto", *ACTS), p=between(0, 1),
    score_act=one_of("auto", "silu", "relu"),  # scoring must be deterministic
    num_samples=positive_int, max_new_tokens=positive_int, temperature=between(0),
    top_k=optional(positive_int), top_p=optional(between(0, 1, lo_open=True)), seed=between(0, integer=True),
    device=device_rule, engine=one_of("auto", "c", "torch"),
    engine_dtype=one_of("float32", "bfloat16", "float16", "int8"), chat=one_of(None, True, False),
    json=either(one_of(""), new_file), quiet=one_of(True, False),
)


def ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(samples, n):
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hyp, refs, max_n=4):
    """Sentence BLEU of hyp against refs with clipped counts, the brevity penalty of the closest
    reference length, and add-one smoothing of the n > 1 precisions (Lin and Och, 2004), as NLTK's
    sentence_bleu with smoothing method 2: an order with no n-gram in hyp (a short sample) counts as
    0 matches of 1, smoothed to 1/2, rather than being dropped."""
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hyp, n))
        max_ref = Counter()
        for r in refs:
            for g, c in Counter(ngrams(r, n)).items():
                max_ref[g] = max(max_ref[g], c)
        clipped = sum(min(c, max_ref[g]) for g, c in counts.items())
        total = max(len(hyp) - n + 1, 1)
        if n == 1 and clipped == 0:
            return 0.0
        log_p += math.log((clipped + (n > 1)) / (total + (n > 1))) / max_n
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(samples):
    if len(samples) < 2:
        return float("nan")  # undefined: null in the JSON report
    return sum(bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)) / len(samples)


@torch.no_grad()
def mean_log_likelihood(model, seqs, n_prompt):
    """Per row of (N, T) token ids: the mean log-probability of the tokens after the prompt."""
    logits, _ = model(seqs[:, :-1], seqs[:, 1:])
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, seqs[:, 1:, None])[..., 0]
    return logp[:, n_prompt - 1:].mean(dim=1).tolist()


def pick_engine(model, C, gen_act):
    """Attach the C engine where it can decode (engine auto or c); returns a line naming what decodes."""
    import decode
    import sparse_ffn
    why = ("--engine=torch" if C.engine == "torch" else f"device {C.device}" if C.device != "cpu"
           else f"act={gen_act} draws per element: the C engine runs relu and silu" if gen_act == "stoch"
           else f"no C kernel: {sparse_ffn.backends()['c']}" if sparse_ffn.backends()["c"] is not True else None)
    if why and C.engine == "c":
        raise ValueError(f"--engine=c cannot decode here: {why}")
    if why:
        return f"PyTorch ({why})"
    engine = decode.attach_engine(model, dtype=getattr(torch, C.engine_dtype))
    return f"the C engine (decode.c; {C.engine_dtype} weights, FFN sparse in {sum(engine.sparse)} of {len(engine.sparse)} layers)"


def main(argv):
    cfg = dict(DEFAULTS)
    configure(cfg, argv, RULES)
    C = SimpleNamespace(**cfg)
    state = load_any(C.ckpt)
    model = GPT.from_checkpoint(state, C.device).eval()
    # train.py stores the inference activation it resolved; otherwise the model's own
    inference_act = state.get("config", {}).get("eval_act", model.config.act)
    gen_act = inference_act if C.act == "auto" else C.act
    score = inference_act if C.score_act == "auto" else C.score_act

    enc = get_tokenizer(state.get("config", {}).get("tokenizer", "gpt2"), model.config.vocab_size)  # the model's own
    text = open(C.prompt[5:]).read() if C.prompt.startswith("FILE:") else C.prompt
    chat = getattr(enc, "chat_template", None) and text and C.chat is not False
    if C.chat is True and not chat:
        raise ValueError("--chat=True, but this model has no chat template (or the prompt is empty)")
    stop = hasattr(enc, "gguf_vocab")  # a GGUF model's tokenizer: a sample ends at its end of sequence
    ids = (enc.encode(enc.chat(text), allowed_special="all") if chat else enc.encode_ordinary(text)) or [enc.eot_token]
    x = torch.tensor([ids] * C.num_samples, dtype=torch.long, device=C.device)
    torch.manual_seed(C.seed)
    act_gen = torch.Generator(device=C.device).manual_seed(C.seed)  # StochA's draws
    sample_gen = torch.Generator(device=C.device).manual_seed(C.seed + 1)  # the token sampling
    model.set_act(gen_act, C.p, generator=act_gen)
    engine_note = pick_engine(model, C, gen_act)
    t0 = time.perf_counter()
    out = model.generate(x, C.max_new_tokens, C.temperature, C.top_k, C.top_p, generator=sample_gen)
    tokens_per_s = C.num_samples * C.max_new_tokens / (time.perf_counter() - t0)
    model.set_act(score, C.p)
    lls = mean_log_likelihood(model, out, len(ids))
    samples = [row[len(ids):] for row in out.tolist()]
    if stop:  # cut each at its end of sequence (kept, so that the score counts ending there)
        samples = [s[:s.index(enc.eot_token) + 1] if enc.eot_token in s else s for s in samples]
    lls = [ll if len(s) == C.max_new_tokens else mean_log_likelihood(model, torch.tensor([ids + s], device=C.device),
                                                                    len(ids))[0] for ll, s in zip(lls, samples)]
    best = max(range(len(samples)), key=lambda i: lls[i])
    report = dict(ckpt=C.ckpt, act=gen_act, p=C.p if gen_act == "stoch" else None, score_act=score,
                  temperature=C.temperature, top_k=C.top_k, top_p=C.top_p, num_samples=C.num_samples, chat=bool(chat),
                  max_new_tokens=C.max_new_tokens, seed=C.seed, prompt=text, engine=engine_note,
                  tokens_per_s=tokens_per_s,
                  mean_log_likelihood=lls, best_of_n=best, best_log_likelihood=lls[best],
                  avg_log_likelihood=sum(lls) / len(lls),
                  distinct_1=distinct_n(samples, 1), distinct_2=distinct_n(samples, 2),
                  distinct_3=distinct_n(samples, 3), self_bleu=self_bleu(samples),
                  unique_samples=len(set(map(tuple, samples))), samples=[enc.decode(s) for s in samples],
                  tokenizer=enc.name, prompt_ids=ids, sample_ids=samples)
    if not C.quiet:
        for i, s in enumerate(report["samples"]):
            print(f"--- sample {i} (mean log-likelihood {lls[i]:.3f}{', best' if i == best else ''})\n{text}"
                  + ("\n" if chat else "") + s)
    desc = f"act={gen_act}" + (f" p={C.p}" if gen_act == "stoch" else "") + f", temperature={C.temperature}" \
        + (f", top_k={C.top_k}" if C.top_k else "") + (f", top_p={C.top_p}" if C.top_p else "")
    print(f"=== {C.num_samples} samples of {C.max_new_tokens} tokens, {desc}; scored with {score}")
    print(f"decoded by {engine_note}: {tokens_per_s:,.0f} tokens/s ({C.num_samples} sequences at once, "
          f"{torch.get_num_threads()} threads)")
    print(f"mean log-likelihood: avg {report['avg_log_likelihood']:.3f}, best-of-{C.num_samples} "
          f"{lls[best]:.3f} (sample {best}); unique samples {report['unique_samples']}/{C.num_samples}")
    print(f"diversity: distinct-1 {report['distinct_1']:.3f}, distinct-2 {report['distinct_2']:.3f}, "
          f"distinct-3 {report['distinct_3']:.3f}, self-BLEU-4 {report['self_bleu']:.3f}")
    if C.json:
        with open(C.json, "w") as f:
            f.write(strict_json(report, indent=1))  # self_bleu of one sample is undefined: null
    return report


if __name__ == "__main__":
    cli(main)
