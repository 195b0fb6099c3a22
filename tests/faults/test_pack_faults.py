"""Disk full during packing: a 300 KiB tmpfs holds two of the four shards. The pack stops with a
message naming the shard and the full filesystem; no temporary or half shard is left, no
index.json is written, the complete shards stay; after freeing space ``--resume`` finishes with
the bytes of an uninterrupted pack. (A killed pack: tests/pack/test_pack.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.faults import run_in_session
from helpers.training import BIN

from umbrella_ds.shards import verify

BUILD = ["--modalities", "T1", "--t1-size", "32", "32", "32", "--subjects-per-shard", "2",
         "--no-progress", "--workers", "1"]  # fmt: skip


def _pack(raw: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "umbrella-pack"), "build", "--manifest", str(raw / "manifest.csv"),
           "--out", str(out), *BUILD, *extra]  # fmt: skip
    return run_in_session(cmd, 120)


@pytest.mark.timeout(240)
def test_disk_full_during_pack_is_a_clear_error_and_resume_finishes(tmp_path):
    raw = tmp_path / "raw"
    synth = [str(BIN / "umbrella-pack"), "synth", "--out", str(raw), "--subjects", "8",
             "--t1-shape", "24", "24", "24", "--frames", "4", "--rsfmri-shape", "8", "8", "8"]  # fmt: skip
    assert run_in_session(synth, 120).returncode == 0
    ref = _pack(raw, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "full"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(out)], check=True)
    try:
        full = _pack(raw, out)
        # 1, not a crash: h5py would SIGSEGV at exit on the file it could not flush
        # (shards.ShardWriter.abort ends the process first).
        assert full.returncode == 1, full.stdout + full.stderr
        assert "shard-00002.h5: writing the shard failed because the filesystem is full" in (
            full.stderr
        ), full.stderr[-3000:]
        names = sorted(p.name for p in out.iterdir())
        assert names == [".umbrella-pack.lock", "shard-00000.h5", "shard-00001.h5"], names
        for name in ("shard-00000.h5", "shard-00001.h5"):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        resumed = _pack(raw, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert verify(out) == []
        for name in ("shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "shard-00003.h5"):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
