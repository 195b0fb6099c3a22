"""``umbrella-pack {build, verify, info, synth}``: argument parsing and exit statuses only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from data_prep import pack
from umbrella_ds import shards


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
        choices=shards.MODALITIES,
        default=None,
        help="default: the image columns the manifest has",
    )
    b.add_argument("--t1-size", **_triple("t1_size"), default=(96, 96, 96), help="T1 target grid")
    b.add_argument(
        "--rsfmri-size", **_triple("rsfmri_size"), default=(96, 96, 96), help="rsfMRI target grid"
    )
    b.add_argument("--t1-norm", choices=("zscore", "none"), default="zscore", help="see FORMAT.md")
    b.add_argument(
        "--rsfmri-norm",
        choices=("znorm_minback", "znorm_zeroback", "minmax", "none"),
        default="znorm_minback",
        help="see FORMAT.md",
    )
    b.add_argument("--subjects-per-shard", type=int, default=32, help="subject i -> shard i // N")
    b.add_argument("--workers", type=int, default=1, help="local worker processes (one shard each)")
    b.add_argument(
        "--mpi",
        action="store_true",
        help="shards round-robin over MPI ranks (start with mpirun; one process per rank, --workers ignored)",
    )
    b.add_argument("--compression", choices=shards.COMPRESSIONS, default="none", help="HDF5 filter")
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
    return p


def _build(a: argparse.Namespace) -> int:
    opts = pack.BuildOptions(
        manifest=a.manifest,
        out=a.out,
        modalities=a.modalities,
        t1_size=tuple(a.t1_size),
        rsfmri_size=tuple(a.rsfmri_size),
        t1_norm=a.t1_norm,
        rsfmri_norm=a.rsfmri_norm,
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


def _info(a: argparse.Namespace) -> int:
    summary = shards.info(a.dir)
    if a.preview is not None:
        from data_prep.preview import draw_preview

        if a.preview_subjects < 1:
            raise pack.UsageError(f"--preview-subjects must be >= 1, got {a.preview_subjects}")
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
            + (f", {summary['rsfmri_frames']} frames" if m == "rsfMRI" else "")
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


def _synth(a: argparse.Namespace) -> int:
    from data_prep.synth import synth

    t0 = time.perf_counter()
    summary = synth(a.out, a.subjects, a.seed, tuple(a.t1_shape), a.frames, tuple(a.rsfmri_shape))
    print(json.dumps(summary, indent=1))
    print(f"synth: {summary['subjects']} subjects in {time.perf_counter() - t0:.1f} s -> {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    handlers = {"build": _build, "verify": _verify, "info": _info, "synth": _synth}
    try:
        return handlers[args.command](args)
    except pack.UsageError as exc:
        print(f"umbrella-pack {args.command}: usage error: {exc}", file=sys.stderr)
        return pack.EXIT_USAGE
    except shards.ShardError as exc:
        print(f"umbrella-pack {args.command}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.command == "synth":
            print(f"umbrella-pack synth: usage error: {exc}", file=sys.stderr)
            return pack.EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
