"""
bench.py's main path at its smallest: every row it should print is printed and written, as strict JSON.

Run: python -m pytest -q tests/test_bench.py   (the whole suite: python -m pytest -q; with the full grid: --full)
CPU only, no network. The numbers are checked for sense, never for speed.
"""

import subprocess
import sys

import pytest
import torch

from testutil import ROOT, pytest_kernel


@pytest_kernel
def test_bench_smoke(tmp_path):
    """bench.py's main path at its smallest (tiny sizes, few reps, a 16 MiB roof): every row it should print is
    printed and written, as strict JSON; the numbers are checked for sense, never for speed."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--sizes=40x72,24x50", "--batches=1,3", "--sparsities=0,90",
                        "--dtypes=float32,int8", "--min_time=0.001", "--min_reps=2", "--rotate_mb=1", "--roof_mb=16",
                        "--e2e=False", "--gather=True", f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    def no_constant(c):
        raise ValueError(f"not strict JSON: {c}")
    report = json.loads(out.read_text(), parse_constant=no_constant)
    rows = report["rows"]
    assert report["threads"] == torch.get_num_threads() and report["cpu"]
    want = {("torch dense", "float32", d, B, None) for d in (40, 24) for B in (1, 3)}
    want |= {(impl, dt, d, B, s) for d in (40, 24) for B in (1, 3) for s in (0.0, 90.0)
             for impl, dt in (("C tuned", "float32"), ("C tuned", "int8"), ("C plain", "float32"), ("C plain", "int8"),
                              ("torch gather", "float32"))}
    got = {(r_["impl"], r_["dtype"], r_["d"], r_["B"], r_["s"]) for r_ in rows}
    assert want <= got, sorted(want - got)
    for row in rows:
        assert row["time_ms"] > 0 and row["GBps"] > 0 and row["roof_GBps"] > 0, row
        assert f"{row['impl']:13s} {row['dtype']:8s} {row['d']:5d}" in r.stdout, row
        if row["impl"] != "torch dense":
            assert row["speedup"] > 0, row
        if row["impl"] in ("C tuned", "C plain") and row["dtype"] == "float32":  # dense bytes / these bytes, W1 in full
            n_on = row["h"] - round(row["s"] / 100 * row["h"])
            assert row["ideal"] == pytest.approx(3 / (1 + 2 * n_on / row["h"]), rel=1e-6), row


@pytest_kernel
def test_engine_rows(capsys, monkeypatch):
    """bench_e2e's C engine rows on a small model: dense and sparse per dtype, each with its breakdown."""
    from types import SimpleNamespace

    from lib import bench_e2e
    from model import GPT
    from testutil import tiny_config
    monkeypatch.setattr(bench_e2e, "E2E_SECONDS", 0.05)
    model = GPT(tiny_config(act="relu")).eval()
    ctx = SimpleNamespace(rows=[], dev_dtypes=lambda dev: [torch.float32, torch.bfloat16, torch.int8],
                          roof_now=lambda dev: 20.0)
    prompt = torch.randint(97, (1, 5))
    ref = model.generate(prompt, 6, temperature=0.0, engine="torch")
    rows = bench_e2e.engine_rows(ctx, model, "tiny", prompt, 6, ref)
    out = capsys.readouterr().out
    assert sorted((f, str(dt)) for f, dt in rows) == sorted((f, str(dt)) for f in ("dense", "sparse")
                                                           for dt in (torch.float32, torch.bfloat16, torch.int8))
    assert ctx.rows == list(rows.values()) and model.engine is None
    for (ffn, dt), row in rows.items():
        assert row["tokens_per_s"] > 0 and f"C engine {ffn} {str(dt)[6:]}" in out, row
        parts = row["breakdown"]["parts"]
        assert len(parts) == 6 and all(p["ms"] >= 0 for name, p in parts.items() if not name.startswith("Python"))
        assert sum(p["ms"] for p in parts.values()) == pytest.approx(row["breakdown"]["step_ms"], rel=1e-6)
        assert (0 < row["sparsity"] < 100) if ffn == "sparse" else row["sparsity"] == 0
        fp32 = ffn == "dense" and dt == torch.float32
        assert ("same tokens as dense" in out) or not fp32
    assert out.count("sparse / dense") == 3
