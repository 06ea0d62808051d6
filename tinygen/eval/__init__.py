"""Evaluation of FastGen: fidelity against the full cache, memory kept, baselines at equal memory, plots.

Run `python -m tinygen.eval --help`."""
