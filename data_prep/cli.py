"""``umbrella-pack {build, verify, info, synth, manifest}``: argument parsing and exit statuses only.

A usage error (a flag, a manifest, a BIDS folder) is one ``error: ...`` line and exit status 2
(umbrella_ds/errors.py); ``build`` adds 3 for a pack with rejections and 1 for a failed one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from data_prep import pack
from umbrella_ds import modality as modality_table
from umbrella_ds import shards
from umbrella_ds.errors import UsageError, add_debug_flag, run_main

MANIFEST_HELP = """Write a manifest CSV, ready for `build --manifest`, from one of two sources.

--bids DIR: one row per subject: subject_id (sub-<label> -> <label>), T1 (anat/*_T1w), rsfMRI
(func/*_task-<task>_*bold), then the columns of participants.tsv. Several sessions: the first in
sorted order, or --session. Several runs: run-1, else the lowest.

--instructions FILE|DIR ...: the UMBRELLA/BrainVLM instruction files (JSONL, JSON arrays, folders
of JSON): one row per subject they name, with the image paths in them (a NIfTI per subject, a
SwiFT frame folder), rewritten by --path-map OLD=NEW (the cluster prefix they were written with ->
where the files are now); phenotypes from --phenotypes CSV joined by subjectkey/subject_id.
Rows sorted by subject key.

Either way, images not found are listed with the reason in <out stem>.missing.csv.
Exit status 0, or 2 on a usage error."""


def _triple(name: str) -> dict:
    return {"nargs": 3, "type": int, "metavar": ("D", "H", "W"), "dest": name}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="umbrella-pack", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build",
        help="pack a manifest into shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Exit status: 0 all packed, 3 packed with rejections (DIR/rejected.csv), "
        "1 failed, 2 usage error. Relative paths in the manifest resolve against its folder.",
    )
    b.add_argument(
        "--manifest",
        type=Path,
        required=True,
        help="CSV: subject_id|subjectkey, T1, rsfMRI, phenotypes...",
    )
    b.add_argument("--out", type=Path, required=True, help="output dataset directory")
    b.add_argument(
        "--modalities",
        nargs="+",
        choices=modality_table.names(),
        default=None,
        help="default: the image columns the manifest has",
    )
    # --t1-size, --rsfmri-size, ..., then --t1-norm, ...: one pair per modality in the table.
    for m in modality_table.all():
        b.add_argument(
            m.size_flag,
            **_triple(m.size_dest),
            default=m.default_size,
            help=f"{m.name} target grid",
        )
    for m in modality_table.all():
        b.add_argument(m.norm_flag, choices=m.norms, default=m.default_norm, help="see FORMAT.md")
    b.add_argument("--subjects-per-shard", type=int, default=32, help="subject i -> shard i // N")
    b.add_argument("--workers", type=int, default=1, help="local worker processes (one shard each)")
    b.add_argument(
        "--mpi",
        action="store_true",
        help="shards round-robin over MPI ranks (start with mpirun; one process per rank, --workers ignored)",
    )
    b.add_argument(
        "--compression",
        choices=("auto", *shards.COMPRESSIONS),
        default="auto",
        help=f"HDF5 filter; auto = per modality {shards.DEFAULT_COMPRESSION} (docs/BENCHMARKS.md)",
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="keep complete, verified shards of an earlier run in --out; redo the rest",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--dry-run",
        action="store_true",
        help="read and validate every input, report counts, estimated size and rejections; "
        "write nothing (not even --out)",
    )

    v = sub.add_parser("verify", help="re-hash every shard, check shapes and index consistency")
    v.add_argument("dir", type=Path)

    u = sub.add_parser(
        "upgrade",
        help="convert a dataset to the current shard format (v1 -> v2), atomically",
        description="Rewrites every shard under DIR/.upgrade, then moves them and the index "
        "into place; an interrupted upgrade is finished by running it again.",
    )
    u.add_argument("dir", type=Path)
    u.add_argument(
        "--compression", choices=("auto", *shards.COMPRESSIONS), default=None, help="recompress"
    )

    i = sub.add_parser("info", help="subjects, modalities, shapes, dtype, bytes, compression ratio")
    i.add_argument("dir", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument(
        "--preview",
        type=Path,
        metavar="OUT.png",
        help="also draw mid-slices (3 planes) of a sample of subjects to this PNG",
    )
    i.add_argument(
        "--preview-subjects", type=int, default=8, metavar="N", help="subjects in the preview"
    )
    i.add_argument("--preview-seed", type=int, default=0, help="seed of the preview's sample")

    s = sub.add_parser(
        "synth",
        help="write a synthetic cohort (phantoms, phenotypes, instructions)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--subjects", type=int, required=True)
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--t1-shape", **_triple("t1_shape"), default=(40, 48, 40), help="T1 grid")
    s.add_argument("--frames", type=int, default=16, help="rsfMRI frames")
    s.add_argument(
        "--rsfmri-shape", **_triple("rsfmri_shape"), default=(24, 28, 24), help="rsfMRI grid"
    )

    m = sub.add_parser(
        "manifest",
        help="write the manifest CSV of a BIDS dataset or of UMBRELLA/BrainVLM instruction files",
        description=MANIFEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = m.add_mutually_exclusive_group(required=True)
    source.add_argument("--bids", type=Path, metavar="DIR", help="BIDS dataset root")
    source.add_argument(
        "--instructions",
        type=Path,
        nargs="+",
        metavar="FILE|DIR",
        help="UMBRELLA/BrainVLM instruction files or folders: pack the images they name",
    )
    m.add_argument(
        "--phenotypes",
        type=Path,
        default=None,
        metavar="CSV",
        help="with --instructions: phenotype CSV keyed by subjectkey or subject_id",
    )
    m.add_argument(
        "--path-map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="with --instructions: rewrite image paths under OLD to NEW (repeatable)",
    )
    m.add_argument(
        "--derivatives",
        default=None,
        metavar="NAME",
        help="read images from DIR/derivatives/NAME (e.g. fmriprep) instead of the raw dataset",
    )
    m.add_argument(
        "--session",
        default=None,
        metavar="LABEL",
        help="use this session (ses-LABEL) for every subject; default: the first in sorted order",
    )
    m.add_argument(
        "--task", default=None, help="the resting-state task label (task-LABEL; default rest)"
    )
    m.add_argument(
        "--space",
        default=None,
        metavar="LABEL",
        help="with --derivatives: the space-LABEL to take when images exist in several",
    )
    m.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    for parser in (p, *sub.choices.values()):
        add_debug_flag(parser)
    return p


def _build(a: argparse.Namespace) -> int:
    opts = pack.BuildOptions(
        manifest=a.manifest,
        out=a.out,
        modalities=a.modalities,
        sizes={m.name: tuple(getattr(a, m.size_dest)) for m in modality_table.all()},
        norms={m.name: getattr(a, m.norm_dest) for m in modality_table.all()},
        subjects_per_shard=a.subjects_per_shard,
        workers=a.workers,
        mpi=a.mpi,
        compression=a.compression,
        resume=a.resume,
        progress=not a.no_progress,
        dry_run=a.dry_run,
    )
    return pack.build(opts)


def _verify(a: argparse.Namespace) -> int:
    problems = shards.verify(a.dir)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {a.dir}", file=sys.stderr)
        return 1
    print(f"verify: OK {a.dir}")
    return 0


def _upgrade(a: argparse.Namespace) -> int:
    done = shards.upgrade(a.dir, a.compression)
    if done["shards"] == 0:
        print(f"upgrade: {a.dir} is already format v{shards.FORMAT_VERSION}; nothing to do")
    else:
        print(f"upgrade: {done['shards']} shard(s) of {a.dir} now format v{shards.FORMAT_VERSION}")
    return 0


def _info(a: argparse.Namespace) -> int:
    summary = shards.info(a.dir)
    if a.preview is not None:
        from data_prep.preview import draw_preview

        if a.preview_subjects < 1:
            raise UsageError(f"--preview-subjects: must be >= 1, got {a.preview_subjects}")
        drawn = draw_preview(a.dir, a.preview, subjects=a.preview_subjects, seed=a.preview_seed)
        summary["preview"] = drawn
        if not a.json:
            w, h = drawn["size"]
            print(f"preview      {drawn['path']} ({len(drawn['subjects'])} subjects, {w}x{h} px)")
    if a.json:
        print(json.dumps(summary, indent=1))
        return 0
    ratio = summary["compression_ratio"]
    print(f"dataset      {summary['path']}")
    print(f"subjects     {summary['subjects']}  {summary['subjects_per_modality']}")
    print(f"modalities   {', '.join(summary['modalities'])}")
    for m, shape in summary["shapes"].items():
        print(
            f"  {m:<10} grid {tuple(shape)}"
            + (f", {summary['rsfmri_frames']} frames" if modality_table.get(m).is_series else "")
        )
    print(f"dtype        {summary['dtype']}")
    print(f"shards       {summary['shards']} (compression {summary['compression']})")
    print(
        f"on disk      {summary['bytes_on_disk'] / 1e6:.2f} MB (uncompressed {summary['bytes_uncompressed'] / 1e6:.2f} MB, "
        f"ratio {ratio:.2f})"
        if ratio
        else "on disk      0 B"
    )
    print(f"rejections   {summary['rejections']}")
    print(f"fingerprint  {summary['fingerprint']}")
    return 0


def _manifest(a: argparse.Namespace) -> int:
    if a.instructions is not None:
        return _manifest_from_instructions(a)
    from data_prep import bids

    for flag in ("phenotypes", "path_map"):
        if getattr(a, flag):
            raise UsageError(
                f"--{flag.replace('_', '-')}: only with --instructions (BIDS: participants.tsv)"
            )
    t0 = time.perf_counter()
    found = bids.scan(
        a.bids, derivatives=a.derivatives, session=a.session, task=a.task or "rest", space=a.space
    )
    missing = bids.write(found, a.out)
    lacking = sorted({m["subject_id"] for m in found.missing})
    _print_missing([f"{m['subject_id']}: no {m['modality']}: {m['reason']}" for m in found.missing])
    print(
        f"manifest: {len(found.rows)} subjects -> {a.out} in {time.perf_counter() - t0:.1f} s; "
        f"{len(lacking)} lacking a modality, listed in {missing}"
    )
    return 0


def _print_missing(lines: list[str], shown: int = 10) -> None:
    """The first of a manifest's missing images on stderr; the missing list file has them all."""
    for line in lines[:shown]:
        print(f"umbrella-pack manifest: {line}", file=sys.stderr)
    if len(lines) > shown:
        print(f"umbrella-pack manifest: ... {len(lines) - shown} more", file=sys.stderr)


def _manifest_from_instructions(a: argparse.Namespace) -> int:
    from data_prep import umbrella_manifest

    for flag in ("derivatives", "session", "task", "space"):
        if getattr(a, flag) is not None:
            raise UsageError(f"--{flag}: only with --bids")
    t0 = time.perf_counter()
    found = umbrella_manifest.scan(a.instructions, phenotypes=a.phenotypes, path_maps=a.path_map)
    missing = umbrella_manifest.write(found, a.out)
    _print_missing(
        [f"{m['subject_id']}: {m['modality']} {m['path']}: {m['reason']}" for m in found.missing]
    )
    print(
        f"manifest: {len(found.rows)} subjects from {found.tasks} tasks -> {a.out} in "
        f"{time.perf_counter() - t0:.1f} s; {len(found.missing)} image(s) not found, listed in "
        f"{missing}"
    )
    return 0


def _synth(a: argparse.Namespace) -> int:
    from data_prep.synth import synth

    t0 = time.perf_counter()
    summary = synth(a.out, a.subjects, a.seed, tuple(a.t1_shape), a.frames, tuple(a.rsfmri_shape))
    print(json.dumps(summary, indent=1))
    print(f"synth: {summary['subjects']} subjects in {time.perf_counter() - t0:.1f} s -> {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = make_parser().parse_args(argv)
    handlers = {
        "build": _build,
        "verify": _verify,
        "upgrade": _upgrade,
        "info": _info,
        "synth": _synth,
        "manifest": _manifest,
    }
    if args.command in ("verify", "info", "upgrade"):
        _require_dataset(args.dir)
    try:
        return handlers[args.command](args)
    except shards.ShardError as exc:  # a damaged or unwritable pack: a fault, not a usage error
        print(f"umbrella-pack {args.command}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.command == "synth":
            raise UsageError(str(exc)) from exc
        raise


def _require_dataset(path: Path) -> None:
    """``verify``/``info``/``upgrade`` of a folder holding no pack is the user's slip, not damage."""
    if not (path / shards.INDEX_NAME).is_file():
        raise UsageError(
            f"{path}: no {shards.INDEX_NAME} (not a packed shard directory; "
            "umbrella-pack build --out DIR writes one)"
        )


if __name__ == "__main__":
    sys.exit(main())
