"""Read path: shards vs the predecessor's per-access decoding vs the raw page-cache limit.

`python -m benchmarks.read_path [--subjects N] [--reads R]` writes benchmarks/results/read_path.json.
Side by side in one run, on one synthetic cohort (all files page-cached after a warm-up pass):

- T1, one random subject per read: `ds.read` from the shards; the predecessor's per-access path
  (decode the source `.nii.gz`, reorient, resize to the target grid, z-score); and the limit,
  `np.fromfile` of the same float16 bytes from one flat file. Targets: >= 50x the predecessor,
  within 3x of the limit. The same read without fletcher32 shows what the per-read checksum
  (required by the format) costs.
- rsfMRI, a 24-frame window at a random start: `ds.read_window` vs 24 `torch.load` calls on the
  subject's frame folder (the predecessor's path). Target >= 20x.
Measures, never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import write_result
from data_prep.pack import BuildOptions, build
from data_prep.preprocess import preprocess_t1
from data_prep.synth import synth
from umbrella_ds.shards import open_dataset


def _median_per_call(fn, args_list: list) -> float:
    times = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--reads", type=int, default=40)
    p.add_argument("--t1-source", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--t1-size", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--rsfmri-shape", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--window", type=int, default=24)
    p.add_argument("--compression", default="none")
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items() if k != "workdir"
    }
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        synth(root / "raw", a.subjects, 0, tuple(a.t1_source), a.frames, tuple(a.rsfmri_shape))
        opts = BuildOptions(
            manifest=root / "raw" / "manifest.csv",
            out=root / "shards",
            t1_size=tuple(a.t1_size),
            rsfmri_size=tuple(a.rsfmri_shape),
            compression=a.compression,
            subjects_per_shard=max(1, a.subjects // 2),
            progress=False,
        )
        build(opts)
        ds = open_dataset(root / "shards")
        subjects = ds.subjects
        rng = np.random.default_rng(0)
        picks = [subjects[i] for i in rng.integers(0, len(subjects), a.reads)]
        # The raw limit: the same float16 volumes in one flat file, read with np.fromfile.
        flat = root / "t1.bin"
        with open(flat, "wb") as f:
            for s in subjects:
                f.write(ds.read(s, "T1").tobytes())
        n = int(np.prod(a.t1_size))
        row = {s: i for i, s in enumerate(subjects)}
        for s in subjects:  # warm every path's page cache
            ds.read(s, "T1")
            np.fromfile(flat, np.float16, n, offset=row[s] * n * 2)
        t1_shard = _median_per_call(lambda s: ds.read(s, "T1"), [(s,) for s in picks])
        # The same volumes in HDF5 without fletcher32: what the per-read checksum costs.
        with h5py.File(root / "nofletcher.h5", "w") as f:
            f.create_dataset(
                "T1", data=np.stack([ds.read(s, "T1") for s in subjects]), chunks=(1, *a.t1_size)
            )
        plain = h5py.File(root / "nofletcher.h5", "r", rdcc_nbytes=0)["T1"]

        def read_plain(s: str) -> np.ndarray:
            out = np.empty(tuple(a.t1_size), np.float16)
            plain.read_direct(out, np.s_[row[s]])
            return out

        for s in subjects:
            read_plain(s)
        t1_plain = _median_per_call(read_plain, [(s,) for s in picks])
        plain.file.close()
        t1_raw = _median_per_call(
            lambda s: np.fromfile(flat, np.float16, n, offset=row[s] * n * 2).reshape(a.t1_size),
            [(s,) for s in picks],
        )
        few = picks[: max(3, a.reads // 8)]  # the slow path: fewer reads suffice for a median
        t1_pred = _median_per_call(
            lambda s: preprocess_t1(root / "raw" / "t1" / f"{s}.nii.gz", ds.preprocessing),
            [(s,) for s in few],
        )
        starts = rng.integers(0, a.frames - a.window + 1, a.reads)
        win_args = [(s, int(t)) for s, t in zip(picks, starts)]
        for s in subjects:
            ds.read(s, "rsfMRI")
        rs_shard = _median_per_call(lambda s, t: ds.read_window(s, "rsfMRI", t, a.window), win_args)
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
        rs_pred = _median_per_call(frames, win_args[: max(3, a.reads // 4)])
    t1_mb = n * 2 / 1e6
    figures = {
        "t1_shard_read_ms": t1_shard * 1e3,
        "t1_predecessor_decode_resize_ms": t1_pred * 1e3,
        "t1_raw_fromfile_ms": t1_raw * 1e3,
        "t1_hdf5_without_fletcher32_ms": t1_plain * 1e3,
        "t1_shard_MB_per_s": t1_mb / t1_shard,
        "rsfmri_window_shard_ms": rs_shard * 1e3,
        "rsfmri_window_24_torch_load_ms": rs_pred * 1e3,
    }
    ratio = {
        "t1_shard_speedup_vs_predecessor": t1_pred / t1_shard,
        "t1_shard_time_over_raw_limit": t1_shard / t1_raw,
        "t1_hdf5_without_fletcher32_over_raw_limit": t1_plain / t1_raw,
        "rsfmri_window_speedup_vs_torch_load": rs_pred / rs_shard,
    }
    medians = {k: v for k, v in figures.items() if k.endswith("_ms")}
    path = write_result("read_path", config, figures, ratio=ratio, medians=medians)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
