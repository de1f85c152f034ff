"""
The lab notebook: every run behind RESULTS.md, and the code that prints its tables and draws its figures.
Run from the repository root, as modules:

    python -m experiments.run quality            # the 4M model's training runs, evaluations and timings (run.py)
    python -m experiments.smollm parity train    # SmolLM2-135M: import, continued pre-training, decoding
    python -m experiments.run results            # RESULTS.md's tables, reprinted from experiments/results/ (results*.py)
    python -m experiments.plot                   # the figures, into experiments/assets/ (needs matplotlib)

experiments/results/ holds what the stages wrote (summaries, logs, JSON; never checkpoints), experiments/assets/ the figures.
"""
