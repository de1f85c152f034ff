"""
The tests of sampling and the results pipeline: sample.py (StochA's diverse greedy samples, RELU's
deterministic ones, the prompt and the JSON report); the diversity metrics (distinct-n, BLEU as NLTK
computes it, self-BLEU); strict JSON (null, never NaN); experiments/run.py's runs, tables, frontier and health
stages, and experiments/plot.py's figures, on fake summaries and on tests/conftest.py's tiny run.

Run: python -m pytest -q tests/test_sample_results.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network.
"""

import json
import math
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

import sample
import train
from lib.configurator import configure
from model import GPT, GPTConfig
from testutil import ROOT

# -----------------------------------------------------------------------------
# sample.py, the diversity metrics, strict JSON


def test_sample_stoch_is_diverse_and_relu_greedy_is_deterministic(tmp_path):
    # an untrained model with a strong FFN: StochA's draws flip its greedy choices (on the tiny trained
    # model they move all the top logits together and rarely do)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, act="relu")
    ckpt = tmp_path / "ckpt.pt"
    model = GPT(cfg)
    for name, w in model.named_parameters():
        if ".ffn.w" in name:  # large FFN weights, so that the activation's draws move the logits
            torch.nn.init.normal_(w, std=0.5)
    torch.save(dict(model=model.state_dict(), model_args=asdict(cfg), config=dict(act="relu", alpha=0.0, eval_act="relu"),
                    iter_num=0), ckpt)
    common = [f"--ckpt={ckpt}", "--num_samples=6", "--max_new_tokens=24", "--temperature=0", "--quiet=True",
              "--prompt=Romeo"]
    relu = sample.main(common + ["--act=relu"])
    assert relu["act"] == "relu" and relu["unique_samples"] == 1 and relu["self_bleu"] == pytest.approx(1.0)
    assert sample.main(common + ["--act=relu", "--seed=7"])["samples"] == relu["samples"]
    stoch = sample.main(common + ["--act=stoch", "--p=0.5", f"--json={tmp_path / 'r.json'}"])
    assert stoch["unique_samples"] > 1 and stoch["distinct_2"] > relu["distinct_2"]
    assert stoch["self_bleu"] < 1.0
    assert json.load(open(tmp_path / "r.json"))["samples"] == stoch["samples"]
    assert sample.main(common + ["--act=stoch", "--p=0.5"])["samples"] == stoch["samples"]  # seeded
    assert max(stoch["mean_log_likelihood"]) == stoch["best_log_likelihood"]
    assert sample.main(common)["act"] == "relu"  # auto: the checkpoint's inference activation
    # the C engine decodes relu by default and says so; StochA stays on PyTorch, saying why
    assert relu["engine"].startswith("the C engine") and stoch["engine"].startswith("PyTorch (act=stoch")
    assert sample.main(common + ["--act=relu", "--engine=torch"])["samples"] == relu["samples"]
    assert sample.main(common + ["--act=relu", "--engine_dtype=int8"])["engine"].startswith("the C engine (decode.c; int8")
    with pytest.raises(ValueError, match="cannot decode here"):
        sample.main(common + ["--act=stoch", "--engine=c"])


def strict_loads(text):
    """json.loads that refuses NaN and Infinity, as strict JSON parsers do"""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_strict_json_writes_null_for_undefined_numbers():
    from lib.configurator import strict_json
    nan, inf = float("nan"), float("inf")
    obj = dict(a=nan, b=[1, inf, (2.5, -inf)], c=dict(d=[dict(e=nan)]), f=np.float32(1.5), g=np.float64(nan),
               h=torch.tensor(nan), i=torch.tensor([1.0, -inf]), j=np.array([[inf, 2.0]]), k=np.int64(3), l=True,
               m=None, n="NaN", o=-0.0, p=1e308)
    want = dict(a=None, b=[1, None, [2.5, None]], c=dict(d=[dict(e=None)]), f=1.5, g=None, h=None, i=[1.0, None],
                j=[[None, 2.0]], k=3, l=True, m=None, n="NaN", o=-0.0, p=1e308)
    with pytest.raises(ValueError, match="not strict"):
        strict_loads(json.dumps(obj["a"]))  # what json.dumps alone writes
    for kw in ({}, dict(indent=1)):
        assert strict_loads(strict_json(obj, **kw)) == want
    assert strict_json([nan, 1]) == "[null, 1]"


def test_sample_json_report_is_strict_with_one_sample(tmp_path):
    """One sample has no self-BLEU: the report says null, not NaN (which strict parsers reject)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, block_size=16, vocab_size=1024, act="relu")
    ckpt = tmp_path / "ckpt.pt"
    torch.save(dict(model=GPT(cfg).state_dict(), model_args=asdict(cfg), config=dict(eval_act="relu"), iter_num=0), ckpt)
    report = sample.main([f"--ckpt={ckpt}", "--num_samples=1", "--max_new_tokens=4", "--quiet=True",
                          f"--json={tmp_path / 'r.json'}"])
    assert math.isnan(report["self_bleu"])
    written = strict_loads((tmp_path / "r.json").read_text())
    assert written["self_bleu"] is None and written["sample_ids"] == report["sample_ids"]


def test_diversity_metrics():
    same = [[1, 2, 3, 4, 5]] * 3
    assert sample.distinct_n(same, 1) == pytest.approx(5 / 15)
    assert sample.self_bleu(same) == pytest.approx(1.0)
    apart = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    assert sample.distinct_n(apart, 2) == 1.0 and sample.self_bleu(apart) == 0.0
    assert 0 < sample.bleu([1, 2, 3, 4, 9], [[1, 2, 3, 4, 5]]) < 1


@pytest.mark.parametrize("hyp,refs,want", [  # values from NLTK 3.9.1: sentence_bleu(refs, hyp, smoothing method2)
    ([1, 2], [[1, 2, 3], [2, 1]], 0.7071067811865476),  # shorter than 4: missing orders count 0 of 1, smoothed
    ([1], [[1]], 0.5946035575013605),
    ([1, 2, 3], [[1, 2, 3]], 0.8408964152537145),
    ([1, 2, 3], [[1, 2, 3, 4, 5, 6, 7]], 0.22165788851265286),  # and the brevity penalty
    ([3, 3, 3, 3], [[3, 3], [3]], 0.4518010018049224),  # clipped counts
    ([1, 2, 3, 4, 5, 6], [[1, 2, 3, 9, 5, 6], [6, 5, 4]], 0.5081327481546147),
    ([1, 2, 3, 4, 5], [[1, 2, 3, 4, 5]], 1.0),
    ([1], [[2]], 0.0),  # no unigram in common
])
def test_bleu_matches_the_standard_definition_at_every_length(hyp, refs, want):
    assert sample.bleu(hyp, refs) == pytest.approx(want, abs=1e-12)


# -----------------------------------------------------------------------------
# experiments/run.py and experiments/plot.py: the results pipeline


def test_experiment_runs_are_valid_train_commands():
    from experiments import run as experiments
    from types import SimpleNamespace
    runs = experiments.quality_runs()
    assert len({d for *_, d in runs}) == len(runs)  # one out_dir per run
    steps = {}
    for group, name, seed, argv, d in runs:
        cfg = dict(train.DEFAULTS)
        configure(cfg, [os.path.join(ROOT, argv[0])] + argv[1:])
        train.check_config(SimpleNamespace(**cfg))
        assert cfg["seed"] == seed and cfg["out_dir"] == d
        steps.setdefault(group, set()).add((cfg["max_iters"], cfg["batch_size"], cfg["block_size"], cfg["n_embd"]))
        if group == "cpt":  # continued pre-training starts from the same seed's SILU run
            src = next(r for r in runs if r[0] == "scratch" and r[2] == seed and "--act=silu" in r[3] and "--alpha=0" in r[3])
            assert cfg["init_from"] == os.path.join(src[4], "ckpt.pt") and runs.index(src) < runs.index((group, name, seed, argv, d))
    assert len(steps["scratch"] | steps["alpha"] | steps["p"]) == 1  # matched compute: the same model, steps, tokens
    per_row = {}
    for group, name, seed, *_ in runs:
        per_row.setdefault((group, name), set()).add(seed)
    assert all(len(v) >= (3 if g == "scratch" else 1 if g == "long" else 2) for (g, _), v in per_row.items())
    assert experiments.pm([1.0, 1.2]) == "1.100 ± 0.100" and experiments.pm([0.5], ".1f", 100) == "50.0"
    assert experiments.pm([-0.01, -0.02], "+.3f") == "-0.015 ± 0.005"


def test_quality_table_pairs_seeds_and_shows_the_switch(tmp_path, capsys, monkeypatch):
    """Each row's loss against SILU's of the same seed, and the RELU loss before the switch -> at the end."""
    from experiments import run as experiments
    monkeypatch.setattr(experiments, "out", str(tmp_path))
    def fake(name, seed, val_loss, act, alpha, evals):
        d = tmp_path / "quality" / f"{experiments.slug(name)}-s{seed}"
        d.mkdir(parents=True)
        switch = 300 - round(alpha * 300)
        (d / "summary.json").write_text(json.dumps(dict(
            val_loss=val_loss, val_bpb=val_loss / 2, sparsity=0.6, dead_fraction=0.0, act=act, p=0.5, alpha=alpha, switch_iter=switch,
            iters=300, tokens=1000, seconds=10.0, eval_act="silu" if act == "silu" and alpha == 0 else "relu",
            params=1e6, device_name="cpu", threads=1, val_tokens=100)))
        (d / "log.jsonl").write_text("".join(json.dumps(dict(kind="eval", iter=i, eval_act="relu", val_loss_infer=v)) + "\n"
                                             for i, v in evals))
    for seed, silu, stoch in ((1337, 5.0, 5.1), (1338, 5.2, 5.24)):
        fake("SILU", seed, silu, "silu", 0, [(0, 9.0), (300, silu)])
        fake("StochA p=0.5 + Swi+FT", seed, stoch, "stoch", 0.1, [(0, 9.0), (240, 6.0), (270, 5.5), (300, 5.3)])
    experiments.tables()
    text = capsys.readouterr().out
    assert "| SILU | `--act=silu --alpha=0` | 5.100 ± 0.100 | 2.550 ± 0.050 | +0.000 ± 0.000 | silu |" in text
    # paired: +0.1 and +0.04, whereas the unpaired spreads overlap; RELU at step 270 (the switch) -> 300
    assert "| StochA p=0.5 + Swi+FT | `--act=stoch --p=0.5 --alpha=0.1` | 5.170 ± 0.070 | 2.585 ± 0.035 | +0.070 ± 0.030 | relu |" in text
    assert "| 5.500 -> 5.300 |" in text


def test_tables_read_back_the_null_of_undefined_numbers(tmp_path, capsys, monkeypatch):
    """What the stages write is strict JSON, and the tables read its nulls (a diverged seed's losses, the
    self-BLEU of one sample) back as NaN rather than failing on them."""
    from experiments import run as experiments
    from lib.configurator import strict_json
    monkeypatch.setattr(experiments, "out", str(tmp_path))
    nan = float("nan")
    for seed, loss in ((1337, 5.0), (1338, nan)):  # seed 1338 diverged
        d = tmp_path / "quality" / f"{experiments.slug('SILU')}-s{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(strict_json(dict(
            val_loss=loss, val_bpb=loss / 2, sparsity=0.0, dead_fraction=0.0, act="silu", p=0.5, alpha=0, switch_iter=300,
            iters=300, tokens=1000, seconds=10.0, eval_act="silu", params=1e6, device_name="cpu", threads=1, val_tokens=100)))
        (d / "log.jsonl").write_text(strict_json(dict(kind="eval", iter=300, eval_act="silu", val_loss_infer=loss)) + "\n")
    row = dict(label="greedy", act="relu", p=0.5, temperature=0.0, top_p=None, avg_ll=-2.0, best_ll=-2.0, distinct_1=0.5,
               distinct_2=0.5, distinct_3=0.5, self_bleu=nan, unique=1.0)  # one sample: no self-BLEU
    experiments.save_json(str(tmp_path / "diversity.json"), dict(ckpt="c.pt", score_act="relu", n_prompts=1, prompt_tokens=8,
                                                                 num_samples=1, new_tokens=6, rows=[row]))
    for path in ("diversity.json", "quality/SILU-s1338/summary.json", "quality/SILU-s1338/log.jsonl"):
        strict_loads((tmp_path / path).read_text())
    assert strict_loads((tmp_path / "diversity.json").read_text())["rows"][0]["self_bleu"] is None
    assert math.isnan(experiments.load_json(tmp_path / "diversity.json")["rows"][0]["self_bleu"])
    assert experiments.load_json(tmp_path / "diversity.json")["rows"][0]["top_p"] is None  # a null that means None
    experiments.tables()
    text = capsys.readouterr().out
    assert "| SILU | `--act=silu --alpha=0` | nan ± nan | nan ± nan | +nan ± nan | silu |" in text
    assert "| greedy | -2.000 | -2.000 | 0.500 | 0.500 | nan | 1.00 |" in text


def test_frontier_and_health_from_a_checkpoint(tiny_run, tmp_path, capsys, monkeypatch):
    """The frontier stage calibrates thresholds per model and target, reaches each target's sparsity on
    validation text within a few points, resumes without redoing points, and prints its table; the
    health stage writes dead units and collapsed W1 rows for a stress run."""
    from experiments import run as experiments
    monkeypatch.setattr(experiments, "out", str(tmp_path))
    monkeypatch.setattr(experiments, "SEEDS", [1337])
    monkeypatch.setattr(experiments, "TARGETS", (0.8, 0.95))
    monkeypatch.setattr(experiments, "VAL_BATCHES", 4)
    for name in (experiments.SCRATCH[0][0], experiments.SCRATCH[4][0]):  # SILU and StochA + Swi+FT
        run = tmp_path / "quality" / f"{experiments.slug(name)}-s1337"
        run.mkdir(parents=True)
        for f in ("summary.json", "log.jsonl", "ckpt.pt"):
            (run / f).write_bytes((tiny_run["out"] / f).read_bytes())
    experiments.frontier()
    pts = json.load(open(tmp_path / "frontier.json"))["points"]
    silu = {p["target"]: p for p in pts if p["curve"] == "SILU + CATS"}
    assert set(silu) == {None, 0.8, 0.95} and silu[None]["sparsity"] < 0.01 and silu[None]["thresholds"] == []
    for target in (0.8, 0.95):
        assert abs(silu[target]["sparsity"] - target) < 0.06 and all(t > 0 for t in silu[target]["thresholds"])
        assert silu[target]["val_loss"] >= silu[None]["val_loss"] - 0.05
    stoch = [p for p in pts if p["curve"] == "StochA p=0.5 + Swi+FT + t"]
    own = next(p for p in stoch if p["target"] is None)  # its own RELU sparsity; targets below it are skipped
    assert all(p["target"] is None or p["target"] > own["sparsity"] for p in stoch)
    experiments.frontier()  # resumed: nothing is redone
    assert len(json.load(open(tmp_path / "frontier.json"))["points"]) == len(pts)
    capsys.readouterr()
    experiments.frontier_table()
    table = capsys.readouterr().out
    assert "| SILU + CATS | 80% | 1 |" in table and "training tokens layer by layer, each layer with" in table
    assert all(p["calibration"] == ("layer by layer" if p["target"] is not None else None) for p in pts)
    try:
        import matplotlib  # noqa: F401  (optional: only experiments/plot.py needs it)
        from experiments import plot
        plot.main([f"--out={tmp_path}", f"--assets={tmp_path / 'assets'}"])
        assert (tmp_path / "assets" / "frontier.png").stat().st_size > 1000
    except ImportError:
        pass
    group, name, seed, argv, d = experiments.quality_runs(("stress",))[0]
    os.makedirs(d)
    for f in ("summary.json", "log.jsonl", "ckpt.pt"):
        with open(os.path.join(d, f), "wb") as g:
            g.write((tiny_run["out"] / f).read_bytes())
    experiments.health()
    h = json.load(open(os.path.join(d, "health.json")))
    assert len(h["relu_dead_per_layer"]) == len(h["w1_collapsed_per_layer"]) == 2
    assert all(0 <= v <= 1 for v in h["relu_dead_per_layer"] + h["w1_collapsed_per_layer"])


def test_diversity_at_equal_or_better_quality():
    from experiments import run as experiments
    row = lambda label, ll, d2: dict(label=label, avg_ll=ll, best_ll=ll + 0.5, distinct_2=d2, self_bleu=1 - d2)
    rows = [row("greedy", -2.6, 0.05), row("temperature 0.2", -2.4, 0.2), row("temperature 0.5", -2.5, 0.5),
            row("temperature 1.0", -5.0, 0.9), row("top-p 0.9", -4.0, 0.8)]
    stoch = row("StochA p=0.7, greedy", -2.55, 0.06)
    # T=1.0 is more diverse but worse: the most diverse setting at least as good is T=0.5
    assert experiments.at_least(rows, stoch, "avg_ll", ("temperature", "greedy")) == "temperature 0.5: 0.500 / 0.500 (-2.500)"
    assert experiments.at_least(rows, stoch, "avg_ll", ("top-p",)) == "none as good"


def test_diversity_tables_and_plots_from_a_checkpoint(tiny_run, tmp_path, capsys):
    from experiments import run as experiments
    from experiments import plot
    out = tmp_path / "exp"
    ckpt = tiny_run["out"] / "ckpt.pt"
    settings = dict(out=str(out), ckpt=str(ckpt), data_dir="",  # "": the checkpoint's own tokenized text
                    n_prompts=2, prompt_tokens=8, num_samples=3, new_tokens=6)
    old = {k: getattr(experiments, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(experiments, k, v)
        experiments.diversity()
        # one finished quality run, so that the tables show a quality row too
        run = out / "quality" / "SILU-s1337"
        run.mkdir(parents=True)
        for f in ("summary.json", "log.jsonl"):
            (run / f).write_text((tiny_run["out"] / f).read_text())
        capsys.readouterr()
        experiments.tables()
        text = capsys.readouterr().out
    finally:
        for k, v in old.items():
            setattr(experiments, k, v)
    rep = json.load(open(out / "diversity.json"))
    rows = {r["label"]: r for r in rep["rows"]}
    assert len(rows) == len(experiments.SAMPLERS) and rep["score_act"] == "relu"
    assert rows["greedy"]["unique"] == pytest.approx(1 / 3) and rows["greedy"]["self_bleu"] == pytest.approx(1.0)
    assert rows["StochA p=0.5, greedy"]["act"] == "stoch" and rows["temperature 1.0"]["act"] == "relu"
    for r in rows.values():
        assert r["best_ll"] >= r["avg_ll"] and 0 <= r["distinct_2"] <= 1 and 0 <= r["self_bleu"] <= 1
    assert rows["temperature 1.0"]["distinct_2"] > rows["greedy"]["distinct_2"]
    tiny = tiny_run["summary"]  # shown as a row, in nats per token and bits per byte
    assert f"| SILU | `--act=silu --alpha=0` | {tiny['val_loss']:.3f} | {tiny['val_bpb']:.3f} | +0.000 |" in text
    assert "### Diversity" in text and "| p=0.7 |" in text
    try:
        import matplotlib  # noqa: F401  (optional: only experiments/plot.py needs it)
    except ImportError:
        with pytest.raises(SystemExit, match="needs matplotlib"):
            plot.main([f"--out={out}", f"--assets={tmp_path / 'assets'}"])
    else:
        plot.main([f"--out={out}", f"--assets={tmp_path / 'assets'}"])
        assert (tmp_path / "assets" / "diversity.png").stat().st_size > 1000


def test_results_md_is_printed_from_results(monkeypatch):
    """Every table of RESULTS.md is what experiments/results.py prints from experiments/results/ today: the file cannot drift from the data."""
    from experiments import run as experiments  # its defaults: out = experiments/results/
    from experiments import results
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    assert results.MARK.search(text) and experiments.out == "experiments/results"
    monkeypatch.chdir(ROOT)
    assert results.fill(text, experiments) == text, \
        "RESULTS.md differs from its data: run `python -m experiments.run results`"


def test_every_relative_link_of_the_docs_exists():
    """README, RESULTS and WALKTHROUGH link files and figures by relative path: a moved file must not leave a
    link that points nowhere."""
    for doc in ("README.md", "RESULTS.md", "WALKTHROUGH.md"):
        text = open(os.path.join(ROOT, doc)).read()
        targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
        assert targets or doc == "WALKTHROUGH.md", doc
        for target in targets:
            assert os.path.exists(os.path.join(ROOT, target)), f"{doc} links {target}, which does not exist"
