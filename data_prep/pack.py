"""Packing orchestration: manifest -> shard jobs -> worker processes or MPI ranks -> index.

Each shard is built start to finish by one process from its own manifest rows, so the bytes
of a shard never depend on how many workers or ranks ran. The coordinator (rank 0) writes
``rejected.csv`` and then ``index.json`` last, both atomically.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from tqdm import tqdm

from umbrella_ds import modality as modality_table
from umbrella_ds import shards
from umbrella_ds.errors import UserError
from umbrella_ds.io import atomic_write_text
from umbrella_ds.provenance import write_provenance
from umbrella_ds.scan.preprocess import from_source, make_params_for, read_source
from umbrella_ds.scan.readers import InputRejected

ID_COLUMNS = ("subject_id", "subjectkey")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTIONS = 0, 1, 2, 3
# Test hook: the process that finishes shard k dies at once (simulates a preempted pack).
DIE_AFTER_ENV = "UMBRELLA_PACK_TEST_DIE_AFTER_SHARD"


class UsageError(UserError):
    """Bad arguments or manifest: exit status 2, message names the problem."""


@dataclass
class Row:
    position: int
    subject_id: str
    paths: dict[str, str]  # modality -> resolved source path ("" when not listed)
    phenotypes: dict[str, Any]


@dataclass
class ShardJob:
    shard: int
    rows: list[Row]
    job: str = ""


@dataclass
class BuildOptions:
    manifest: Path
    out: Path
    modalities: list[str] | None = None
    t1_size: tuple[int, int, int] = (96, 96, 96)
    rsfmri_size: tuple[int, int, int] = (96, 96, 96)
    t1_norm: str = "zscore"
    rsfmri_norm: str = "znorm_minback"
    # Per modality name (any in the modality table); these win over the t1_/rsfmri_ fields.
    sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)
    subjects_per_shard: int = 32
    workers: int = 1
    mpi: bool = False
    compression: str = "auto"  # per modality: shards.DEFAULT_COMPRESSION
    resume: bool = False
    progress: bool = True
    dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def size_of(self, name: str) -> tuple[int, int, int]:
        """Target grid of a modality: ``sizes``, else its ``<option>_size`` field, else its default."""
        m = modality_table.get(name)
        return tuple(self.sizes.get(name) or getattr(self, m.size_dest, m.default_size))

    def norm_of(self, name: str) -> str:
        m = modality_table.get(name)
        return self.norms.get(name) or getattr(self, m.norm_dest, m.default_norm)


def parse_value(text: str) -> Any:
    """Phenotype cell -> int, float, str, or None when empty (kept exactly otherwise)."""
    text = text.strip()
    if text == "" or text.lower() in ("na", "nan", "n/a", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_manifest(path: Path, modalities: list[str] | None) -> tuple[list[Row], list[str]]:
    """Parse the manifest; relative image paths resolve against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        records = list(reader)
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise UsageError(
            f"manifest {path}: needs a subject_id or subjectkey column (has {columns})"
        )
    known = modality_table.all()
    column = {m.name: m.manifest_column for m in known}
    available = [m.name for m in known if m.manifest_column in columns]
    if modalities is None:
        modalities = available
    unknown = [m for m in modalities if m not in column]
    if unknown:
        raise UsageError(f"unknown modality {unknown}; choose from {list(column)}")
    missing = [m for m in modalities if column[m] not in columns]
    if missing:
        raise UsageError(
            f"manifest {path}: missing column(s) {missing} for the requested modalities"
        )
    if not modalities:
        raise UsageError(f"manifest {path}: no image column ({' or '.join(column.values())})")
    pheno_cols = [c for c in columns if c not in ID_COLUMNS and c not in column.values()]
    base = path.resolve().parent
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        sid = (rec.get(id_col) or "").strip()
        line = i + 2
        if not sid:
            raise UsageError(f"manifest {path}: line {line} has an empty {id_col}")
        if sid in seen:
            raise UsageError(
                f"manifest {path}: duplicate subject id {sid!r} (lines {seen[sid]} and {line})"
            )
        seen[sid] = line
        paths = {}
        for m in modalities:
            cell = (rec.get(column[m]) or "").strip()
            paths[m] = str(base / cell) if cell and not os.path.isabs(cell) else cell
        pheno = {c: parse_value(rec.get(c) or "") for c in pheno_cols}
        rows.append(Row(i, sid, paths, pheno))
    if not rows:
        raise UsageError(f"manifest {path}: no subjects")
    return rows, list(modalities)


def plan(rows: list[Row], subjects_per_shard: int, fixed: dict[str, Any]) -> list[ShardJob]:
    """Subject i -> shard i // subjects_per_shard; each job hashed with everything it depends on."""
    jobs: dict[int, ShardJob] = {}
    for row in rows:
        k = shards.shard_of(row.position, subjects_per_shard)
        jobs.setdefault(k, ShardJob(k, [])).rows.append(row)
    for job in jobs.values():
        payload = {"fixed": fixed, "shard": job.shard, "rows": [r.__dict__ for r in job.rows]}
        job.job = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return [jobs[k] for k in sorted(jobs)]


def _process_subject(
    row: Row, modalities: list[str], params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str, str]]]:
    volumes: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    rejected: list[tuple[str, str, str]] = []
    for m in modalities:
        path = row.paths.get(m, "")
        if not path:
            continue  # not listed: the subject simply lacks this modality (recorded by absence)
        try:
            src = read_source(m, Path(path))
            arr, extra = from_source(m, src, params)
        except InputRejected as exc:
            rejected.append((m, path, exc.reason))
            continue
        volumes[m] = arr
        meta[m] = {
            "source": src.path,
            "source_sha256": src.sha256,
            "original_shape": src.original_shape,
            "voxel_size": src.voxel_size,
            "affine": src.affine,
            "orientation": src.orientation,
            **extra,
        }
    if not any(row.paths.get(m) for m in modalities):
        rejected.append(("*", "", "no image listed for any requested modality"))
    return volumes, meta, rejected


def build_shard(
    job: ShardJob,
    out: Path,
    modalities: list[str],
    params: dict[str, Any],
    compression: str,
    on_subject: Callable[[int], None] | None = None,
) -> shards.ShardRecord:
    """Build one shard from its rows; ``on_subject(bytes packed)`` reports progress per row."""
    shapes = {m: tuple(params[m]["size"]) for m in modalities}
    writer = shards.ShardWriter(out, job.shard, shapes, compression, params, job.job)
    try:
        for row in job.rows:
            volumes, meta, rejected = _process_subject(row, modalities, params)
            for m, path, reason in rejected:
                writer.add_rejection(row.subject_id, m, path, reason)
            if volumes:
                writer.add_subject(row.subject_id, row.position, row.phenotypes, volumes, meta)
            if on_subject is not None:
                on_subject(sum(v.nbytes for v in volumes.values()))
        record = writer.close()
    except BaseException:
        writer.abort()
        raise
    return record


def run_shard(
    job: ShardJob,
    out: Path,
    modalities: list[str],
    params: dict[str, Any],
    compression: str,
    resume: bool,
) -> tuple[shards.ShardRecord, bool]:
    """Keep a verified shard from an earlier run (resume) or build it; returns (record, reused)."""
    record = shards.reuse_shard(out / shards.shard_name(job.shard), job.job) if resume else None
    reused = record is not None
    if record is None:
        record = build_shard(job, out, modalities, params, compression, _report)
    else:
        for _ in job.rows:
            _report(0)
    if os.environ.get(DIE_AFTER_ENV) == str(job.shard):
        os._exit(137)
    return record, reused


# Where a process reports per-subject progress: the coordinator's bar (in-process) or a
# multiprocessing queue the coordinator drains (worker processes get it at start-up).
_progress_sink: Callable[[int], None] | None = None


def _report(nbytes: int) -> None:
    if _progress_sink is not None:
        _progress_sink(nbytes)


def _worker_init(queue: Any) -> None:
    global _progress_sink
    import torch

    torch.set_num_threads(1)  # K workers on K cores; determinism does not depend on it
    _progress_sink = queue.put


def _clean_temporaries(out: Path) -> None:
    for p in out.glob(".shard-*.h5.tmp*"):
        p.unlink(missing_ok=True)


LOCK_NAME = ".umbrella-pack.lock"


def _lock_out_dir(out: Path) -> Any:
    """Hold an exclusive lock on DIR for the run: two packs into one directory would delete
    each other's temporary shards."""
    f = open(out / LOCK_NAME, "w")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"--out {out}: another umbrella-pack process is writing it") from None
    return f


def _check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and not resume:
        found = [p.name for p in out.iterdir() if p.name == shards.INDEX_NAME or p.suffix == ".h5"]
        if found:
            raise UsageError(
                f"--out {out}: already holds {sorted(found)[:3]}; pass --resume to keep complete "
                "shards and redo the rest, or choose an empty directory"
            )


def _write_outputs(
    out: Path,
    records: list[shards.ShardRecord],
    opts: BuildOptions,
    params: dict[str, Any],
    n_shards: int,
    ranks: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    for p in out.glob("shard-*.h5"):  # shards of an earlier, longer manifest
        try:
            k = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if k >= n_shards:
            p.unlink()
    rejections = [r for rec in sorted(records, key=lambda r: r.shard) for r in rec.rejections]
    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=["subject_id", "modality", "path", "reason"], lineterminator="\n"
    )
    w.writeheader()
    w.writerows(rejections)
    atomic_write_text(out / shards.REJECTED_NAME, buf.getvalue())
    if not any(rec.subjects for rec in records):
        (out / shards.INDEX_NAME).unlink(missing_ok=True)
        _write_pack_provenance(out, opts, params, None, rejections, n_shards, ranks)
        return None, rejections
    shapes = {m: tuple(params[m]["size"]) for m in params}
    index = shards.build_index(
        records,
        shapes=shapes,
        preprocessing=params,
        compression=opts.compression,
        subjects_per_shard=opts.subjects_per_shard,
    )
    shards.write_index(out, index)
    _write_pack_provenance(out, opts, params, index, rejections, n_shards, ranks)
    return index, rejections


def this_rank(rank: int = 0) -> dict[str, Any]:
    """``{"rank", "host", "node"}`` of this process (node: the SLURM node name, if any)."""
    return {"rank": rank, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME")}


def _write_pack_provenance(
    out: Path,
    opts: BuildOptions,
    params: dict[str, Any],
    index: dict[str, Any] | None,
    rejections: list[dict[str, str]],
    n_shards: int,
    ranks: list[dict[str, Any]] | None,
) -> None:
    """provenance.json beside index.json: the manifest's sha256 is the input fingerprint."""
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in opts.__dict__.items()
        if k not in ("progress", "dry_run")
    }
    config["manifest"] = str(Path(opts.manifest).resolve())
    config["out"] = str(Path(out).resolve())
    config["modalities"] = list(params)
    config["preprocessing"] = params
    index_path = out / shards.INDEX_NAME
    write_provenance(
        out,
        kind="pack",
        config=config,
        inputs={"manifest": shards.sha256_file(Path(opts.manifest))},
        extra={
            "index_sha256": shards.sha256_file(index_path) if index is not None else None,
            "subjects": len(index["subjects"]) if index is not None else 0,
            "rejections": len(rejections),
            "shards": n_shards,
        },
        ranks=ranks or [this_rank()],
    )


def _summary(
    out: Path, index: dict[str, Any] | None, rejections: list, reused: int, n_shards: int
) -> int:
    if index is None:
        print(
            f"FAILED: every input was rejected; nothing packed. Reasons in {out / shards.REJECTED_NAME}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    per_mod: dict[str, int] = {}
    for s in index["subjects"]:
        for m in s["modalities"]:
            per_mod[m] = per_mod.get(m, 0) + 1
    mods = ", ".join(f"{m}: {n}" for m, n in per_mod.items())
    kept = f" ({reused} kept from an earlier run)" if reused else ""
    print(
        f"packed {len(index['subjects'])} subjects ({mods}) into {n_shards} shards{kept} in {out}"
    )
    if rejections:
        print(
            f"PACKED WITH REJECTIONS: {len(rejections)} input(s) rejected, listed in "
            f"{out / shards.REJECTED_NAME} (exit {EXIT_REJECTIONS})"
        )
        return EXIT_REJECTIONS
    print(f"ALL PACKED: no rejections (exit {EXIT_OK})")
    return EXIT_OK


def _progress(total: int, enabled: bool) -> tuple[Any, Callable[[int], None]]:
    """tqdm bar over subjects; the postfix is packed float16 MB/s."""
    bar = tqdm(total=total, unit="subj", desc="packing", disable=not enabled, mininterval=1.0)
    start = time.perf_counter()
    written = [0]

    def update(nbytes: int) -> None:
        written[0] += nbytes
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{written[0] / elapsed / 1e6:.1f} MB/s", refresh=False)
        bar.update(1)

    return bar, update


def build(opts: BuildOptions) -> int:
    """Run ``umbrella-pack build``; returns the exit status (raises UsageError for status 2)."""
    if opts.subjects_per_shard < 1:
        raise UsageError("--subjects-per-shard must be >= 1")
    if opts.workers < 1:
        raise UsageError("--workers must be >= 1")
    if opts.compression not in ("auto", *shards.COMPRESSIONS):
        raise UsageError(
            f"--compression {opts.compression}: choose one of auto, {', '.join(shards.COMPRESSIONS)}"
        )
    rows, modalities = read_manifest(opts.manifest, opts.modalities)
    compressions = shards.resolve_compression(opts.compression, modalities)
    try:
        params = make_params_for(
            {m: opts.size_of(m) for m in modalities}, {m: opts.norm_of(m) for m in modalities}
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    fixed = {
        "format_version": shards.FORMAT_VERSION,
        "params": params,
        "compression": compressions,
        "modalities": modalities,
        "subjects_per_shard": opts.subjects_per_shard,
    }
    jobs = plan(rows, opts.subjects_per_shard, fixed)
    if opts.dry_run:
        if opts.mpi:
            raise UsageError("--dry-run runs on one node: drop --mpi (use --workers)")
        return dry_run(opts, jobs, modalities, params)
    if opts.mpi:
        return _build_mpi(opts, jobs, modalities, params)
    _check_out_dir(opts.out, opts.resume)
    opts.out.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(_lock_out_dir(opts.out)):
        _clean_temporaries(opts.out)
        records, reused = _run_local(opts, jobs, modalities, params)
        index, rejections = _write_outputs(opts.out, records, opts, params, len(jobs))
    return _summary(opts.out, index, rejections, reused, len(jobs))


def _run_local(
    opts: BuildOptions, jobs: list[ShardJob], modalities: list[str], params: dict[str, Any]
) -> tuple[list[shards.ShardRecord], int]:
    bar, update = _progress(sum(len(j.rows) for j in jobs), opts.progress)
    records: list[shards.ShardRecord] = []
    reused = 0
    args = (opts.out, modalities, params, opts.compression, opts.resume)
    global _progress_sink
    with bar:
        _progress_sink = update
        try:
            if opts.workers == 1 or len(jobs) == 1:
                for job in jobs:
                    record, kept = run_shard(job, *args)
                    records.append(record)
                    reused += kept
            else:
                reused = _run_pool(opts.workers, jobs, args, records, update)
        finally:
            _progress_sink = None
    return records, reused


def _run_pool(
    workers: int,
    jobs: list[ShardJob],
    args: tuple[Any, ...],
    records: list[shards.ShardRecord],
    update: Callable[[int], None],
) -> int:
    """``workers`` processes build the shards: ``workers - 1`` spawned helpers and this one.

    Why the coordinator works too: a spawned helper needs seconds to import torch before its
    first shard (measured: 2.8 s on the 2-core VM), and the coordinator, which has everything
    imported, would otherwise sit idle collecting results. It builds shards from the back of
    the list while helpers take them from the front, and between its own shards hands helpers
    new ones (each helper has one running and one queued, so none waits on the coordinator).
    Every process runs one intra-op thread: K workers on K cores, no oversubscription. A shard
    is still built start to finish by one process, so the bytes never depend on the count.
    """
    import torch

    ctx = mp.get_context("spawn")  # h5py/torch state never crosses a fork
    queue = ctx.Queue()
    helpers = workers - 1
    todo = deque(jobs)
    reused = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(
            helpers, mp_context=ctx, initializer=_worker_init, initargs=(queue,)
        ) as pool:
            pending: set[Any] = set()

            def refill() -> None:
                while todo and len(pending) < 2 * helpers:
                    pending.add(pool.submit(run_shard, todo.popleft(), *args))

            refill()
            while todo or pending:
                if todo:
                    record, kept = run_shard(todo.pop(), *args)
                    records.append(record)
                    reused += kept
                done, pending = wait(
                    pending, timeout=0 if todo else 0.5, return_when=FIRST_COMPLETED
                )
                _drain(queue, update)
                for fut in done:
                    record, kept = fut.result()
                    records.append(record)
                    reused += kept
                refill()
        _drain(queue, update)
    finally:
        torch.set_num_threads(threads)
    return reused


def _drain(queue: Any, update: Callable[[int], None]) -> None:
    while True:
        try:
            update(queue.get_nowait())
        except Empty:
            return


def _build_mpi(
    opts: BuildOptions, jobs: list[ShardJob], modalities: list[str], params: dict[str, Any]
) -> int:
    """Shards round-robin over ranks; rank 0 gathers the records and writes index last."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    setup_error = None
    lock = None
    if rank == 0:
        try:
            _check_out_dir(opts.out, opts.resume)
            opts.out.mkdir(parents=True, exist_ok=True)
            lock = _lock_out_dir(opts.out)
            _clean_temporaries(opts.out)
        except UsageError as exc:
            setup_error = str(exc)
    setup_error = comm.bcast(setup_error, root=0)
    if setup_error is not None:
        raise UsageError(setup_error)
    mine = [job for job in jobs if job.shard % size == rank]
    result: tuple[str, Any]
    try:
        local = BuildOptions(
            **{**opts.__dict__, "workers": 1, "progress": opts.progress and rank == 0}
        )
        records, reused = _run_local(local, mine, modalities, params)
        result = ("ok", (records, reused))
    except Exception as exc:
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}")
    gathered = comm.gather(result, root=0)
    ranks = comm.gather(this_rank(rank), root=0)
    status = EXIT_FAILED
    if rank == 0:
        errors = [r[1] for r in gathered if r[0] == "error"]
        if errors:
            for e in errors:
                print(f"FAILED: {e}", file=sys.stderr)
        else:
            all_records = [rec for r in gathered for rec in r[1][0]]
            reused_all = sum(r[1][1] for r in gathered)
            index, rejections = _write_outputs(
                opts.out, all_records, opts, params, len(jobs), ranks
            )
            status = _summary(opts.out, index, rejections, reused_all, len(jobs))
        if lock is not None:
            lock.close()
    return comm.bcast(status, root=0)


# ---------------------------------------------------------------- --dry-run


def _dry_shard(job: ShardJob, modalities: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """Read and preprocess every input of one shard as the build would, keeping nothing."""
    result: dict[str, Any] = {"subjects": 0, "per_modality": {}, "bytes": 0, "rejections": []}
    for row in job.rows:
        volumes, _, rejected = _process_subject(row, modalities, params)
        for m, path, reason in rejected:
            result["rejections"].append(
                {"subject_id": row.subject_id, "modality": m, "path": path, "reason": reason}
            )
        if volumes:
            result["subjects"] += 1
            for m, arr in volumes.items():
                result["per_modality"][m] = result["per_modality"].get(m, 0) + 1
                result["bytes"] += arr.nbytes
        _report(0)
    return result


def _dry_run_local(opts: BuildOptions, jobs: list[ShardJob], modalities, params) -> list[dict]:
    bar, update = _progress(sum(len(j.rows) for j in jobs), opts.progress)
    global _progress_sink
    with bar:
        if opts.workers == 1 or len(jobs) == 1:
            _progress_sink = update
            try:
                return [_dry_shard(job, modalities, params) for job in jobs]
            finally:
                _progress_sink = None
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(
            opts.workers, mp_context=ctx, initializer=_worker_init, initargs=(queue,)
        ) as pool:
            futures = [pool.submit(_dry_shard, job, modalities, params) for job in jobs]
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(queue, update)
            _drain(queue, update)
            return [f.result() for f in futures]


def dry_run(
    opts: BuildOptions, jobs: list[ShardJob], modalities: list[str], params: dict[str, Any]
) -> int:
    """``build --dry-run``: what a build would pack and reject, and its size; writes nothing.

    Every input is read and preprocessed (rejections such as NaN values or a float16 overflow
    after normalisation are only known that way), so it costs about what a build costs, minus the
    writing. The output directory is checked as a build would check it, but never created. With
    ``--resume``, shards a build would keep are reported and not re-read. Exit statuses are the
    build's: 0 nothing would be rejected, 3 some inputs would be, 1 every input would be.
    """
    _check_out_dir(opts.out, opts.resume)
    kept = {
        job.shard
        for job in jobs
        if opts.resume and shards.reuse_shard(opts.out / shards.shard_name(job.shard), job.job)
    }
    todo = [job for job in jobs if job.shard not in kept]
    results = _dry_run_local(opts, todo, modalities, params)
    subjects = sum(r["subjects"] for r in results)
    per_mod: dict[str, int] = {}
    for r in results:
        for m, n in r["per_modality"].items():
            per_mod[m] = per_mod.get(m, 0) + n
    nbytes = sum(r["bytes"] for r in results)
    rejections = [x for r in results for x in r["rejections"]]
    n_rows = sum(len(j.rows) for j in jobs)
    print(f"DRY RUN: nothing written ({opts.out} left as it is)")
    print(f"manifest      {opts.manifest}: {n_rows} subjects -> {len(jobs)} shards")
    if kept:
        print(f"kept          {len(kept)} complete shard(s) of an earlier run (--resume)")
    mods = ", ".join(f"{m}: {n}" for m, n in per_mod.items()) or "none"
    print(f"would pack    {subjects} subjects ({mods}) in {len(todo)} shard(s)")
    print(
        f"estimated     {nbytes / 1e6:.2f} MB of float16 data"
        + (f" before {opts.compression} compression" if opts.compression != "none" else "")
    )
    for m, p in params.items():
        print(f"  {m:<10} grid {tuple(p['size'])}, norm {p['norm']}")
    if rejections:
        print(f"would reject  {len(rejections)} input(s):")
        buf = io.StringIO()
        w = csv.DictWriter(
            buf, fieldnames=["subject_id", "modality", "path", "reason"], lineterminator="\n"
        )
        w.writeheader()
        w.writerows(rejections)
        print("  " + buf.getvalue().rstrip("\n").replace("\n", "\n  "))
    else:
        print("would reject  nothing")
    if subjects == 0 and not kept:
        print("FAILED: every input would be rejected", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_REJECTIONS if rejections else EXIT_OK
