"""A shard with flipped bytes: ``umbrella-pack verify`` names it, and training refuses to start on
it with the same message (``ShardDataset.check()`` runs in ``train.inputs.build_inputs``).

Damage to a chunk outside the stamped ends is caught on read by the per-chunk xxh3 checksum
(training reads format v2 only), naming the chunk and its subject (tests/pack/test_shards.py::
test_flipped_chunk_byte_named_on_read_and_by_verify).
"""

from __future__ import annotations

import shutil

import pytest
from helpers.faults import run_in_session
from helpers.training import BIN, base_sets, env, train_cmd

from umbrella_ds.shards import CORRUPT, STAMP_BYTES

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(240)
def test_flipped_byte_named_by_verify_and_refused_by_training(train_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_data / "shards", data / "shards")
    shutil.copytree(train_data / "raw" / "instructions", data / "raw" / "instructions")
    shard = (data / "shards" / "shard-00000.h5").resolve()
    raw = bytearray(shard.read_bytes())
    # Inside the stamped head of the file (STAMP_BYTES), so the start-up check sees it; damage
    # beyond the stamp is reported with the same message at the first read of that chunk.
    raw[min(len(raw), STAMP_BYTES) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    expected = f"{shard}: {CORRUPT}"

    verify = run_in_session([str(BIN / "umbrella-pack"), "verify", str(data / "shards")], 120)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert expected in verify.stderr, verify.stderr
    assert "shard-00001.h5" not in verify.stderr  # only the damaged shard is named

    sets = base_sets(data, tmp_path / "run", **{"train.max_steps": 2})
    train = run_in_session(train_cmd(1, sets), 200, env=env())
    text = train.stdout + train.stderr
    assert train.returncode != 0, text[-3000:]
    assert expected in text, text[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step
