"""Speed benchmarks. Run from the repository root as ``python -m benchmarks.<name>`` (``run_all``: one table)."""
