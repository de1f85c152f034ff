"""pytest: every test starts from a seed fixed by its own name, so a failure reproduces when rerun alone;
TEST_SEED=n shifts every test's seed (a fuzz run over other inputs). Tests that draw a seed of their own
from torch's generator print it in their failure messages.

Two runs: `python -m pytest -q` is the fast one (every feature, a few minutes on 2 cores); `--full` (or
FULL_TESTS=1) adds the tests and parametrize cases marked `full` (the large grids: shapes x dtypes x
sparsities x batches, every SIMD build, builds from scratch, the subprocess sweeps, DDP, ...). CI runs --full.

The fixtures shared by several files are here (a tiny training run, the built C kernel); the helpers are
in tests/testutil.py."""
import os
import random
import sys
import zlib

import numpy as np
import pytest
import torch

# the tests import the project's modules (model.py, lib/, experiments/) from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEST_SEED = int(os.environ.get("TEST_SEED", "0"))
FULL_REASON = "part of the full grid: run with --full (or FULL_TESTS=1)"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the tests marked full (the large grids; what CI runs). FULL_TESTS=1 does the same")


def full_run(config):
    return config.getoption("--full") or os.environ.get("FULL_TESTS", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: part of the full grid, skipped unless --full (or FULL_TESTS=1)")


def pytest_report_header(config):
    grid = ("full grid: every test, those marked full included" if full_run(config)
            else "fast run: the tests marked full are skipped (--full or FULL_TESTS=1 runs them)")
    return [f"TEST_SEED={TEST_SEED} (each test's seed: crc32 of its node id + TEST_SEED)", grid]


def pytest_collection_modifyitems(config, items):
    if full_run(config):
        return
    skip = pytest.mark.skip(reason=FULL_REASON)
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With -q there is no header: say here that the full grid was left out, and how to run it."""
    if full_run(config):
        return
    n = sum(1 for r in terminalreporter.stats.get("skipped", [])
            if isinstance(r.longrepr, tuple) and FULL_REASON in str(r.longrepr[-1]))
    if n:
        terminalreporter.write_line(f"fast run: {n} tests of the full grid skipped (python -m pytest -q --full runs them)")


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + TEST_SEED) % (1 << 31)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="session")
def c_kernel():
    """The C kernel must build here (CI has gcc): built now if it is missing or stale."""
    import build
    import sparse_ffn
    ok, msg = build.ensure_c()
    assert ok, f"the C kernel must build here: {msg}"
    assert sparse_ffn.backends()["c"] is True, sparse_ffn.backends()["c"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One short StochA + Swi+FT run on a tiny local corpus, shared by the tests of test_train.py and
    test_sample_results.py (which copy what they change)."""
    import train
    from testutil import TINY, write_corpus
    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "texts", n_docs=12)
    out = root / "out"
    args = [f"--data={corpus}", f"--data_root={root / 'data'}", f"--out_dir={out}", "--max_iters=150",
            "--eval_interval=50", "--log_interval=10", "--p=0.5", "--alpha=0.2"] + TINY
    summary = train.main(args)
    return dict(out=out, corpus=corpus, root=root, summary=summary, args=args)
