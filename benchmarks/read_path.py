"""Read path: shard format v2 vs v1 vs the raw page-cache limit, and vs the predecessor.

`python -m benchmarks.read_path [--subjects N] [--reads R]` writes benchmarks/results/read_path.json.
Side by side in one run, at the GPU benchmark's shapes (T1 96^3; rsfMRI 96^3, 24-frame windows
at random starts) on the realistic synthetic cohort, all files page-cached after a warm-up pass,
the paths alternating over `--rounds` (median of the per-round medians):

- the limit: `np.fromfile` of the same decoded float16 bytes from one flat file (a T1 volume;
  a window's 24 consecutive frames);
- v2 (this format): every chunk read directly and checked against its xxh3-64 digest; T1 and
  rsfMRI uncompressed, and rsfMRI with the default compression (`auto`: Blosc lz4);
- v1 (the previous format): the same uncompressed data through HDF5 with fletcher32, written by
  the test-only v1 writer (tests/helpers/v1_shards.py) and read by the upgrade's v1 reader
  (umbrella_ds/shards/v1.py; training reads v2 only);
- the predecessor's per-access paths: decode the source `.nii.gz`, reorient, resize, z-score
  (T1); 24 `torch.load` calls on the subject's frame folder (rsfMRI).

Targets (issue 18): T1 with its checksum <= 1.5x the raw read, a 24-frame window <= 2x.
Issue 25 adds the reads into a reused buffer (what the loader's batch slots do): `out=` for v2,
`os.preadv` into a reused buffer for the limit, and the window with Blosc lz4 (the default) and
zstd, each with 1 and 2 decode threads;
the target there: the default codec's window into a slot <= 2x the raw page-cache read.
Measures, never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result, write_shards
from data_prep.pack import BuildOptions, build
from data_prep.synth import synth
from umbrella_ds.scan.preprocess import preprocess
from umbrella_ds.shards import open_dataset, set_decode_threads
from umbrella_ds.shards.v1 import open_any


def _median_ms(fn: Callable, args_list: list) -> float:
    times = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--reads", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--t1-source", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--t1-size", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--rsfmri-shape", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--window", type=int, default=24)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items() if k != "workdir"
    }
    t1_shape = tuple(a.t1_size)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            synth(root / "raw", a.subjects, 0, tuple(a.t1_source), a.frames, tuple(a.rsfmri_shape))
            build(
                BuildOptions(
                    manifest=root / "raw" / "manifest.csv",
                    out=root / "auto",
                    sizes={"T1": t1_shape, "rsfMRI": tuple(a.rsfmri_shape)},
                    subjects_per_shard=max(1, a.subjects // 2),
                    progress=False,
                )
            )
        auto = open_dataset(root / "auto")
        subjects = auto.subjects
        images = [
            {
                "id": s,
                "T1": auto.read(s, "T1"),
                "rsfMRI": np.ascontiguousarray(np.moveaxis(auto.read(s, "rsfMRI"), -1, 0)),
            }
            for s in subjects
        ]
        per_shard = max(1, a.subjects // 2)
        write_shards(root / "v2_none", images, "none", per_shard)
        write_shards(root / "v1_none", images, "none", per_shard, format_version=1)
        write_shards(root / "v2_zstd", images, "blosc-zstd", per_shard)
        v2, v1 = open_dataset(root / "v2_none"), open_any(root / "v1_none")
        zstd = open_dataset(root / "v2_zstd")
        flat = root / "flat.bin"  # the limit: the same decoded bytes in one flat file
        with open(flat, "wb") as f:
            for img in images:
                f.write(img["T1"].tobytes())
            for img in images:
                f.write(img["rsfMRI"].tobytes())
        n = int(np.prod(t1_shape))
        frame_n = int(np.prod(a.rsfmri_shape))
        base = len(subjects) * n * 2
        row = {s: i for i, s in enumerate(subjects)}

        def raw_t1(s: str) -> np.ndarray:
            return np.fromfile(flat, np.float16, n, offset=row[s] * n * 2).reshape(t1_shape)

        def raw_window(s: str, t: int) -> np.ndarray:
            off = base + (row[s] * a.frames + t) * frame_n * 2
            return np.fromfile(flat, np.float16, a.window * frame_n, offset=off)

        fd = os.open(flat, os.O_RDONLY)
        t1_buf = np.empty(t1_shape, np.float16)
        win_buf = np.empty((a.window, *a.rsfmri_shape), np.float16)

        def raw_t1_into(s: str) -> np.ndarray:
            os.preadv(fd, [t1_buf], row[s] * n * 2)
            return t1_buf

        def raw_window_into(s: str, t: int) -> np.ndarray:
            os.preadv(fd, [win_buf], base + (row[s] * a.frames + t) * frame_n * 2)
            return win_buf

        def threads(n: int, fn: Callable) -> Callable:
            def run(*args: object) -> object:
                set_decode_threads(n)
                try:
                    return fn(*args)
                finally:
                    set_decode_threads(1)

            return run

        rng = np.random.default_rng(0)
        picks = [subjects[i] for i in rng.integers(0, len(subjects), a.reads)]
        starts = rng.integers(0, a.frames - a.window + 1, a.reads)
        t1_args = [(s,) for s in picks]
        win_args = [(s, int(t)) for s, t in zip(picks, starts)]
        for s in subjects:  # warm every path's page cache, open files and chunk tables
            raw_t1(s)
            raw_window(s, 0)
            for ds in (auto, v2, v1, zstd):
                ds.read(s, "T1")
                ds.read(s, "rsfMRI")
        paths_t1 = {
            "raw": raw_t1,
            "raw_into": raw_t1_into,
            "v2": lambda s: v2.read(s, "T1"),
            "v2_into": lambda s: v2.read(s, "T1", out=t1_buf),
            "v1_fletcher32": lambda s: v1.read(s, "T1"),
        }
        paths_win = {
            "raw": raw_window,
            "v2_none": lambda s, t: v2.read_window(s, "rsfMRI", t, a.window),
            "v2_auto_blosc_lz4": lambda s, t: auto.read_window(s, "rsfMRI", t, a.window),
            "v1_fletcher32": lambda s, t: v1.read_window(s, "rsfMRI", t, a.window),
            # into a reused buffer (a batch slot): no allocation, no first-touch faults
            "raw_into": raw_window_into,
            "v2_none_into": lambda s, t: v2.read_window(s, "rsfMRI", t, a.window, out=win_buf),
            "v2_auto_blosc_lz4_into": lambda s, t: auto.read_window(
                s, "rsfMRI", t, a.window, out=win_buf
            ),
            "v2_auto_blosc_lz4_into_2_threads": threads(
                2, lambda s, t: auto.read_window(s, "rsfMRI", t, a.window, out=win_buf)
            ),
            "v2_blosc_zstd_into": lambda s, t: zstd.read_window(
                s, "rsfMRI", t, a.window, out=win_buf
            ),
            "v2_blosc_zstd_into_2_threads": threads(
                2, lambda s, t: zstd.read_window(s, "rsfMRI", t, a.window, out=win_buf)
            ),
        }
        rounds: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            for name, fn in paths_t1.items():
                rounds.setdefault(f"t1_{name}_ms", []).append(_median_ms(fn, t1_args))
            for name, fn in paths_win.items():
                rounds.setdefault(f"rsfmri_window_{name}_ms", []).append(_median_ms(fn, win_args))
        few = picks[: max(3, a.reads // 8)]  # the slow paths: fewer reads suffice for a median
        t1_pred = _median_ms(
            lambda s: preprocess("T1", root / "raw" / "t1" / f"{s}.nii.gz", auto.preprocessing),
            [(s,) for s in few],
        )
        frames_root = root / "raw" / "rsfmri_frames" / "img"

        def frames(s: str, t: int) -> torch.Tensor:
            return torch.stack(
                [
                    torch.load(frames_root / s / f"frame_{i}.pt", weights_only=True)
                    for i in range(t, t + a.window)
                ]
            )

        for s in subjects:
            frames(s, 0)
        rs_pred = _median_ms(frames, win_args[: max(3, a.reads // 4)])
        for ds in (auto, v2, v1, zstd):
            ds.close()
        os.close(fd)
    figures = {k: statistics.median(v) for k, v in rounds.items()}
    figures["t1_predecessor_decode_resize_ms"] = t1_pred
    figures["rsfmri_window_24_torch_load_ms"] = rs_pred
    figures["t1_v2_MB_per_s"] = n * 2 / 1e3 / figures["t1_v2_ms"]
    figures["t1_v2_samples_per_s"] = 1e3 / figures["t1_v2_ms"]
    for name in (
        "v2_none",
        "v2_auto_blosc_lz4",
        "v2_auto_blosc_lz4_into",
        "v2_auto_blosc_lz4_into_2_threads",
        "v2_blosc_zstd_into",
        "v2_blosc_zstd_into_2_threads",
    ):
        figures[f"rsfmri_{name}_windows_per_s"] = 1e3 / figures[f"rsfmri_window_{name}_ms"]
    ratio = {
        "t1_v2_over_raw (target <= 1.5)": figures["t1_v2_ms"] / figures["t1_raw_ms"],
        "t1_v1_fletcher32_over_raw": figures["t1_v1_fletcher32_ms"] / figures["t1_raw_ms"],
        "rsfmri_window_v2_none_over_raw (target <= 2)": (
            figures["rsfmri_window_v2_none_ms"] / figures["rsfmri_window_raw_ms"]
        ),
        "rsfmri_window_v2_auto_blosc_lz4_over_raw": (
            figures["rsfmri_window_v2_auto_blosc_lz4_ms"] / figures["rsfmri_window_raw_ms"]
        ),
        "rsfmri_window_v1_fletcher32_over_raw": (
            figures["rsfmri_window_v1_fletcher32_ms"] / figures["rsfmri_window_raw_ms"]
        ),
        "t1_v2_into_over_raw_into": figures["t1_v2_into_ms"] / figures["t1_raw_into_ms"],
        "rsfmri_window_v2_none_into_over_raw_into": (
            figures["rsfmri_window_v2_none_into_ms"] / figures["rsfmri_window_raw_into_ms"]
        ),
        "rsfmri_window_v2_auto_blosc_lz4_into_over_raw (target <= 2)": (
            figures["rsfmri_window_v2_auto_blosc_lz4_into_ms"] / figures["rsfmri_window_raw_ms"]
        ),
        "rsfmri_window_v2_auto_blosc_lz4_into_over_raw_into": (
            figures["rsfmri_window_v2_auto_blosc_lz4_into_ms"]
            / figures["rsfmri_window_raw_into_ms"]
        ),
        "rsfmri_window_v2_auto_blosc_lz4_into_2_threads_over_raw_into": (
            figures["rsfmri_window_v2_auto_blosc_lz4_into_2_threads_ms"]
            / figures["rsfmri_window_raw_into_ms"]
        ),
        "t1_v2_speedup_vs_predecessor": t1_pred / figures["t1_v2_ms"],
        "rsfmri_window_v2_auto_speedup_vs_torch_load": (
            rs_pred / figures["rsfmri_window_v2_auto_blosc_lz4_ms"]
        ),
    }
    path = write_result("read_path", config, figures, ratio=ratio, rounds=rounds)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
