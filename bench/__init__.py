"""Benchmarks of qvl against the usual way (tokenize at start-up, process images in the collator).

Each script runs from the repository root with one command (``python bench/<name>.py``), prints a rich
table and writes JSON; ``--smoke`` runs a tiny version in seconds (``tests/test_bench_smoke.py``).
"""
