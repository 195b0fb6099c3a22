"""Packing orchestration: manifest -> shard jobs -> worker processes or MPI ranks -> index.

Each shard is built start to finish by one process from its own manifest rows, so the bytes
of a shard never depend on how many workers or ranks ran. The coordinator (rank 0) writes
``rejected.csv`` and then ``index.json`` last, both atomically. ``--dry-run`` runs the same jobs
through the same runner (``runner.py``) with a writer that keeps counts instead of a file.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.manifest import Row, read_manifest
from data_prep.runner import Report, run_jobs
from umbrella_ds import modality as modality_table
from umbrella_ds import shards
from umbrella_ds.errors import UsageError
from umbrella_ds.io import atomic_write_text
from umbrella_ds.provenance import write_provenance
from umbrella_ds.scan.preprocess import from_source, make_params_for, read_source
from umbrella_ds.scan.readers import InputRejected

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTIONS = 0, 1, 2, 3
# Test hook: the process that finishes shard k dies at once (simulates a preempted pack).
DIE_AFTER_ENV = "UMBRELLA_PACK_TEST_DIE_AFTER_SHARD"
REJECTED_COLUMNS = ["subject_id", "modality", "path", "reason"]


@dataclass
class ShardJob:
    shard: int
    rows: list[Row]
    job: str = ""


@dataclass
class BuildOptions:
    """``umbrella-pack build``'s options. ``sizes`` and ``norms`` map a modality name (any in the
    modality table) to its target grid and normalisation; a modality left out gets the table's
    ``default_size`` / ``default_norm``."""

    manifest: Path
    out: Path
    modalities: list[str] | None = None
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
        m = modality_table.get(name)
        return tuple(self.sizes.get(name) or m.default_size)

    def norm_of(self, name: str) -> str:
        m = modality_table.get(name)
        return self.norms.get(name) or m.default_norm


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


@dataclass(frozen=True)
class ShardTask:
    """What every shard job of one run shares (sent with each job to a helper process)."""

    out: Path
    modalities: list[str]
    params: dict[str, Any]
    compression: str
    resume: bool = False
    discard: bool = False  # a dry run: count what would be written, write nothing


@dataclass
class DiscardWriter:
    """The dry run's writer: :class:`shards.ShardWriter`'s interface, no file. It keeps what the
    dry run reports (subjects with their modalities, float16 bytes, rejections) and is its own
    record on close."""

    shard: int
    subjects: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    nbytes: int = 0

    def add_subject(
        self,
        subject_id: str,
        position: int,
        phenotypes: dict[str, Any],
        volumes: dict[str, Any],
        meta: dict[str, dict[str, Any]],
    ) -> None:
        # Modalities in the order packed (the table's), as the dry run has always counted them.
        entry = {"id": subject_id, "position": position, "modalities": {m: {} for m in volumes}}
        self.subjects.append(entry)
        self.nbytes += sum(v.nbytes for v in volumes.values())

    def add_rejection(self, subject_id: str, modality: str, path: str, reason: str) -> None:
        self.rejections.append(dict(zip(REJECTED_COLUMNS, (subject_id, modality, path, reason))))

    def close(self) -> DiscardWriter:
        return self

    def abort(self) -> None:
        pass


# What a shard job returns: the written shard's index record, or a dry run's counts.
Record = shards.ShardRecord | DiscardWriter


def build_shard(job: ShardJob, task: ShardTask, report: Report | None = None) -> Record:
    """Build one shard from its rows (``shards.ShardRecord``; a :class:`DiscardWriter` for a dry
    run); ``report(bytes packed)`` moves the progress bar once per row."""
    writer: shards.ShardWriter | DiscardWriter
    if task.discard:
        writer = DiscardWriter(job.shard)
    else:
        shapes = {m: tuple(task.params[m]["size"]) for m in task.modalities}
        writer = shards.ShardWriter(
            task.out, job.shard, shapes, task.compression, task.params, job.job
        )
    try:
        for row in job.rows:
            volumes, meta, rejected = _process_subject(row, task.modalities, task.params)
            for m, path, reason in rejected:
                writer.add_rejection(row.subject_id, m, path, reason)
            if volumes:
                writer.add_subject(row.subject_id, row.position, row.phenotypes, volumes, meta)
            if report is not None:  # a dry run packs nothing: its bar shows 0 MB/s packed
                report(0 if task.discard else sum(v.nbytes for v in volumes.values()))
        record = writer.close()
    except BaseException:
        writer.abort()
        raise
    return record


def run_shard(job: ShardJob, report: Report, task: ShardTask) -> tuple[Record, bool]:
    """Keep a verified shard from an earlier run (resume) or build it; returns (record, reused)."""
    path = task.out / shards.shard_name(job.shard)
    record: Record | None = shards.reuse_shard(path, job.job) if task.resume else None
    reused = record is not None
    if record is None:
        record = build_shard(job, task, report)
    else:
        for _ in job.rows:
            report(0)
    if not task.discard and os.environ.get(DIE_AFTER_ENV) == str(job.shard):
        os._exit(137)
    return record, reused


def _run(
    jobs: list[ShardJob], task: ShardTask, workers: int, progress: bool
) -> list[tuple[Record, bool]]:
    """Every job through the runner: ``(record, reused)`` per job, in job order."""
    return run_jobs(
        jobs,
        functools.partial(run_shard, task=task),
        workers=workers,
        subjects=sum(len(j.rows) for j in jobs),
        progress=progress,
    )


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
    atomic_write_text(out / shards.REJECTED_NAME, _rejections_csv(rejections))
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


def _modality_counts(subjects: list[dict[str, Any]]) -> str:
    """``T1: 10, rsfMRI: 9``: subjects per modality, in order of first appearance."""
    per_mod: dict[str, int] = {}
    for s in subjects:
        for m in s["modalities"]:
            per_mod[m] = per_mod.get(m, 0) + 1
    return ", ".join(f"{m}: {n}" for m, n in per_mod.items())


def _rejections_csv(rejections: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=REJECTED_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rejections)
    return buf.getvalue()


def _summary(
    out: Path, index: dict[str, Any] | None, rejections: list, reused: int, n_shards: int
) -> int:
    if index is None:
        print(
            f"FAILED: every input was rejected; nothing packed. Reasons in {out / shards.REJECTED_NAME}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    mods = _modality_counts(index["subjects"])
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
    task = ShardTask(opts.out, modalities, params, opts.compression, opts.resume)
    if opts.dry_run:
        if opts.mpi:
            raise UsageError("--dry-run runs on one node: drop --mpi (use --workers)")
        return dry_run(opts, jobs, task)
    if opts.mpi:
        return _build_mpi(opts, jobs, task)
    _check_out_dir(opts.out, opts.resume)
    opts.out.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(_lock_out_dir(opts.out)):
        _clean_temporaries(opts.out)
        results = _run(jobs, task, opts.workers, opts.progress)
        records = [record for record, _ in results]
        index, rejections = _write_outputs(opts.out, records, opts, params, len(jobs))
    reused = sum(kept for _, kept in results)
    return _summary(opts.out, index, rejections, reused, len(jobs))


def _build_mpi(opts: BuildOptions, jobs: list[ShardJob], task: ShardTask) -> int:
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
        result = ("ok", _run(mine, task, 1, opts.progress and rank == 0))
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
            results = [one for r in gathered for one in r[1]]
            records = [record for record, _ in results]
            reused = sum(kept for _, kept in results)
            index, rejections = _write_outputs(
                opts.out, records, opts, task.params, len(jobs), ranks
            )
            status = _summary(opts.out, index, rejections, reused, len(jobs))
        if lock is not None:
            lock.close()
    return comm.bcast(status, root=0)


def dry_run(opts: BuildOptions, jobs: list[ShardJob], task: ShardTask) -> int:
    """``build --dry-run``: what a build would pack and reject, and its size; writes nothing.

    Every input is read and preprocessed (rejections such as NaN values or a float16 overflow
    after normalisation are only known that way): the build's jobs run through the build's
    runner with a :class:`DiscardWriter`, so it costs about what a build costs, minus the
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
    dry = dataclasses.replace(task, resume=False, discard=True)
    records = [record for record, _ in _run(todo, dry, opts.workers, opts.progress)]
    subjects = [s for r in records for s in r.subjects]
    rejections = [x for r in records for x in r.rejections]
    n_rows = sum(len(j.rows) for j in jobs)
    print(f"DRY RUN: nothing written ({opts.out} left as it is)")
    print(f"manifest      {opts.manifest}: {n_rows} subjects -> {len(jobs)} shards")
    if kept:
        print(f"kept          {len(kept)} complete shard(s) of an earlier run (--resume)")
    mods = _modality_counts(subjects) or "none"
    print(f"would pack    {len(subjects)} subjects ({mods}) in {len(todo)} shard(s)")
    print(
        f"estimated     {sum(r.nbytes for r in records) / 1e6:.2f} MB of float16 data"
        + (f" before {opts.compression} compression" if opts.compression != "none" else "")
    )
    for m, p in task.params.items():
        print(f"  {m:<10} grid {tuple(p['size'])}, norm {p['norm']}")
    if rejections:
        print(f"would reject  {len(rejections)} input(s):")
        print("  " + _rejections_csv(rejections).rstrip("\n").replace("\n", "\n  "))
    else:
        print("would reject  nothing")
    if not subjects and not kept:
        print("FAILED: every input would be rejected", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_REJECTIONS if rejections else EXIT_OK
