"""``umbrella-pack info DIR --preview OUT.png``: mid-slices of a sample of packed subjects.

Why: a flipped axis or a normalisation gone wrong is invisible in counts and checksums but obvious
in a picture. One row per sampled subject; per modality three columns (sagittal, coronal, axial
mid-slices; rsfMRI shows its middle frame). Stored volumes are canonical RAS+, drawn in the
neurological convention: the subject's left on the image's left, anterior and superior up. All
cells of a modality share one colour range (1st..99th percentile over the sample), so a subject
normalised differently from the rest stands out; each cell is labelled with its mean and std.

The sample is deterministic: every subject when there are at most ``subjects`` of them, else a
seeded random choice kept in manifest order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from umbrella_ds import modality as modality_table
from umbrella_ds.io import atomic_path
from umbrella_ds.shards import ShardDataset, open_dataset

CELL_PX = 160
HEADER_PX = 40
DPI = 80  # CELL_PX / DPI and HEADER_PX / DPI are exact inches, so the PNG size is exact
PLANES = ("sagittal", "coronal", "axial")
# Direction at the right edge and at the top edge of each plane's image (RAS+, neurological view).
EDGES = {"sagittal": ("A", "S"), "coronal": ("R", "S"), "axial": ("R", "A")}


def preview_size(n_subjects: int, n_modalities: int) -> tuple[int, int]:
    """(width, height) in pixels of a preview with these many rows and modalities."""
    return 3 * n_modalities * CELL_PX, n_subjects * CELL_PX + HEADER_PX


def sample_subjects(ds: ShardDataset, n: int, seed: int) -> list[str]:
    ids = ds.subjects
    if len(ids) <= n:
        return list(ids)
    rng = np.random.default_rng(seed)
    return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False).tolist())]


def mid_slices(vol_xyz: np.ndarray) -> list[np.ndarray]:
    """Sagittal, coronal, axial mid-slices of a RAS+ volume, each ready for ``origin="lower"``
    (rows = the image's vertical axis: superior for sagittal/coronal, anterior for axial)."""
    x, y, z = (n // 2 for n in vol_xyz.shape)
    return [vol_xyz[x, :, :].T, vol_xyz[:, y, :].T, vol_xyz[:, :, z].T]


def _volume(ds: ShardDataset, subject: str, modality: str) -> np.ndarray | None:
    if not ds.has(subject, modality):
        return None
    if modality_table.get(modality).is_series:
        mid = ds.num_frames(subject, modality) // 2
        return np.asarray(ds.read_window(subject, modality, mid, 1)[..., 0], dtype=np.float32)
    return np.asarray(ds.read(subject, modality), dtype=np.float32)


def draw_preview(
    dataset: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    subjects: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Draw the grid to ``out_png`` (written atomically); returns what was drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if subjects < 1:
        raise ValueError(f"--preview-subjects must be >= 1, got {subjects}")
    ds = open_dataset(dataset)
    chosen = sample_subjects(ds, subjects, seed)
    mods = ds.modalities
    volumes = {(s, m): _volume(ds, s, m) for s in chosen for m in mods}
    ranges = {}
    for m in mods:
        vals = [v.ravel() for (_, mm), v in volumes.items() if mm == m and v is not None]
        lo, hi = np.percentile(np.concatenate(vals), [1, 99]) if vals else (0.0, 1.0)
        ranges[m] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)

    width, height = preview_size(len(chosen), len(mods))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1 - HEADER_PX / height
    axes = fig.subplots(len(chosen), 3 * len(mods), squeeze=False)
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=top, wspace=0.02, hspace=0.02)
    ranges_txt = ", ".join(f"{m} [{lo:.2f}, {hi:.2f}]" for m, (lo, hi) in ranges.items())
    fig.suptitle(
        f"{Path(dataset).name}: {len(chosen)} of {len(ds)} subjects; colour ranges {ranges_txt}",
        fontsize=8,
        y=1 - 4 / height,
        va="top",
    )
    for r, subject in enumerate(chosen):
        for j, m in enumerate(mods):
            vol = volumes[(subject, m)]
            for k, plane in enumerate(PLANES):
                ax = axes[r][3 * j + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{m} {plane}", fontsize=7, pad=2)
                if vol is None:
                    ax.text(0.5, 0.5, f"no {m}", ha="center", va="center", fontsize=7)
                    continue
                lo, hi = ranges[m]
                ax.imshow(mid_slices(vol)[k], origin="lower", cmap="gray", vmin=lo, vmax=hi)
                right, up = EDGES[plane]
                ax.text(0.97, 0.5, right, transform=ax.transAxes, fontsize=6, color="cyan",
                        ha="right", va="center")  # fmt: skip
                ax.text(0.5, 0.97, up, transform=ax.transAxes, fontsize=6, color="cyan",
                        ha="center", va="top")  # fmt: skip
                label = f"{subject}" if k == 0 else ""
                stats = f"{label}\nmean {vol.mean():.2f} sd {vol.std():.2f}" if k == 0 else ""
                if stats:
                    ax.text(
                        0.02, 0.98, stats, transform=ax.transAxes, fontsize=5,
                        color="yellow", va="top", ha="left",
                    )  # fmt: skip
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png, ".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return {"path": str(out_png), "subjects": chosen, "modalities": mods, "size": [width, height]}
