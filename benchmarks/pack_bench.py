"""Pack throughput: subjects/s and MB/s with 1 and 2 worker processes, side by side.

`python -m benchmarks.pack_bench [--subjects N]` writes benchmarks/results/pack_bench.json.
Input MB/s counts the decoded source voxels (float32), output MB/s the shard bytes written.
Worker processes start with `spawn` (a few seconds each to import torch): a fixed cost that
small cohorts feel and real ones do not. Measures, never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from benchmarks.common import disk_write_mb_per_s, write_result
from data_prep.pack import BuildOptions, build
from data_prep.synth import synth
from umbrella_ds.shards import info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subjects", type=int, default=24)
    p.add_argument("--t1-source", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--t1-size", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--rsfmri-shape", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--compression", default="none")
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items() if k != "workdir"
    }
    figures: dict[str, float] = {}
    src_mb = (
        a.subjects
        * 4
        * (
            a.t1_source[0] * a.t1_source[1] * a.t1_source[2]
            + a.frames * a.rsfmri_shape[0] * a.rsfmri_shape[1] * a.rsfmri_shape[2]
        )
        / 1e6
    )
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        synth(root / "raw", a.subjects, 0, tuple(a.t1_source), a.frames, tuple(a.rsfmri_shape))
        for k in a.workers:
            out = root / f"shards_w{k}"
            opts = BuildOptions(
                manifest=root / "raw" / "manifest.csv",
                out=out,
                t1_size=tuple(a.t1_size),
                rsfmri_size=tuple(a.rsfmri_shape),
                workers=k,
                compression=a.compression,
                subjects_per_shard=max(1, a.subjects // 4),
                progress=False,
            )
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                build(opts)
            dt = time.perf_counter() - t0
            disk = info(out)["bytes_on_disk"] / 1e6
            figures[f"workers_{k}_seconds"] = dt
            figures[f"workers_{k}_subjects_per_s"] = a.subjects / dt
            figures[f"workers_{k}_input_MB_per_s"] = src_mb / dt
            figures[f"workers_{k}_output_MB_per_s"] = disk / dt
        # The limit any packer meets: the disk's sequential write speed, measured in this same
        # run, on the same filesystem, with a file as large as the pack.
        figures["disk_sequential_write_MB_per_s"] = disk_write_mb_per_s(
            root, max(int(disk * 1e6), 8 << 20)
        )
    largest = max(figures[f"workers_{k}_output_MB_per_s"] for k in a.workers)
    ratio = {
        "best_output_MB_per_s_over_disk_limit": largest / figures["disk_sequential_write_MB_per_s"]
    }
    if 1 in a.workers and 2 in a.workers:
        ratio["speedup_2_workers_over_1"] = (
            figures["workers_1_seconds"] / figures["workers_2_seconds"]
        )
    medians = {k: v for k, v in figures.items() if k.endswith("_seconds")}
    path = write_result("pack_bench", config, figures, ratio=ratio, medians=medians)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
