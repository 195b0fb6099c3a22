"""Where this process sits in the job: rank, world size, local rank and master, from any launcher.

DeepSpeed and torch.distributed read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``. The deepspeed launcher and torchrun set them; srun and mpirun do not, so their
variables are mapped here before the process group starts (otherwise DeepSpeed falls back to its own
MPI discovery, or every rank believes it is rank 0).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

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
    if not on_cpu():
        # before any collective: NCCL's object collectives (watch_local_peers below) and barriers
        # use the current device, and two ranks of one node on cuda:0 fail as duplicate GPUs
        torch.cuda.set_device(d.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(
        dist_backend="gloo" if on_cpu() else "nccl",
        auto_mpi_discovery=False,
        timeout=timeout,
        rank=d.rank,
        world_size=d.world_size,
    )
    release_deepspeed_shm(d.rank)
    watch_local_peers(d)


def release_deepspeed_shm(rank: int) -> None:
    """Unlink the /dev/shm segment DeepSpeed's CPU comm op made for this rank.

    With every rank on one host, DeepSpeed's CPU accelerator maps a 66 MB shared-memory segment
    per rank (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, for its inference
    all-reduce, which training never calls) and never unlinks it. /dev/shm is RAM: a test suite
    of a hundred 2-rank runs left 21 GB behind and the machine thrashed. Every rank opens its
    peers' segments inside ``init_distributed``, so after a barrier the names are no longer
    needed; the mappings stay valid after unlink, and nothing outlives the processes, even a
    SIGKILL.
    """
    import glob

    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    dist.barrier()  # every rank has mapped every peer's segment (or none made one)
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def watch_local_peers(d: DistEnv, interval_s: float = 0.5) -> None:
    """Log, from every rank, the rank number of a peer on this host that has died.

    A killed rank leaves its peers with an anonymous "connection closed" or a collective
    timeout, and the deepspeed launcher prints the command line of the *last* rank it started,
    whichever died. A daemon thread watching the pids of the same-host ranks names the dead one
    (ranks on other nodes: the SLURM scripts name them).
    """
    import threading

    import psutil
    import torch.distributed as dist

    peers: list[Any] = [None] * d.world_size
    dist.all_gather_object(peers, (d.rank, d.host, os.getpid()))
    local = [(r, pid) for r, host, pid in peers if host == d.host and r != d.rank]
    if not local:
        return
    log = logging.getLogger("umbrella_ds.train")
    store = dist.distributed_c10d._get_default_store()
    atexit.register(_mark_left, store, d.rank)  # an orderly exit is not a death (SIGKILL skips it)

    def left(r: int) -> bool:
        try:
            return store.check([f"{LEFT_KEY}{r}"])
        except Exception:  # rank 0, which hosts the store, is gone: cannot tell
            return False

    alive = dict(local)
    lock = threading.Lock()

    def scan() -> None:
        with lock:
            for r, pid in list(alive.items()):
                try:
                    gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
                if gone and not left(r):
                    log.error("rank %d (pid %d on %s) has died; the job will fail", r, pid, d.host)
                if gone:
                    del alive[r]

    def watch() -> None:
        while alive:
            time.sleep(interval_s)
            scan()

    threading.Thread(target=watch, name="peer-watch", daemon=True).start()
    # A collective fails the moment a peer dies, possibly before the next poll: look once more
    # on the way out (atexit runs last-registered first, so before _mark_left).
    atexit.register(scan)


LEFT_KEY = "umbrella/left/"


def _mark_left(store: Any, rank: int) -> None:
    with contextlib.suppress(Exception):  # the store's host may have exited first
        store.set(f"{LEFT_KEY}{rank}", "1")


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make every later ``dist.new_group`` use ``timeout``, not torch's 30-minute default.

    ``init_process_group(timeout=...)`` covers only the world group. DeepSpeed builds its ZeRO
    data-parallel groups with ``dist.new_group(ranks)`` and no timeout; torch then calls
    ``distributed_c10d._get_default_timeout(backend)``, which reads the module globals
    ``default_pg_timeout`` (gloo) and ``default_pg_nccl_timeout`` (nccl) at call time. Without
    this, a hung rank stalls its peers in a ZeRO all-reduce for 30 minutes, whatever
    ``train.collective_timeout_s`` says.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout  # None when torch is built without NCCL


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
