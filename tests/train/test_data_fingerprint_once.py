"""A run's start opens the shards' index and hashes the instruction files once.

The engine checks the data fingerprint against a checkpoint before the model is built; the inputs
are built later from the same `inputs.DataSource` instead of opening and hashing it all again.
Counted in a real start (one process, the "single" launcher) that stops before the first step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.training import REPO, base_sets, env

# Runs in its own process (it starts a process group and DeepSpeed): counts every index open,
# every data fingerprint and every read of an instruction file's bytes, up to the loop.
SCRIPT = r"""
import collections, json, sys
from pathlib import Path
from umbrella_ds import shards
from umbrella_ds.config import load_config
from umbrella_ds.train import engine, inputs

opened, hashed, read = collections.Counter(), [0], collections.Counter()
shard_init, fingerprint, read_bytes = shards.ShardDataset.__init__, inputs.data_fingerprint, Path.read_bytes

def counting_init(self, path):
    opened[str(Path(path).resolve())] += 1
    shard_init(self, path)

def counting_fingerprint(*a, **kw):
    hashed[0] += 1
    return fingerprint(*a, **kw)

def counting_read_bytes(self):
    read[self.name] += 1
    return read_bytes(self)

shards.ShardDataset.__init__ = counting_init
inputs.data_fingerprint = counting_fingerprint
Path.read_bytes = counting_read_bytes
engine.loop = lambda state: 0  # the start only: build and restore
cfg = load_config(sys.argv[1], sys.argv[2:])
assert engine.run(cfg) == 0
print(json.dumps({"opened": opened, "hashed": hashed[0], "read": read}))
"""


@pytest.mark.timeout(300)
def test_start_opens_the_index_and_hashes_the_data_once(train_data, tmp_path):
    sets = base_sets(train_data, tmp_path / "run", **{"train.max_steps": 1})
    e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "configs" / "demo.yaml"), *sets],
        env=e, capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    shards_dir = str((train_data / "shards").resolve())
    assert counts["opened"] == {shards_dir: 1}
    assert counts["hashed"] == 1
    # each instruction file's bytes read once, by the fingerprint (tasks are parsed from text),
    # and the index's once, by its one open
    jsonl = {k: n for k, n in counts["read"].items() if k.endswith(".jsonl")}
    assert jsonl == {"t1_sex_train.jsonl": 1, "t1_sex_eval.jsonl": 1}
    assert counts["read"]["index.json"] == 1
