"""A minimal shard-format v1 writer, for tests and benchmarks only.

The package writes v2 only; v1 datasets exist in the wild and are read by ``umbrella-pack
upgrade`` (and verify/info) through ``umbrella_ds/shards/v1.py``. This writes what the last
v1-capable writer (``ShardWriter(..., format_version=1)``, before issue 26) wrote, byte for byte
(checked against that writer's files when it was removed): the v2 layout without the ``*_xxh3``
digest datasets, every image dataset with HDF5's ``fletcher32`` filter, and ``format_version``
1 in each shard's ``meta_json`` and in the index. (A checked-in .h5 fixture would be ignored by
.gitignore's ``*.h5``; the datasets are tiny and written in milliseconds.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from umbrella_ds import __version__
from umbrella_ds import modality as modality_table
from umbrella_ds.shards import ShardRecord, build_index, write_index
from umbrella_ds.shards.format import (
    ALWAYS_TABLES,
    ATTR_META,
    DTYPE,
    FORMAT_NAME,
    V1,
    dataset_name,
    ids_name,
    offsets_name,
    resolve_compression,
    rows_per_chunk,
    shard_name,
)
from umbrella_ds.shards.writer import compression_filter, record_for


class V1ShardWriter:
    """``ShardWriter``'s interface (add_subject, add_rejection, close), writing format v1."""

    def __init__(
        self,
        out_dir: Path,
        shard: int,
        shapes: dict[str, tuple[int, ...]],
        compression: str | dict[str, str],
        preprocessing: dict[str, Any],
        job: str,
    ) -> None:
        self.out_dir, self.shard, self.job = Path(out_dir), shard, job
        self.final = self.out_dir / shard_name(shard)
        self.tmp = self.out_dir / f".{shard_name(shard)}.tmp{os.getpid()}"
        self.preprocessing = preprocessing
        self.shapes = {m: tuple(int(x) for x in s) for m, s in shapes.items()}
        self.compressions = resolve_compression(compression, self.shapes)
        self.compression = compression if isinstance(compression, str) else "per-modality"
        self.subjects: list[dict[str, Any]] = []
        self.rejections: list[dict[str, str]] = []
        tabled = modality_table.ordered({*ALWAYS_TABLES, *self.shapes})
        self.ids: dict[str, list[str]] = {m: [] for m in tabled}
        self.offsets = {m: [0] for m in tabled if modality_table.get(m).is_series}
        self.f = h5py.File(self.tmp, "w", track_order=False)
        self.data = {}
        for m in modality_table.ordered(self.shapes):
            d, h, w = self.shapes[m]
            self.data[m] = self.f.create_dataset(
                dataset_name(m),
                shape=(0, d, h, w),
                maxshape=(None, d, h, w),
                dtype=DTYPE,
                chunks=(rows_per_chunk(m), d, h, w),
                fletcher32=True,
                track_times=False,
                **compression_filter(self.compressions[m]),
            )

    def add_subject(
        self,
        subject_id: str,
        position: int,
        phenotypes: dict[str, Any],
        volumes: dict[str, np.ndarray],
        meta: dict[str, dict[str, Any]],
    ) -> None:
        """A volume modality's array is (D,H,W), a series' (T,D,H,W), float16."""
        entry: dict[str, Any] = {"id": subject_id, "position": position, "shard": self.shard,
                                 "phenotypes": phenotypes, "modalities": {}}  # fmt: skip
        for m in sorted(volumes):
            arr, ds, rec = volumes[m], self.data[m], dict(meta.get(m, {}))
            assert arr.dtype == DTYPE, arr.dtype
            start = ds.shape[0]
            if modality_table.get(m).is_series:
                ds.resize(start + arr.shape[0], axis=0)
                ds[start:] = arr
                self.offsets[m].append(start + arr.shape[0])
                rec["offset"], rec["frames"] = start, int(arr.shape[0])
            else:
                ds.resize(start + 1, axis=0)
                ds[start] = arr
                rec["row"] = start
            self.ids[m].append(subject_id)
            entry["modalities"][m] = rec
        self.subjects.append(entry)

    def add_rejection(self, subject_id: str, modality: str, path: str, reason: str) -> None:
        self.rejections.append(
            {"subject_id": subject_id, "modality": modality, "path": path, "reason": reason}
        )

    def close(self) -> ShardRecord:
        for m, ids in self.ids.items():
            self.f.create_dataset(ids_name(m), data=np.array(ids, dtype=object),
                                  dtype=h5py.string_dtype("utf-8"), track_times=False)  # fmt: skip
            if m in self.offsets:
                self.f.create_dataset(offsets_name(m), track_times=False,
                                      data=np.array(self.offsets[m], dtype=np.int64))  # fmt: skip
        meta = {
            "format": FORMAT_NAME,
            "format_version": V1,
            "tool_version": __version__,
            "shard": self.shard,
            "job": self.job,
            "compression": self.compression,
            "compressions": self.compressions,
            "shapes": {m: list(s) for m, s in self.shapes.items()},
            "preprocessing": self.preprocessing,
            "subjects": self.subjects,
            "rejections": self.rejections,
        }
        self.f.attrs[ATTR_META] = json.dumps(meta, sort_keys=True)
        self.f.flush()
        self.f.close()
        record = record_for(self.tmp, meta, self.final.name)
        os.replace(self.tmp, self.final)
        return record


def write_v1_index(out: Path, records: list[ShardRecord], **build_index_kwargs: Any) -> None:
    """``index.json`` of a v1 dataset: ``build_index``'s content, format_version 1."""
    index = build_index(records, **build_index_kwargs)
    index["format_version"] = V1
    write_index(out, index)
