"""Where this process sits in the job: rank, world size, local rank and master, from any launcher.

DeepSpeed and torch.distributed read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``. The deepspeed launcher and torchrun set them; srun and mpirun do not, so their
variables are mapped here before the process group starts (otherwise DeepSpeed falls back to its own
MPI discovery, or every rank believes it is rank 0).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed/torchrun | srun | mpirun | single
    host: str
    slurm_node: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; does not modify the environment (see ``export``)."""
    env = dict(os.environ if environ is None else environ)
    host = socket.gethostname()
    slurm_node = env.get("SLURMD_NODENAME")
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 29500))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "srun"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        port = int(env.get("MASTER_PORT") or _port_from_job_id(env.get("SLURM_JOB_ID")))
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "mpirun"
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        addr = env.get("MASTER_ADDR") or _mpi_master(rank)
        port = int(env.get("MASTER_PORT", 29500))
    else:
        launcher = "single"
        rank, world, local = 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT") or _free_port())
    return DistEnv(rank, world, local, addr, port, launcher, host, slurm_node)


def export(d: DistEnv) -> None:
    """Publish the discovered values under the names torch.distributed and DeepSpeed read."""
    os.environ.update(
        RANK=str(d.rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_RANK=str(d.local_rank),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available()


def device_for(d: DistEnv) -> torch.device:
    if on_cpu():
        return torch.device("cpu")
    torch.cuda.set_device(d.local_rank)
    return torch.device("cuda", d.local_rank)


def init_distributed(d: DistEnv, timeout_s: int) -> None:
    """Start the process group through DeepSpeed: gloo on CPU, nccl on GPU, the config's timeout."""
    import deepspeed

    export(d)
    deepspeed.init_distributed(
        dist_backend="gloo" if on_cpu() else "nccl",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=d.rank,
        world_size=d.world_size,
    )


def _first_slurm_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({e}); set MASTER_ADDR"
        ) from e
    return out[0]


def _port_from_job_id(job_id: str | None) -> int:
    """A port per job, so two jobs sharing a node do not collide."""
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def _mpi_master(rank: int) -> str:
    """Rank 0's host name, broadcast through MPI (mpirun sets no MASTER_ADDR)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(socket.gethostname() if rank == 0 else None, root=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
