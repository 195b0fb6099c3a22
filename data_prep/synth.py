"""Synthetic cohort: a procedural head phantom whose phenotypes are visible in the images.

Why these signals: docs/BENCHMARKS.md records that the tiny demo learns sex from a faint blob in the
left vs right hemisphere at about 3x the smoothed noise, through the patch embedding alone.
So sex = blob side (left for male, right for female, in RAS world space: subjects stored
LAS still carry it on the anatomical left after reorientation), BMI_sds = scalp thickness,
age = ventricle size (mild). Output layout is documented in docs/FORMAT.md ("Synthetic cohort").
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from umbrella_ds import modality as modality_table
from umbrella_ds.scan.preprocess import series_stats

SEX_CODES = {1: "male", 2: "female"}
T1_PROMPT = (
    "What is the biological sex of the subject in this T1-weighted MRI? Answer male or female."
)
RS_PROMPT = (
    "What is the biological sex of the subject in this resting-state fMRI? Answer male or female."
)
BMI_PROMPT = "Estimate the BMI standard deviation score of the subject in this T1-weighted MRI."
T3_REF = "This is a T1-weighted MRI of a reference subject who is {label}."
T3_ACK = "Understood. I will compare the next scan with this reference."
T3_QUERY = "Here is another subject's T1-weighted MRI. Is this subject male or female?"


@dataclass
class Subject:
    key: str
    sex: int
    age: int
    bmi_sds: float
    las: bool  # T1 stored with an LAS affine (array flipped along x)
    int16: bool  # T1 stored as int16 with scl_slope


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel centres in [-1, 1] per axis, RAS array order (x right, y anterior, z superior)."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1 for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], lead: int = 1) -> np.ndarray:
    """Unit-std noise smooth over ~4 voxels: low-resolution Gaussian noise, trilinear upsampled."""
    low = tuple(max(2, n // 4 + 1) for n in shape)
    x = torch.from_numpy(rng.standard_normal((lead, 1, *low)).astype(np.float32))
    up = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[:, 0].numpy()
    return up / up.std(axis=(1, 2, 3), keepdims=True)


def phantom(
    s: Subject, shape: tuple[int, int, int], rng: np.random.Generator, frames: int = 0
) -> np.ndarray:
    """Head phantom in RAS order: (X,Y,Z) T1-like, or (T,X,Y,Z) BOLD-like (``bold``) when
    frames > 0. Background outside the head (rsfMRI: the brain) is exactly 0.
    """
    x, y, z = _grid(shape)
    r_head = np.sqrt((x / 0.9) ** 2 + (y / 0.92) ** 2 + (z / 0.88) ** 2)
    scalp = 0.05 + 0.02 * s.bmi_sds  # BMI: thicker scalp
    skull = 0.07
    r_brain_edge = 1.0 - scalp - skull
    vent_scale = 1.0 + 0.15 * (s.age - 120) / 12  # age: slightly larger ventricles
    r_vent = np.sqrt(
        ((np.abs(x) - 0.12) / (0.08 * vent_scale)) ** 2 + (y / 0.25) ** 2 + ((z - 0.1) / 0.12) ** 2
    )
    side = -0.4 if s.sex == 1 else 0.4  # male: left hemisphere (x < 0 in RAS)
    blob = np.exp(-((x - side) ** 2 + (y - 0.1) ** 2 + (z - 0.25) ** 2) / (2 * 0.12**2))
    head = r_head <= 1.0
    brain = r_head <= r_brain_edge
    base = np.zeros(shape, np.float32)
    base[head] = 0.6
    base[head & (r_head > 1.0 - scalp - skull) & (r_head <= 1.0 - scalp)] = 0.2
    base[brain] = 1.0
    base[brain & (r_vent <= 1.0)] = 0.3
    sigma = 0.05
    if frames == 0:
        vol = 100.0 * (base + sigma * _smooth_noise(rng, shape)[0] + 3 * sigma * blob * brain)
        return np.where(head, np.maximum(vol, 1.0), 0.0).astype(np.float32)
    return bold(s, shape, rng, frames)


# Fraction of the box inside the rsfMRI brain mask (documented in docs/FORMAT.md, tested):
# skull-stripped, MNI-registered rsfMRI such as SwiFT's 96^3 inputs is brain inside a constant
# background, and the background is what compresses.
BRAIN_FRACTION = 1 / 3
BRAIN_RADII = (0.78, 0.95, 0.86)  # x (left-right), y (anterior), z (superior), box = [-1, 1]^3


def brain_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Brain-shaped mask: an ellipsoid (pi/6 * 0.78 * 0.95 * 0.86 = 1/3 of the box) with a
    bumpy surface (a fixed smooth field of +-4% of the radius, the same for every subject, as
    after registration to a template) and a midline fissure above the ventricles."""
    x, y, z = _grid(shape)
    a, b, c = BRAIN_RADII
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    bumps = 0.04 * _smooth_noise(np.random.default_rng(20240), shape)[0]
    mask = r <= 1.0 + bumps
    fissure = (np.abs(x) < 1.0 / shape[0]) & (z > 0.45)
    return mask & ~fissure


def bold(
    s: Subject, shape: tuple[int, int, int], rng: np.random.Generator, frames: int
) -> np.ndarray:
    """BOLD-like series (T,X,Y,Z) in RAS order: background exactly 0 outside ``brain_mask``.

    Inside, per voxel: a tissue baseline (a smooth map of sigma 0.05, and the ventricles),
    the subject's sex blob (3x sigma, as in T1), slow network fluctuations (three smooth
    spatial maps with smooth random time courses, 2%), per-frame smooth physiological noise
    (2%), and white thermal noise (sigma 0.05, independent per voxel and frame), as real
    rsfMRI has; the white noise is what makes the brain voxels hard to compress.
    """
    x, y, z = _grid(shape)
    mask = brain_mask(shape)
    vent_scale = 1.0 + 0.15 * (s.age - 120) / 12
    r_vent = np.sqrt(
        ((np.abs(x) - 0.12) / (0.08 * vent_scale)) ** 2 + (y / 0.25) ** 2 + ((z - 0.1) / 0.12) ** 2
    )
    side = -0.4 if s.sex == 1 else 0.4  # male: left hemisphere (x < 0 in RAS)
    blob = np.exp(-((x - side) ** 2 + (y - 0.1) ** 2 + (z - 0.25) ** 2) / (2 * 0.12**2))
    sigma = 0.05
    base = 1.0 + sigma * _smooth_noise(rng, shape)[0] + 3 * sigma * blob
    base[r_vent <= 1.0] = 0.3
    maps = _smooth_noise(rng, shape, lead=3)  # (3, X, Y, Z)
    steps = max(2, frames // 8 + 2)
    courses = F.interpolate(
        torch.from_numpy(rng.standard_normal((1, 3, steps)).astype(np.float32)),
        size=frames,
        mode="linear",
        align_corners=True,
    )[0].numpy()  # (3, T): smooth over ~8 frames
    series = np.empty((frames, *shape), np.float32)
    for t in range(frames):
        fluct = np.tensordot(courses[:, t], maps, axes=1) * (0.02 / np.sqrt(3))
        series[t] = base + fluct
    series += 0.02 * _smooth_noise(rng, shape, lead=frames)
    series += sigma * rng.standard_normal(series.shape, dtype=np.float32)
    series *= 1000.0
    np.maximum(series, 1.0, out=series)
    series[:, ~mask] = 0.0
    return series


def _affine(shape: tuple[int, ...], voxel: float, las: bool) -> np.ndarray:
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = [-(n - 1) * voxel / 2 for n in shape[:3]]
    if las:
        aff[0, 0] = -voxel
        aff[0, 3] = (shape[0] - 1) * voxel / 2
    return aff


def _save_t1(s: Subject, vol_ras: np.ndarray, path: Path) -> None:
    data = vol_ras[::-1].copy() if s.las else vol_ras  # LAS: first axis runs right -> left
    aff = _affine(data.shape, 1.0, s.las)
    if s.int16:
        slope = float(np.abs(data).max()) / 30000.0
        raw = np.round(data / slope).astype(np.int16)
        img = nib.Nifti1Image(raw, aff)
        img.header.set_slope_inter(slope, 0.0)
    else:
        img = nib.Nifti1Image(data, aff)
    nib.save(img, str(path))


def _subjects(n: int, rng: np.random.Generator) -> list[Subject]:
    alphabet = np.array(list("0123456789ABCDEFGHJKLMNPRSTUVWXYZ"))
    keys: set[str] = set()
    out = []
    for i in range(n):
        key = "NDARINV" + "".join(rng.choice(alphabet, 8))
        while key in keys:
            key = "NDARINV" + "".join(rng.choice(alphabet, 8))
        keys.add(key)
        out.append(
            Subject(
                key=key,
                sex=1 + i % 2,  # balanced; the split permutation mixes them
                age=int(rng.integers(108, 132)),
                bmi_sds=float(np.clip(np.round(rng.standard_normal(), 1), -3, 3)),
                las=i % 3 == 1,
                int16=i % 4 == 2,
            )
        )
    return out


def _image_part(modality: str, path: str) -> dict[str, Any]:
    return {"type": "image", "modality": modality, "image_path": path}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _single_task(
    task: str, s: Subject, modality: str, path: str, prompt: str, answer: str, label: Any
) -> dict:
    return {
        "task_id": f"{task}_{s.key}",
        "task_type": "T1",
        "subject_ids": [s.key],
        "modalities": [modality],
        "images": [{"path": path, "token": "<image>", "modality": modality}],
        "conversations": [
            {"role": "user", "content": [_image_part(modality, path), _text(prompt)]},
            {"role": "assistant", "content": [_text(answer)]},
        ],
        "metadata": {"subject_id": s.key, "subject_label": label, "task": task},
    }


def _t3_task(ref: Subject, query: Subject, paths: dict[str, str]) -> dict:
    ref_label, q_label = SEX_CODES[ref.sex], SEX_CODES[query.sex]
    return {
        "task_id": f"t3_sex_{ref.key}_{query.key}",
        "task_type": "T3",
        "subject_ids": [ref.key, query.key],
        "modalities": ["sMRI", "sMRI"],
        "images": [
            {"path": paths[ref.key], "token": "<image>", "modality": "sMRI"},
            {"path": paths[query.key], "token": "<image>", "modality": "sMRI"},
        ],
        "conversations": [
            {
                "role": "user",
                "content": [
                    _image_part("sMRI", paths[ref.key]),
                    _text(T3_REF.format(label=ref_label)),
                ],
            },
            {"role": "assistant", "content": [_text(T3_ACK)]},
            {"role": "user", "content": [_image_part("sMRI", paths[query.key]), _text(T3_QUERY)]},
            {"role": "assistant", "content": [_text(f"{q_label}.")]},
        ],
        "metadata": {
            "subject_id": query.key,
            "subject_label": q_label,
            "reference_id": ref.key,
            "reference_label": ref_label,
            "task": "sex_comparison",
        },
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def synth(
    out: Path,
    n_subjects: int,
    seed: int = 0,
    t1_shape: tuple[int, int, int] = (40, 48, 40),
    frames: int = 16,
    rsfmri_shape: tuple[int, int, int] = (24, 28, 24),
) -> dict[str, Any]:
    """Write the cohort under ``out``; returns a summary (counts and file names)."""
    if n_subjects < 2:
        raise ValueError("--subjects must be >= 2 (train and eval splits)")
    out = Path(out)
    for d in ("t1", "rsfmri_nifti", "rsfmri_frames/img", "instructions"):
        (out / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    subjects = _subjects(n_subjects, rng)
    t1_paths, rs_paths = {}, {}
    for s in subjects:
        srng = np.random.default_rng([seed, int.from_bytes(s.key.encode()[-6:], "little")])
        t1_paths[s.key] = f"t1/{s.key}.nii.gz"
        _save_t1(s, phantom(s, t1_shape, srng), out / t1_paths[s.key])
        series_txyz = phantom(s, rsfmri_shape, srng, frames=frames)
        rs_paths[s.key] = f"rsfmri_nifti/{s.key}.nii.gz"
        img = nib.Nifti1Image(
            np.ascontiguousarray(np.moveaxis(series_txyz, 0, -1)), _affine(rsfmri_shape, 3.0, False)
        )
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 0.8
        nib.save(img, str(out / rs_paths[s.key]))
        folder = out / "rsfmri_frames" / "img" / s.key
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            torch.save(torch.from_numpy(series_txyz[t].copy()), folder / f"frame_{t}.pt")
        stats = series_stats(series_txyz)
        torch.save(
            {k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items()},
            folder / "global_stats.pt",
        )
    with open(out / "phenotypes.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["subjectkey", "sex", "age", "BMI_sds"])
        for s in subjects:
            w.writerow([s.key, s.sex, s.age, f"{s.bmi_sds:.1f}"])
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        columns = [modality_table.T1.manifest_column, modality_table.RSFMRI.manifest_column]
        w.writerow(["subjectkey", *columns, "sex", "age", "BMI_sds"])
        for s in subjects:
            w.writerow(
                [
                    s.key,
                    t1_paths[s.key],
                    f"rsfmri_frames/img/{s.key}",
                    s.sex,
                    s.age,
                    f"{s.bmi_sds:.1f}",
                ]
            )
    order = rng.permutation(len(subjects))
    n_train = max(1, min(len(subjects) - 1, round(0.8 * len(subjects))))
    splits = {
        "train": [subjects[i] for i in sorted(order[:n_train])],
        "eval": [subjects[i] for i in sorted(order[n_train:])],
    }
    counts: dict[str, int] = {}
    for split, members in splits.items():
        files = {
            "t1_sex": [
                _single_task(
                    "t1_sex",
                    s,
                    "sMRI",
                    t1_paths[s.key],
                    T1_PROMPT,
                    f"{SEX_CODES[s.sex]}.",
                    SEX_CODES[s.sex],
                )
                for s in members
            ],
            "rsfmri_sex": [
                _single_task(
                    "rsfmri_sex",
                    s,
                    modality_table.RSFMRI.name,
                    rs_paths[s.key],
                    RS_PROMPT,
                    f"{SEX_CODES[s.sex]}.",
                    SEX_CODES[s.sex],
                )
                for s in members
            ],
            "bmi": [
                _single_task(
                    "bmi", s, "sMRI", t1_paths[s.key], BMI_PROMPT, f"{s.bmi_sds:.1f}", s.bmi_sds
                )
                for s in members
            ],
            "t3_sex": [],
        }
        if len(members) >= 2:
            for j, q in enumerate(members):
                k = int(rng.integers(0, len(members) - 1))
                ref = members[k if k < j else k + 1]
                files["t3_sex"].append(_t3_task(ref, q, t1_paths))
        for name, records in files.items():
            _write_jsonl(out / "instructions" / f"{name}_{split}.jsonl", records)
            counts[f"{name}_{split}"] = len(records)
    return {
        "out": str(out),
        "subjects": len(subjects),
        "splits": {k: len(v) for k, v in splits.items()},
        "tasks": counts,
    }
