"""Reproducible benchmarks. Each writes benchmarks/results/<name>.json; `make bench` renders the table."""
