"""launch/pack.sbatch: two MPI ranks on two SLURM nodes pack what one process packs, byte for byte."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]

PACK_ARGS = [
    "--t1-size",
    "32",
    "32",
    "32",
    "--rsfmri-size",
    "16",
    "16",
    "16",
    "--subjects-per-shard",
    "2",
]


def _pack_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _checksums(dataset: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(dataset.glob("*.h5"))
    }


@pytest.mark.timeout(600)  # may include the first start of the cluster (apt install)
def test_pack_sbatch_two_mpi_ranks_equals_single_process(slurm_cluster, tmp_path):
    raw, single, parallel = tmp_path / "raw", tmp_path / "single", tmp_path / "mpi"
    done = _pack_cli("synth", "--out", str(raw), "--subjects", "8", "--seed", "0")
    assert done.returncode == 0, done.stderr
    manifest = raw / "manifest.csv"
    done = _pack_cli(
        "build", "--manifest", str(manifest), "--out", str(single), "--no-progress", *PACK_ARGS
    )
    assert done.returncode == 0, done.stderr

    job = slurm_cluster.submit(
        "launch/pack.sbatch",
        ["-N", "2", "--ntasks-per-node=1", "-o", str(tmp_path / "slurm-%j.out")],
        MANIFEST=str(manifest),
        OUT=str(parallel),
        PACK_ARGS=" ".join(PACK_ARGS),
    )
    state = slurm_cluster.wait(job, 240)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "rank 0 of 2 on node node1" in log and "rank 1 of 2 on node node2" in log, log

    verify = _pack_cli("verify", str(parallel))
    assert verify.returncode == 0, verify.stderr
    sums = _checksums(parallel)
    assert len(sums) == 4 and sums == _checksums(single)
    index_mpi = json.loads((parallel / "index.json").read_text())
    assert index_mpi == json.loads((single / "index.json").read_text())
    assert [s["sha256"] for s in index_mpi["shards"]] == list(sums.values())
