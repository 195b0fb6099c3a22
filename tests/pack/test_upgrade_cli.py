"""``umbrella-pack upgrade``: a v1 pack becomes v2 through the CLI, verifies, reads back equal;
a folder without a pack is a usage error (exit 2), a damaged one a failure (exit 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.v1_shards import V1ShardWriter, write_v1_index

from umbrella_ds import shards
from umbrella_ds.shards.v1 import open_any

SHAPES = {"T1": (6, 6, 6), "rsfMRI": (4, 4, 4)}


def _v1_pack(out: Path) -> dict[str, np.ndarray]:
    out.mkdir(parents=True)
    rng = np.random.default_rng(5)
    truth, records = {}, []
    for k in range(2):
        w = V1ShardWriter(out, k, SHAPES, "blosc-lz4", {}, f"job{k}")
        for pos in (2 * k, 2 * k + 1):
            t1 = rng.standard_normal(SHAPES["T1"]).astype(np.float16)
            rs = rng.standard_normal((7 + pos, *SHAPES["rsfMRI"])).astype(np.float16)
            truth[f"S{pos}"] = t1
            truth[f"S{pos}/rs"] = rs
            w.add_subject(f"S{pos}", pos, {}, {"T1": t1, "rsfMRI": rs}, {})
        records.append(w.close())
    write_v1_index(out, records, shapes=SHAPES, preprocessing={}, compression="blosc-lz4",
                   subjects_per_shard=2)  # fmt: skip
    return truth


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.timeout(200)
def test_upgrade_cli(tmp_path: Path) -> None:
    out = tmp_path / "pack"
    truth = _v1_pack(out)
    r = _cli("upgrade", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 shard(s)" in r.stdout and "format v2" in r.stdout
    assert _cli("verify", str(out)).returncode == 0
    ds = shards.open_dataset(out)
    assert ds.format_version == 2
    for pos in range(4):
        np.testing.assert_array_equal(ds.read(f"S{pos}", "T1"), truth[f"S{pos}"])
        np.testing.assert_array_equal(
            ds.read_window(f"S{pos}", "rsfMRI", 2, 5),
            np.moveaxis(truth[f"S{pos}/rs"][2:7], 0, -1),
        )
    r = _cli("upgrade", str(out))
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = _cli("upgrade", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no index.json" in r.stderr and "Traceback" not in r.stderr
    damaged = tmp_path / "damaged"
    _v1_pack(damaged)
    path = damaged / "shard-00001.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = _cli("upgrade", str(damaged))
    assert r.returncode == 1 and "shard-00001.h5" in r.stderr and "nothing upgraded" in r.stderr
    assert "Traceback" not in r.stderr
    assert open_any(damaged).format_version == 1
