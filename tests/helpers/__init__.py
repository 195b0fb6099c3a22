"""Helpers shared by the tests (no tests, no fixtures: those live in the conftest.py files).

- `net`: a free local TCP port for a launcher's master.
- `training`: launch training runs (the real deepspeed launcher, 2 CPU ranks, gloo) and read
  their outputs.
- `data`: instruction records, the tiny tokenizer and a fake shard reader for the data tests.
- `faults`: rank processes of a run, a training job that is always killed on the way out.
"""
