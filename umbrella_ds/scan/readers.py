"""Scan readers: NIfTI (a volume 3D, a series 4D) and SwiFT-style frame folders (a series).

Every reader returns float32 data in closest-canonical RAS+ orientation plus provenance, or
raises :class:`InputRejected` with a short reason that goes to ``rejected.csv``. Nothing is
zero-filled: an input that cannot be read is rejected, never replaced.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

FRAME_RE = re.compile(r"^frame_(\d+)\.pt$")
GLOBAL_STATS = "global_stats.pt"
GLOBAL_STATS_KEYS = ("global_mean", "global_std", "global_max", "valid_voxels")


class InputRejected(Exception):
    """One input of one subject is not packable; ``reason`` is what rejected.csv records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ScanSource:
    """A decoded source scan and where it came from (what a packed subject's meta records)."""

    data: np.ndarray  # float32: volume (X,Y,Z); series (T,X,Y,Z), canonical RAS+ axis order
    path: str
    sha256: str
    original_shape: list[int]
    voxel_size: list[float]
    affine: list[list[float]] | None  # canonical affine; None for frame folders (none stored)
    orientation: str  # source axis codes before reorientation, e.g. "LAS"; "RAS (assumed)"
    global_stats: dict[str, float] | None = None  # frame folders with global_stats.pt


def _sha256_paths(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _check_finite(data: np.ndarray) -> None:
    if not np.isfinite(data).all():
        raise InputRejected("NaN/Inf values in source")


def read_nifti(path: Path, ndim: int) -> ScanSource:
    """Load a NIfTI, reorient to closest canonical (RAS+), apply scl_slope/scl_inter.

    ``get_fdata`` applies the scaling and handles any on-disk dtype and byte order; a 4D file
    with one volume is accepted as 3D. A series (ndim=4) comes back time-first (T,X,Y,Z).
    """
    path = Path(path)
    if not path.exists():
        raise InputRejected("missing file")
    try:
        img = nib.load(str(path))
        orientation = "".join(nib.aff2axcodes(img.affine))
        original_shape = [int(x) for x in img.shape]
        canon = nib.as_closest_canonical(img)
        data = canon.get_fdata(dtype=np.float32, caching="unchanged")
        zooms = [float(z) for z in canon.header.get_zooms()[:3]]
        affine = canon.affine.tolist()
    except InputRejected:
        raise
    except Exception as exc:  # nibabel raises many types for truncated/garbled files
        raise InputRejected(f"unreadable: {type(exc).__name__}: {exc}") from exc
    if ndim == 3 and data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise InputRejected(f"wrong dimensionality: {data.ndim}D, expected {ndim}D")
    if min(data.shape) < 1 or data.size == 0:
        raise InputRejected("empty image")
    _check_finite(data)
    if data.ndim == 4:  # NIfTI stores time last
        data = np.ascontiguousarray(np.moveaxis(data, -1, 0))
    return ScanSource(
        data=data,
        path=str(path),
        sha256=_sha256_paths([path]),
        original_shape=original_shape,
        voxel_size=zooms,
        affine=affine,
        orientation=orientation,
    )


def _scalar(value: Any, key: str, path: Path) -> float:
    try:
        return float(torch.as_tensor(value).reshape(()).item())
    except Exception as exc:
        raise InputRejected(f"invalid {key} in {path.name}: {exc}") from exc


def read_frame_folder(folder: Path) -> ScanSource:
    """Load ``frame_{i}.pt`` (i = 0..T-1, each a 3D tensor) and ``global_stats.pt`` if present.

    Frame folders carry no affine: they are taken as already canonical (RAS+), as SwiFT's
    preprocessing writes them. Files load with ``weights_only=True`` (no pickled code).
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputRejected("missing file")
    if not folder.is_dir():
        raise InputRejected("not a frame folder")
    numbered = []
    for p in folder.iterdir():
        m = FRAME_RE.match(p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    numbered.sort()
    if not numbered:
        raise InputRejected("empty image: no frame_*.pt files")
    expected = list(range(len(numbered)))
    got = [i for i, _ in numbered]
    if got != expected:
        missing = sorted(set(range(max(got) + 1)) - set(got))
        raise InputRejected(f"missing frame {missing[0] if missing else got}")
    frames = []
    for i, p in numbered:
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputRejected(f"unreadable: frame_{i}.pt: {type(exc).__name__}: {exc}") from exc
        if not isinstance(t, torch.Tensor):
            raise InputRejected(f"unreadable: frame_{i}.pt holds {type(t).__name__}, not a tensor")
        if t.ndim != 3:
            raise InputRejected(f"wrong dimensionality: frame_{i}.pt is {t.ndim}D, expected 3D")
        if frames and tuple(t.shape) != frames[0].shape:
            raise InputRejected(f"frame_{i}.pt shape {tuple(t.shape)} != {frames[0].shape}")
        frames.append(t.to(torch.float32).numpy())
    data = np.stack(frames)
    _check_finite(data)
    stats = None
    paths = [p for _, p in numbered]
    stats_path = folder / GLOBAL_STATS
    if stats_path.exists():
        paths.append(stats_path)
        try:
            raw = torch.load(stats_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputRejected(f"unreadable: {GLOBAL_STATS}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(raw, dict) or not all(k in raw for k in GLOBAL_STATS_KEYS[:3]):
            raise InputRejected(f"invalid {GLOBAL_STATS}: needs keys {GLOBAL_STATS_KEYS[:3]}")
        stats = {k: _scalar(raw[k], k, stats_path) for k in GLOBAL_STATS_KEYS if k in raw}
        if not all(np.isfinite(list(stats.values()))):
            raise InputRejected(f"NaN/Inf values in {GLOBAL_STATS}")
    return ScanSource(
        data=data,
        path=str(folder),
        sha256=_sha256_paths(paths),
        original_shape=[int(x) for x in data.shape[1:]] + [int(data.shape[0])],
        voxel_size=[1.0, 1.0, 1.0],
        affine=None,
        orientation="RAS (assumed: frame folder)",
        global_stats=stats,
    )


def read_volume(path: Path) -> ScanSource:
    """A volume modality's scan: a 3D NIfTI."""
    return read_nifti(path, ndim=3)


def read_series(path: Path) -> ScanSource:
    """A series modality's scan: a 4D NIfTI file or a frame folder, decided by what the path is."""
    path = Path(path)
    if path.is_dir():
        return read_frame_folder(path)
    return read_nifti(path, ndim=4)
