"""Node-local staging (data.stage_dir): a verified copy, resumed after a kill, a damaged source
or a full disk refused naming the shard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from umbrella_ds.data import staging
from umbrella_ds.shards import INDEX_NAME, open_dataset


@pytest.fixture(scope="module")
def three_shards(cohort_6, tmp_path_factory) -> Path:
    """The 6-subject cohort packed 2 subjects a shard: 3 shards."""
    out = tmp_path_factory.mktemp("staging") / "shards"
    subprocess.run(
        [sys.executable, "-m", "data_prep.cli", "build", "--manifest", str(cohort_6 / "raw" / "manifest.csv"),
         "--out", str(out), "--t1-size", "8", "8", "8", "--rsfmri-size", "8", "8", "8",
         "--subjects-per-shard", "2", "--no-progress"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out


@pytest.fixture
def source(three_shards, tmp_path) -> Path:
    """A private copy of the shards (some tests damage it)."""
    dst = tmp_path / "shards"
    shutil.copytree(three_shards, dst)
    return dst


def _shard_files(shards: Path) -> list[str]:
    return [r["file"] for r in json.loads((shards / INDEX_NAME).read_text())["shards"]]


def test_staged_dataset_reads_the_same_with_the_same_fingerprint(source, tmp_path):
    staged = staging.stage(source, tmp_path / "nvme", progress=False)
    assert staged.parent == tmp_path / "nvme"
    a, b = open_dataset(source), open_dataset(staged)
    assert a.fingerprint == b.fingerprint  # the resume fingerprint does not see the staging
    b.check()
    for s in a.subjects:
        assert np.array_equal(a.read(s, "T1"), b.read(s, "T1"))
    # staged again: nothing copied (every shard in place), same folder
    mtimes = {f: (staged / f).stat().st_mtime_ns for f in _shard_files(source)}
    assert staging.stage(source, tmp_path / "nvme", progress=False) == staged
    assert {f: (staged / f).stat().st_mtime_ns for f in _shard_files(source)} == mtimes


@pytest.mark.timeout(120)
def test_staging_killed_part_way_resumes(source, tmp_path):
    files = _shard_files(source)
    assert len(files) == 3
    nvme = tmp_path / "nvme"
    # A real kill: the copier dies (SIGKILL) after the first shard, half way through the second.
    script = textwrap.dedent(f"""
        import os, signal
        from umbrella_ds.data import staging
        done = []
        real = staging._copy_checked
        def copy(src, dst, rec, bar):
            if done:
                tmp = dst.with_name(dst.name + ".staging")
                tmp.write_bytes(src.read_bytes()[: rec["bytes"] // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, rec, bar)
            done.append(dst)
        staging._copy_checked = copy
        staging.stage({str(source)!r}, {str(nvme)!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    staged = staging.staged_path(source, nvme)
    assert not (staged / INDEX_NAME).exists()  # not usable yet
    first = (staged / files[0]).stat()
    assert staging.stage(source, nvme, progress=False) == staged
    assert (staged / files[0]).stat().st_ino == first.st_ino  # kept, not copied again
    for f in files:
        assert (staged / f).read_bytes() == (source / f).read_bytes()
    assert not list(staged.glob("*.staging"))
    assert (staged / INDEX_NAME).read_bytes() == (source / INDEX_NAME).read_bytes()


def test_a_damaged_staged_copy_is_copied_again(source, tmp_path):
    staged = staging.stage(source, tmp_path / "nvme", progress=False)
    victim = staged / _shard_files(source)[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[-100] ^= 0xFF  # inside the stamped tail
    victim.write_bytes(bytes(data))
    staging.stage(source, tmp_path / "nvme", progress=False)
    assert victim.read_bytes() == (source / victim.name).read_bytes()


def test_a_damaged_source_is_refused_naming_the_shard(source, tmp_path):
    name = _shard_files(source)[1]
    path = source / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        staging.StagingError, match=rf"^data\.stage_dir: shard {name}: the copy's sha256"
    ):
        staging.stage(source, tmp_path / "nvme", progress=False)
    staged = staging.staged_path(source, tmp_path / "nvme")
    assert not (staged / name).exists() and not (staged / INDEX_NAME).exists()


def test_a_full_disk_is_refused_naming_the_shard(source, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    first = _shard_files(source)[0]
    with pytest.raises(
        staging.StagingError, match=rf"^data\.stage_dir: .* GB free, .*from shard {first}"
    ):
        staging.stage(source, tmp_path / "nvme", progress=False)


def test_stage_dir_is_not_fingerprinted():
    from umbrella_ds.config import RunConfig

    a, b = RunConfig(), RunConfig()
    b.data.stage_dir = "/local/nvme/x"
    assert a.fingerprint() == b.fingerprint()


def test_only_the_node_copier_stages(source, tmp_path):
    """Node-local rank 0 copies; another rank of the node (here with no process group, so no
    barrier) finds the staged index or refuses naming data.stage_dir."""
    nvme = tmp_path / "nvme"
    with pytest.raises(staging.StagingError, match=r"^data\.stage_dir: .* no staged index"):
        staging.stage_for_node(source, nvme, local_rank=1, progress=False)
    assert not staging.staged_path(source, nvme).exists()
    staged = staging.stage_for_node(source, nvme, local_rank=0, progress=False)
    assert staging.stage_for_node(source, nvme, local_rank=1, progress=False) == staged
