"""Preprocessing shared by packing and inference: resize, normalise, float16 range check.

The formulas are specified in docs/FORMAT.md. :func:`preprocess` takes the ``preprocessing``
dict a packed dataset records (``ds.preprocessing``), so a new raw scan at inference goes
through exactly what the training data went through. What a modality gets (volume or series
preprocessing, which reader) is asked of the modality table (``Modality.is_series``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from umbrella_ds import modality as modality_table
from umbrella_ds.scan.readers import InputRejected, ScanSource, read_series, read_volume

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
RESIZE_METHOD = "area_down_trilinear_up"
# Frames resized per call: bounds memory for long series at real grid sizes.
FRAMES_PER_BATCH = 16


def make_params_for(
    sizes: Mapping[str, Sequence[int]], norms: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The preprocessing record stored in every shard and in index.json: one entry per modality
    in ``sizes`` (table order), normalised by ``norms[m]`` or the modality's default."""
    params: dict[str, Any] = {}
    for name in modality_table.ordered(sizes):
        m = modality_table.get(name)
        norm = (norms or {}).get(name, m.default_norm)
        if norm not in m.norms:
            raise ValueError(f"{m.name} normalisation {norm!r}: choose one of {m.norms}")
        params[m.name] = _record(m, sizes[name], norm)
    return params


def _record(m: modality_table.Modality, size: Sequence[int], norm: str) -> dict[str, Any]:
    if not m.is_series:
        return {
            "size": [int(x) for x in size],
            "reorient": "closest_canonical_RAS+",
            "resize": RESIZE_METHOD,
            "norm": norm,
            "ddof": 0,
        }
    return {
        "size": [int(x) for x in size],
        "reorient": "closest_canonical_RAS+ (frame folders taken as canonical)",
        "resize": RESIZE_METHOD,
        "norm": norm,
        "background": "raw value == 0",
        "stats": "global_stats.pt for frame folders that have it, else per subject",
        "ddof": 0,
    }


def resize(vol: np.ndarray, size: tuple[int, ...] | list[int]) -> np.ndarray:
    """Resize the last three axes to ``size`` (float32 in, float32 out).

    Axes that shrink use area interpolation (mean over each output cell's input region,
    ``adaptive_avg_pool3d``, as MONAI's ``mode="area"``); axes that grow then use trilinear
    interpolation with ``align_corners=False``. Unchanged axes pass through exactly.
    """
    size = tuple(int(s) for s in size)
    src = tuple(vol.shape[-3:])
    if src == size:
        return np.ascontiguousarray(vol, dtype=np.float32)
    lead = vol.shape[:-3]
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)).reshape(-1, 1, *src)
    mid = tuple(min(a, b) for a, b in zip(src, size))
    if mid != src:
        x = F.adaptive_avg_pool3d(x, mid)
    if mid != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x.reshape(*lead, *size).numpy()


def to_float16(x: np.ndarray) -> np.ndarray:
    """Cast after normalisation; a value that would overflow float16 rejects the input."""
    if not np.isfinite(x).all():
        raise InputRejected("NaN/Inf values after normalisation")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > FLOAT16_MAX:
        raise InputRejected(f"float16 overflow after normalisation (max |x| = {peak:.6g})")
    return x.astype(np.float16)


def normalise_volume(vol: np.ndarray, norm: str) -> tuple[np.ndarray, dict[str, float]]:
    """z-score over the whole (resized) volume, ddof 0; a constant volume is rejected."""
    mean = float(vol.mean(dtype=np.float64))
    std = float(vol.std(dtype=np.float64))
    if std == 0.0 or not np.isfinite(std):
        raise InputRejected("constant volume")
    if norm == "none":
        return vol, {"mean": mean, "std": std}
    return (vol - np.float32(mean)) / np.float32(std), {"mean": mean, "std": std}


def series_stats(data: np.ndarray) -> dict[str, float]:
    """Statistics of the non-background (raw != 0) voxels of the whole series, ddof 0.

    The same function computes the per-subject statistics for 4D NIfTI and (in ``synth``) the
    ``global_stats.pt`` of frame folders, which is why the two forms pack to equal arrays.
    """
    fg = data[data != 0]
    if fg.size == 0:
        raise InputRejected("empty image: every voxel is background (0)")
    mean = float(fg.mean(dtype=np.float64))
    std = float(fg.std(dtype=np.float64))
    if std == 0.0:
        raise InputRejected("constant volume")
    return {
        "global_mean": mean,
        "global_std": std,
        "global_max": float(fg.max()),
        "valid_voxels": float(fg.size),
    }


def normalise_series(data: np.ndarray, norm: str, stats: dict[str, float]) -> np.ndarray:
    """Apply one of the predecessor's modes (see FORMAT.md) at source resolution."""
    if norm == "none":
        return data
    if norm == "minmax":
        peak = stats["global_max"]
        if peak <= 0:
            raise InputRejected(f"minmax normalisation needs global_max > 0, got {peak}")
        return data / np.float32(peak)
    mean, std = np.float32(stats["global_mean"]), np.float32(stats["global_std"])
    if std <= 0:
        raise InputRejected(f"constant volume (global_std = {stats['global_std']})")
    z = (data - mean) / std
    if norm == "znorm_zeroback":
        z[data == 0] = 0.0
    elif norm != "znorm_minback":
        raise ValueError(f"unknown rsfMRI normalisation {norm!r}")
    return z


def read_source(name: str, path: Path) -> ScanSource:
    """The reader of modality ``name``: a 3D NIfTI (volume), or a 4D NIfTI / frame folder (series)."""
    return read_series(path) if modality_table.get(name).is_series else read_volume(path)


def from_source(
    name: str, src: ScanSource, params: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Canonical source of modality ``name`` -> float16 as the shards store it (series time
    first), plus the statistics used; volume or series preprocessing as the table says."""
    m = modality_table.get(name)
    return (series_from_source if m.is_series else volume_from_source)(src, params, m.name)


def volume_from_source(
    src: ScanSource, params: dict[str, Any], name: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Canonical volume source -> (D,H,W) float16 on the target grid, plus the statistics used."""
    p = params[name]
    vol = resize(src.data, p["size"])
    vol, stats = normalise_volume(vol, p["norm"])
    return to_float16(vol), {"stats": stats}


def series_from_source(
    src: ScanSource, params: dict[str, Any], name: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Canonical series source (T,X,Y,Z) -> (T,D,H,W) float16, plus the statistics used."""
    p = params[name]
    if src.global_stats is not None:
        stats, origin = dict(src.global_stats), "global_stats.pt"
    else:
        stats, origin = series_stats(src.data), "per_subject"
    out = np.empty((src.data.shape[0], *p["size"]), dtype=np.float16)
    for t0 in range(0, src.data.shape[0], FRAMES_PER_BATCH):
        chunk = normalise_series(src.data[t0 : t0 + FRAMES_PER_BATCH], p["norm"], stats)
        out[t0 : t0 + FRAMES_PER_BATCH] = to_float16(resize(chunk, p["size"]))
    return out, {"stats": stats, "stats_source": origin}


def _as_source(image: Any, m: modality_table.Modality) -> ScanSource:
    if isinstance(image, ScanSource):
        return image
    if isinstance(image, str | Path):
        return read_source(m.name, Path(image))
    if isinstance(image, nib.spatialimages.SpatialImage):
        canon = nib.as_closest_canonical(image)
        data = canon.get_fdata(dtype=np.float32)
        if not m.is_series and data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != m.ndim:
            raise InputRejected(f"wrong dimensionality: {data.ndim}D, expected {m.ndim}D")
        if m.is_series:  # NIfTI stores time last; a ScanSource holds it first
            data = np.ascontiguousarray(np.moveaxis(data, -1, 0))
        return ScanSource(data, "<in-memory>", "", list(image.shape), [], canon.affine.tolist(), "")
    raise TypeError(f"expected a nibabel image, a path or a ScanSource, got {type(image).__name__}")


def preprocess(name: str, image: Any, params: dict[str, Any]) -> np.ndarray:
    """Raw scan of modality ``name`` (a nibabel image, a NIfTI path, a frame folder or a
    :class:`ScanSource`) -> float16 in the reader's layout (series: time last, ``(D,H,W,T)``), as
    packing stores it and ``ds.read`` returns it; ``params`` is ``ds.preprocessing`` (or
    :func:`make_params_for`)."""
    m = modality_table.get(name)
    arr = from_source(m.name, _as_source(image, m), params)[0]
    return np.moveaxis(arr, 0, -1) if m.is_series else arr
