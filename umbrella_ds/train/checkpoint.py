"""Trainable-only DeepSpeed checkpoints that resume exactly, and on another number of ranks.

Layout::

    OUT/checkpoints/
      latest                       text: the tag of the newest *complete* checkpoint
      step-0000200/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed, frozen parameters excluded
        rng-rank0.pt, rng-rank1.pt ...                 per-rank RNG states (weights_only-loadable)
        meta.json                                      written last: the completion marker
        universal/                                     made on demand when the world size changes

A checkpoint is a set of named parts that save and load themselves (torchtitan's Stateful
pattern): file parts (``DeepSpeedState``: trainable weights and optimizer; ``RankRng``: each
rank's RNG) write into the step folder on every rank; state parts (``TrainState``, the sampler,
``SchedulerState``, and saved-only ``Record`` s of the config, fingerprints, frozen base and
trainable names) are ``meta.json``'s top-level keys, one per part, so format 1 checkpoints load
unchanged. The engine lists its parts in one place (``engine.checkpoint_parts``); adding one is
one line there. ``meta.json`` is written by rank 0 only after a barrier that follows every rank's
save, then ``latest`` moves (tmp + os.replace), last, as nanotron does. The format version is
checked on load. A step folder without ``meta.json`` is never trusted and is removed on the next
save. Resuming on a different world size converts the checkpoint with DeepSpeed's
``ds_to_universal`` and loads it with ``checkpoint.load_universal``.

Ranks agree before they act: what a decision reads from the file system ("is this step already
saved?", "which checkpoint does ``--resume`` name?") is read by rank 0 and broadcast
(``rank0_decides``). On a shared file system each node caches attributes (NFS ``actimeo``), so
two ranks asking the same question can get two answers, and a rank that skips a save or a load
leaves the others waiting in a collective until the timeout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from umbrella_ds.config import FINGERPRINT_SCHEME, CheckpointConfig, RunConfig
from umbrella_ds.errors import UserError
from umbrella_ds.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

# meta.json's layout; MIN_FORMAT_VERSION..FORMAT_VERSION load. 2: the model record is the
# ModelRecipe under "recipe" (model/recipe.py); 1 had the base fingerprint under "base", read by
# trained.recipe_from_old.
FORMAT_VERSION = 2
MIN_FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
LOWER_IS_BETTER = ("loss", "mae")
DIE_DURING_SAVE_ENV = "UMBRELLA_TEST_DIE_DURING_SAVE"


T = TypeVar("T")


def rank0_decides(decide: Callable[[], T]) -> T:
    """``decide()`` as rank 0 answered it, on every rank (one object broadcast).

    Rank 0's exception is raised on every rank too, so a refusal (a ``--resume`` path that is not
    a checkpoint) ends every rank with the same error instead of leaving the others waiting.
    Without a process group (one process, a unit test) ``decide`` simply runs here."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, decide())
        except Exception as e:  # re-raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and the reason."""


class CheckpointPathError(CheckpointError, UserError):
    """A path given as a checkpoint (``--resume``, ``--checkpoint``) that is not a usable one:
    the user's to fix, exit status 2 (a failed write stays a CheckpointError, exit 1)."""


@dataclass(frozen=True)
class Found:
    path: Path  # the step folder
    meta: dict[str, Any]


class StatePart(Protocol):
    """A part kept in meta.json under its name: JSON-able state."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class FilePart(Protocol):
    """A part kept as files in the step folder, written and read by every rank."""

    def save(self, root: Path, tag: str) -> None: ...

    def load(self, found: Found, same_world: bool) -> None: ...


@dataclass
class Parts:
    """What a checkpoint holds, by name: ``files`` load first (weights before the scheduler that
    sets their optimizer's learning rate), then ``state`` in order."""

    files: dict[str, FilePart]
    state: dict[str, StatePart]


@dataclass
class TrainState:
    """The optimizer step count: where the loop continues."""

    step: int = 0

    def state_dict(self) -> int:
        return self.step

    def load_state_dict(self, state: int) -> None:
        self.step = int(state)


class Record:
    """Saved, never restored: what the checkpoint says about its run (config, fingerprints, the
    frozen base). Its readers check it before anything is built (``check_fingerprints``,
    ``base_weights.check_same_base``), so loading it back is a no-op."""

    def __init__(self, value: Callable[[], Any], *, optional: bool = False) -> None:
        self._value = value
        self.optional = optional  # checkpoints written before this record existed load too

    def state_dict(self) -> Any:
        return self._value()

    def load_state_dict(self, state: Any) -> None:
        del state


class SchedulerState:
    """The LR schedule; loading also sets the optimizer groups to the schedule's current rate
    (LambdaLR restores only its own counters)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


class TrainableNames:
    """Names of the trained parameters: a checkpoint of another trainable set is refused."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def _names(self) -> list[str]:
        return sorted(n for n, p in self.module.named_parameters() if p.requires_grad)

    def state_dict(self) -> list[str]:
        return self._names()

    def load_state_dict(self, state: list[str]) -> None:
        if self._names() != sorted(state):
            raise CheckpointError(
                f"trainable parameters differ: checkpoint {state} vs model {self._names()}"
            )


class DeepSpeedState:
    """Trainable weights and optimizer state through DeepSpeed, frozen parameters excluded; on
    another world size from the universal conversion (``prepare_universal``)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def save(self, root: Path, tag: str) -> None:
        with without_frozen(self.engine):
            self.engine.save_checkpoint(
                str(root),
                tag=tag,
                client_state={"universal_checkpoint_info": {}},
                exclude_frozen_parameters=True,
                save_latest=False,
            )

    def load(self, found: Found, same_world: bool) -> None:
        load_dir, tag = (
            (found.path.parent, found.path.name) if same_world else (found.path, "universal")
        )
        load_path, _ = self.engine.load_checkpoint(
            str(load_dir),
            tag=tag,
            load_module_strict=False,  # frozen parameters are not in the checkpoint
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # SchedulerState restores it from meta.json
        )
        if load_path is None:
            raise CheckpointError(f"{found.path}: DeepSpeed could not load it")


class RankRng:
    """This rank's Python, NumPy and torch RNG streams (``rng-rank{r}.pt``). On another world
    size there is no matching stream: each rank reseeds from (seed + step, rank).

    ``device_slot``: where this rank's CUDA generator sat in the list of every visible device's
    generators that RNG files written before the current-device format hold: the device index it
    trained on then, which was its node-local rank."""

    def __init__(self, rank: int, device_slot: int = 0) -> None:
        self.rank = rank
        self.device_slot = device_slot

    def save(self, root: Path, tag: str) -> None:
        with atomic_path(root / tag / f"rng-rank{self.rank}.pt") as tmp:
            torch.save(rng_state(), tmp)

    def load(self, found: Found, same_world: bool) -> None:
        rng_file = found.path / f"rng-rank{self.rank}.pt"
        if same_world and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True), self.device_slot)
        else:
            meta = found.meta
            seed_rng(int(meta["config"]["train"]["seed"]) + int(meta["step"]), self.rank)


def step_tag(step: int) -> str:
    return f"step-{step:07d}"


def read_meta(step_dir: Path) -> dict[str, Any]:
    """meta.json of a step folder, its format version checked."""
    try:
        meta = json.loads((step_dir / META).read_text())
    except FileNotFoundError as e:
        raise CheckpointPathError(f"{step_dir}: incomplete checkpoint (no {META})") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointPathError(f"{step_dir}/{META}: unreadable: {e}") from e
    version = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version < MIN_FORMAT_VERSION:
        raise CheckpointPathError(
            f"{step_dir}/{META}: checkpoint format {version!r} is older than this umbrella-ds "
            f"reads ({MIN_FORMAT_VERSION}-{FORMAT_VERSION}); resume it with the version that wrote it"
        )
    if version > FORMAT_VERSION:
        raise CheckpointPathError(
            f"{step_dir}/{META}: checkpoint format {version} was written by a newer umbrella-ds "
            f"(this one reads {MIN_FORMAT_VERSION}-{FORMAT_VERSION}); upgrade umbrella-ds"
        )
    return meta


def resolve(path: str | Path) -> Path:
    """A run dir, a checkpoints dir (through ``latest``) or a step dir -> the step dir."""
    p = Path(path).expanduser().resolve()
    if (p / META).is_file():
        return p
    for root in (p / "checkpoints", p):
        if (root / LATEST).is_file():
            tag = (root / LATEST).read_text().strip()
            step_dir = root / tag
            if not (step_dir / META).is_file():
                raise CheckpointPathError(f"{root / LATEST} names {tag}, which is incomplete")
            return step_dir
    raise CheckpointPathError(f"{p}: not a checkpoint (no {META}) and no {LATEST} file under it")


def find(resume: str, root: Path) -> Found | None:
    """``--resume auto|none|PATH`` -> the checkpoint to load, or None for a fresh start; under a
    process group rank 0 looks and every rank gets its answer (``rank0_decides``)."""
    return rank0_decides(lambda: _find(resume, root))


def _find(resume: str, root: Path) -> Found | None:
    if resume == "none":
        return None
    if resume == "auto":
        if not (root / LATEST).is_file():
            return None
        path = resolve(root)
    else:
        path = resolve(resume)
    return Found(path, read_meta(path))


SCHEME_KEY = "fingerprint_scheme"  # meta.json: the config fingerprint's scheme (absent = 1)


def check_fingerprints(
    found: Found, current: dict[str, str], allow_mismatch: bool, rank: int, cfg: RunConfig
) -> None:
    """Refuse a checkpoint of another config, model or data. Its config fingerprint is compared
    in the scheme it was written with (``config.FINGERPRINT_SCHEME``): an older checkpoint's is
    recomputed from ``cfg`` the old way, so it still resumes after an upgrade."""
    saved = found.meta["fingerprints"]
    scheme = found.meta.get(SCHEME_KEY, 1)
    if not isinstance(scheme, int) or not 1 <= scheme <= FINGERPRINT_SCHEME:
        raise CheckpointError(
            f"{found.path}/{META}: {SCHEME_KEY} {scheme!r} is not one this umbrella-ds knows "
            f"(1-{FINGERPRINT_SCHEME}); resume it with the version that wrote it"
        )
    if scheme != FINGERPRINT_SCHEME:
        current = {**current, "config": cfg.fingerprint(scheme)}
    diffs = [k for k in current if saved.get(k) != current[k]]
    if not diffs:
        return
    detail = ", ".join(f"{k}: checkpoint {saved.get(k)} vs now {current[k]}" for k in diffs)
    msg = f"{found.path}: fingerprint mismatch ({detail})"
    if not allow_mismatch:
        raise CheckpointError(
            msg + ". The run config, model or data changed since this checkpoint; start a new "
            "output_dir, or pass --allow-fingerprint-mismatch if the change is intended"
        )
    if rank == 0:
        log.warning("%s; continuing because --allow-fingerprint-mismatch", msg)


# ---------------------------------------------------------------- RNG per rank


def rng_state() -> dict[str, Any]:
    """This process's streams. CUDA: the current device's generator only (the one this rank
    draws from), so a process that sees fewer devices on resume (per-task GPU binding) still
    loads it; earlier files hold every visible device's (``set_rng_state`` reads both)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.copy()), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict[str, Any], device_slot: int = 0) -> None:
    """Restore ``rng_state()``'s streams. A ``cuda`` entry that is a list (files written before
    the current-device format: one generator per visible device) restores its ``device_slot``
    entry, the device that rank used, into the current device."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):
            if not 0 <= device_slot < len(cuda):
                raise CheckpointError(
                    f"RNG state holds {len(cuda)} CUDA generators; this rank's was number "
                    f"{device_slot}"
                )
            cuda = cuda[device_slot]
        torch.cuda.set_rng_state(cuda)


def seed_rng(seed: int, rank: int) -> None:
    """Per-rank streams for anything random outside the data (whose randomness is per item)."""
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


# ---------------------------------------------------------------- save / load


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Checkpointer:
    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        rank: int,
        world_size: int,
        parts: Parts | None = None,
    ) -> None:
        self.cfg = cfg
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.parts = parts if parts is not None else Parts(files={}, state={})
        clash = set(self.parts.state) & {"format", "tag", "world_size", "size_bytes"}
        if clash:
            raise ValueError(f"checkpoint part names {sorted(clash)} are reserved in {META}")

    def save(self, step: int) -> Path:
        """Every rank calls this; returns the step folder once ``latest`` names it."""
        tag = step_tag(step)
        step_dir = self.root / tag
        if rank0_decides((step_dir / META).is_file):
            return step_dir  # already complete (e.g. a signal right after a periodic save)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if step_dir.exists():  # an incomplete earlier attempt at this step: never trusted
                shutil.rmtree(step_dir)
        dist.barrier()
        try:
            for part in self.parts.files.values():
                part.save(self.root, tag)
        except (OSError, RuntimeError) as e:  # ENOSPC reaches us as either (torch's writer)
            raise CheckpointError(self._save_failed(step_dir, e)) from e
        dist.barrier()  # every rank's files are on disk
        _test_hook_die_during_save(self.rank, step)
        if self.rank == 0:
            meta = {name: part.state_dict() for name, part in self.parts.state.items()}
            meta.update(format=FORMAT_VERSION, tag=tag, world_size=self.world_size)
            meta["size_bytes"] = dir_size(step_dir)
            try:
                atomic_write_text(step_dir / META, json.dumps(meta, indent=1, sort_keys=True))
                atomic_write_text(self.root / LATEST, tag + "\n")  # last: the step is now trusted
            except OSError as e:
                raise CheckpointError(self._save_failed(step_dir, e)) from e
            self._prune(keep=tag)
        dist.barrier()
        return step_dir

    def load(self, found: Found) -> None:
        """Every part restores itself: files (weights, optimizer, RNG), then meta.json's parts."""
        same_world = found.meta["world_size"] == self.world_size
        for part in self.parts.files.values():
            part.load(found, same_world)
        missing = sorted(
            name
            for name, part in self.parts.state.items()
            if name not in found.meta and not getattr(part, "optional", False)
        )
        if missing:
            raise CheckpointError(f"{found.path}: {META} lacks {missing}")
        for name, part in self.parts.state.items():
            if name in found.meta:
                try:
                    part.load_state_dict(found.meta[name])
                except (CheckpointError, ValueError) as e:
                    raise CheckpointError(f"{found.path}: {name}: {e}") from e

    def _save_failed(self, step_dir: Path, e: BaseException) -> str:
        """The message for a failed save: what failed, the free space, what is still trusted."""
        latest = self.root / LATEST
        previous = latest.read_text().strip() if latest.is_file() else None
        try:
            free_bytes = shutil.disk_usage(self.root).free
            free = f"{free_bytes / 2**20:.1f} MiB free on {self.root}"
        except OSError:
            free_bytes, free = None, "free space unknown"
        full = getattr(e, "errno", None) == errno.ENOSPC or (
            free_bytes is not None and free_bytes < 2**20
        )  # torch's writer reports ENOSPC as e.g. "unexpected pos 128 vs 0"
        return (
            f"rank {self.rank}: writing checkpoint {step_dir} failed: {e} ({free}"
            + ("; the filesystem is full" if full else "")
            + f"). It is incomplete (no {META}) and will never be loaded; "
            + (f"{latest} still names {previous}" if previous else "no earlier checkpoint exists")
        )

    def _prune(self, keep: str) -> None:
        best = (self.root / "best").read_text().strip() if (self.root / "best").is_file() else None
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        complete = [p for p in steps if (p / META).is_file()]
        for p in steps:
            if not (p / META).is_file() and p.name != keep:
                shutil.rmtree(p, ignore_errors=True)  # leftovers of a killed save
        for p in complete[: -self.cfg.keep_last]:
            if p.name not in (keep, best):
                shutil.rmtree(p)

    def record_eval(self, step_dir: Path, records: list[dict[str, Any]]) -> None:
        """keep_best: remember the step whose named eval metric is best (rank 0). ``records`` are
        one evaluation's records: one per task and the ``task: "all"`` summary."""
        key = self.cfg.keep_best_key()
        if self.rank != 0 or key is None:
            return
        task, name = key
        record = next((r for r in records if r.get("task") == task), None)
        if record is None or record.get(name) is None:
            log.warning(
                "checkpoint.keep_best=%s: no value at %s (tasks evaluated: %s)",
                self.cfg.keep_best, step_dir.name, sorted(str(r.get("task")) for r in records),
            )  # fmt: skip
            return
        value = float(record[name])
        best_file = self.root / "best.json"
        if best_file.is_file():
            old = json.loads(best_file.read_text())
            lower = name in LOWER_IS_BETTER
            if (value >= old["value"]) if lower else (value <= old["value"]):
                return
        best = {"tag": step_dir.name, "metric": self.cfg.keep_best, "value": value}
        atomic_write_text(best_file, json.dumps(best))
        atomic_write_text(self.root / "best", step_dir.name + "\n")


def prepare_universal(found: Found, rank: int, world_size: int) -> bool:
    """Convert to a universal checkpoint when the world size changed; True if loading needs it."""
    if found.meta["world_size"] == world_size:
        return False
    out = found.path / "universal"
    if rank == 0 and not (out / "zero").is_dir():
        tmp = found.path / "universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(found.path),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        log.info(
            "world size %d -> %d: converting %s to a universal checkpoint",
            found.meta["world_size"],
            world_size,
            found.path,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(
                f"{found.path}: ds_to_universal failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return True


def frozen_names(module: torch.nn.Module) -> set[str]:
    """Every name under which a frozen parameter is reachable, tied aliases included.

    ``named_parameters()`` lists a tied tensor once, under its first name; DeepSpeed's
    ``exclude_frozen_parameters`` relies on it, so a frozen LM head tied to the embeddings stayed
    in the "trainable-only" checkpoint under its second name. ``remove_duplicate=False`` lists
    every alias.
    """
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


@contextlib.contextmanager
def without_frozen(engine) -> Iterator[None]:
    """During ``engine.save_checkpoint``: its module state dict minus every frozen alias.

    DeepSpeed offers no hook for this; its ``_save_checkpoint`` calls ``self.module_state_dict``,
    so an instance attribute wrapping the class method filters exactly what it writes.
    """
    original = engine.module_state_dict
    frozen = frozen_names(engine.module)

    def filtered(*args, **kwargs):
        sd = original(*args, **kwargs)
        for name in frozen & set(sd):
            del sd[name]
        return sd

    engine.module_state_dict = filtered
    try:
        yield
    finally:
        del engine.module_state_dict


def _test_hook_die_during_save(rank: int, step: int) -> None:
    """Fault injection (tests only): with ``UMBRELLA_TEST_DIE_DURING_SAVE=STEP`` rank 0 dies as if
    SIGKILLed while saving STEP, after every rank wrote its DeepSpeed and RNG files but before
    ``meta.json`` and ``latest``: the window in which a killed save must leave the previous
    checkpoint the trusted one."""
    if rank == 0 and os.environ.get(DIE_DURING_SAVE_ENV) == str(step):
        os._exit(137)
