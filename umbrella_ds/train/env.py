"""Where this process sits in the job and which device it trains on, from any launcher.

DeepSpeed and torch.distributed read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``. The deepspeed launcher and torchrun set them; srun and mpirun do not, so their
variables are mapped here before the process group starts (otherwise DeepSpeed falls back to its own
MPI discovery, or every rank believes it is rank 0).

``LOCAL_RANK`` is the *device index* to DeepSpeed, not a rank: the engine calls
``set_device(LOCAL_RANK)`` (runtime/engine.py), ``zero.Init`` puts partitions on
``device_name(LOCAL_RANK)`` (runtime/zero/partition_parameters.py), ``init_process_group`` binds
``device_id=device(LOCAL_RANK)`` (comm/torch.py), and ``comm.get_local_rank`` is documented as
"local rank (= GPU device ID)"; its one other use, ``use_node_local_storage``, we leave off. Under
per-task GPU binding (``srun --gpus-per-task=1``, a site ``--gpu-bind``) each process sees fewer
devices than there are ranks on the node, so the node-local rank is not a valid index. Hence
``LOCAL_RANK`` is exported as node-local rank modulo the visible device count, and the true
node-local rank stays on ``DistEnv.node_local_rank`` for per-node work (a second ``discover`` in
the same process reads it back from ``export_to_environ``, not from the rewritten ``LOCAL_RANK``).

The device rule (``choose_device``, docs/OPERATIONS.md "Choosing the device") is applied once by
every entry point that builds a model, before DeepSpeed picks its accelerator.
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from umbrella_ds.errors import UserError

# The true node-local rank once ``export_to_environ`` has rewritten LOCAL_RANK to the device index.
_exported_node_local_rank: int | None = None


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    node_local_rank: int  # this rank's position among the ranks of its node (per-node work)
    master_addr: str
    master_port: int
    launcher: str  # deepspeed/torchrun | srun | mpirun | single
    host: str
    slurm_node: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_index(self, visible: int) -> int:
        """The CUDA device this rank uses among the ``visible`` ones: its node-local rank modulo
        their count, so ``--gpus-per-task=1`` (one visible device per rank) gives 0 for all."""
        return self.node_local_rank % visible if visible > 0 else 0


def discover(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; does not modify the environment (see ``export_to_environ``)."""
    env = dict(os.environ if environ is None else environ)
    exported = _exported_node_local_rank if environ is None else None
    host = socket.gethostname()
    slurm_node = env.get("SLURMD_NODENAME")
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = exported if exported is not None else int(env.get("LOCAL_RANK", 0))
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


def export_to_environ(d: DistEnv, visible_devices: int | None = None) -> None:
    """Publish the discovered values under the names torch.distributed and DeepSpeed read.

    With ``visible_devices`` (a CUDA run) ``LOCAL_RANK`` is the device index, else the node-local
    rank (the CPU accelerator ignores it)."""
    local = d.node_local_rank if visible_devices is None else d.device_index(visible_devices)
    os.environ.update(
        RANK=str(d.rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_RANK=str(local),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        # DeepSpeed reads it as a second LOCAL_RANK and asserts the two agree
        # (runtime/engine.py _configure_with_arguments); MPI itself does not read it back.
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(local)
    global _exported_node_local_rank
    _exported_node_local_rank = d.node_local_rank


# ---------------------------------------------------------------- the device rule

DEVICES = ("auto", "cuda", "cpu")


def add_device_flag(parser: Any, unset: str | None = None) -> None:
    """``--device auto|cpu|cuda`` for a command that builds the model; ``unset``: what decides
    when it is not given (else it defaults to auto)."""
    rule = "auto: a GPU where there is one, else the CPU (refused where GPUs are allocated but "
    rule += "this torch cannot use them)"
    parser.add_argument(
        "--device",
        default=None if unset else "auto",
        choices=DEVICES,
        help=f"{rule}; default: {unset}" if unset else rule,
    )


# What says GPUs were allocated to this process (docs/OPERATIONS.md "Choosing the device").
ALLOCATION_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")
# CUDA_VISIBLE_DEVICES values that name no device (empty hides all; Slurm writes NoDevFiles for a
# GRES without device files).
_NO_DEVICES = ("", "-1", "none", "nodevfiles")


class DeviceError(UserError):
    """The requested device cannot be used here, or GPUs were allocated and CUDA cannot use them
    (exit status 2, one line naming the torch build and the variables found)."""


def gpus_allocated(environ: Mapping[str, str]) -> dict[str, str]:
    """The allocation variables that say GPUs were given to this process ({} when none)."""
    found = {}
    for name in ALLOCATION_VARS:
        value = environ.get(name, "").strip()
        empty = _NO_DEVICES if name == "CUDA_VISIBLE_DEVICES" else ("", "0")
        if value.lower() not in empty:
            found[name] = value
    return found


def torch_build() -> str:
    """``torch 2.x (CUDA 12.4)`` or ``torch 2.x+cpu (no CUDA build)``."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'no CUDA build'})"


def choose_device(
    requested: str,
    key: str,
    environ: Mapping[str, str] | None = None,
    *,
    cuda_devices: int | None = None,
    recorded: bool = False,
) -> str:
    """The device for ``requested`` (auto|cuda|cpu, set at ``key``): "cuda", "cpu" or a DeviceError.

    ``auto``: CUDA where GPUs are allocated or visible and usable, the CPU where there are none,
    a refusal where they are allocated or visible but CUDA cannot be used: a torch without CUDA,
    or an inherited ``DS_ACCELERATOR=cpu``, which alone does not count as asking for the CPU (it
    is exported by our Makefile, test helpers and many shell profiles). ``cpu`` trains on the CPU
    whatever is allocated; ``cuda`` without usable CUDA is refused. ``cuda_devices``: the visible
    device count (tests; default ``torch.cuda.device_count()`` when CUDA is available).
    ``recorded``: ``requested`` comes from a checkpoint's run config (eval, export), which the user
    cannot set, so the refusal says what they can do instead.
    """
    env = os.environ if environ is None else environ
    if requested not in DEVICES:
        raise DeviceError(f"{key}: {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ds_cpu = env.get("DS_ACCELERATOR", "").strip().lower() == "cpu"
    if cuda_devices > 0 and not ds_cpu:
        return "cuda"
    allocated = gpus_allocated(env)
    if requested == "auto" and not allocated and not cuda_devices:
        return "cpu"
    found = [f"{k}={v}" for k, v in allocated.items()]
    found += [f"{cuda_devices} CUDA device(s) visible to torch"] if cuda_devices else []
    found += ["DS_ACCELERATOR=cpu (inherited: not a request for the CPU)"] if ds_cpu else []
    why = "CUDA requested" if requested == "cuda" else (
        "GPUs allocated" if allocated else "GPUs visible")  # fmt: skip
    raise DeviceError(
        f"{key}={requested}: {why}, but this process cannot use CUDA; found {torch_build()}, "
        f"{', '.join(found) if found else 'no CUDA device'}. "
        + ("Run it on the CPU deliberately with --device cpu" if recorded
           else f"Use the CPU deliberately with {key}=cpu")
        + f", or use a CUDA build of torch{' and unset DS_ACCELERATOR' if ds_cpu else ''}"
    )  # fmt: skip


def apply_device_rule(
    requested: str, key: str = "train.device", *, recorded: bool = False
) -> torch.device:
    """Choose the device (``choose_device``) and make DeepSpeed agree, before anything builds.

    DeepSpeed picks its accelerator once, at the first ``get_accelerator()``, from
    ``DS_ACCELERATOR`` or else by probing torch (deepspeed/accelerator/real_accelerator.py), so
    the choice is written there; ``on_cpu`` and the other readers then agree with it."""
    device = choose_device(requested, key, recorded=recorded)
    os.environ["DS_ACCELERATOR"] = device
    import sys

    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(real, "ds_accelerator", None)
    if chosen is not None and chosen.device_name() != device:
        raise RuntimeError(
            f"DeepSpeed chose its {chosen.device_name()} accelerator before the device rule "
            f"chose {device}: apply_device_rule must run before DeepSpeed is used"
        )
    return torch.device(device)


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available()


def device_for(d: DistEnv) -> torch.device:
    if on_cpu():
        return torch.device("cpu")
    index = d.device_index(torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(d: DistEnv, timeout_s: int) -> None:
    """Start the process group through DeepSpeed: gloo on CPU, nccl on GPU, the config's timeout."""
    cuda = not on_cpu()
    # before DeepSpeed reads LOCAL_RANK
    export_to_environ(d, torch.cuda.device_count() if cuda else None)
    import deepspeed

    if cuda:
        # before any collective: NCCL's object collectives (watch_local_peers below) and barriers
        # use the current device, and two ranks of one node on cuda:0 fail as duplicate GPUs
        device_for(d)
    timeout = datetime.timedelta(seconds=timeout_s)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo",
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
