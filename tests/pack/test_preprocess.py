"""Readers and preprocessing: orientation, dtypes, byte order, resize, normalisation, rejections."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from umbrella_ds.scan.preprocess import (
    make_params_for,
    normalise_series,
    preprocess,
    resize,
    series_from_source,
    series_stats,
    to_float16,
)
from umbrella_ds.scan.readers import InputRejected, read_frame_folder, read_nifti, read_series

PARAMS = make_params_for({"T1": (16, 16, 16), "rsfMRI": (8, 8, 8)})


def _ras_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A volume with an asymmetric structure so that a missed flip changes the result."""
    rng = np.random.default_rng(seed)
    vol = rng.uniform(10, 20, shape).astype(np.float32)
    vol[: shape[0] // 3] += 50.0  # bright left third (low x in RAS)
    vol[:, : shape[1] // 4] += 7.0
    return vol


def _affine(shape: tuple[int, ...], codes: str) -> np.ndarray:
    aff = np.eye(4)
    for ax, c in enumerate(codes):
        if c in "LPI":
            aff[ax, ax] = -1.0
            aff[ax, 3] = shape[ax] - 1
    return aff


def _save(tmp: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    path = tmp / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _expected_t1(vol_ras: np.ndarray) -> np.ndarray:
    v = resize(vol_ras, (16, 16, 16)).astype(np.float32)
    return (
        (v - np.float32(v.mean(dtype=np.float64))) / np.float32(v.std(dtype=np.float64))
    ).astype(np.float16)


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 24, 18), (32, 32, 32), (12, 10, 14)])
def test_t1_round_trip_over_source_shapes(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    vol = _ras_volume(shape)
    out = preprocess("T1", _save(tmp_path, "a.nii.gz", vol, np.eye(4)), PARAMS)
    assert out.dtype == np.float16 and out.shape == (16, 16, 16)
    np.testing.assert_array_equal(out, _expected_t1(vol))
    # z-scored then rounded to float16 (2^-11 relative per voxel): mean 0 and std 1 to ~1e-3;
    # the exact check is the line above, these say what the numbers mean
    assert abs(float(out.astype(np.float64).mean())) < 1e-2
    assert abs(float(out.astype(np.float64).std()) - 1.0) < 1e-2


@pytest.mark.parametrize("codes", ["LAS", "RPS", "LPI", "RAI"])
def test_orientation_is_canonicalised(tmp_path: Path, codes: str) -> None:
    vol = _ras_volume((20, 18, 16))
    stored = vol.copy()
    for ax, c in enumerate(codes):
        if c in "LPI":
            stored = np.flip(stored, axis=ax)
    path = _save(tmp_path, "o.nii.gz", np.ascontiguousarray(stored), _affine(stored.shape, codes))
    src = read_nifti(path, 3)
    assert src.orientation == codes
    np.testing.assert_array_equal(src.data, vol)
    ras = preprocess("T1", _save(tmp_path, "r.nii.gz", vol, np.eye(4)), PARAMS)
    np.testing.assert_array_equal(preprocess("T1", path, PARAMS), ras)


def test_int16_with_scl_slope_and_inter(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).integers(-1000, 3000, (16, 18, 20)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.25, 10.0)
    path = tmp_path / "i16.nii.gz"
    nib.save(img, str(path))
    src = read_nifti(path, 3)
    # values up to 760 held in float32 (ulp 6.1e-5 there); measured 0 under
    # ATEN_CPU_CAPABILITY=default/avx2/avx512 (AMD EPYC, 2026-12-07), like every bound below
    np.testing.assert_allclose(src.data, raw.astype(np.float64) * 0.25 + 10.0, rtol=0, atol=1e-4)
    expected = preprocess(
        "T1", _save(tmp_path, "f.nii", raw * np.float32(0.25) + np.float32(10), np.eye(4)), PARAMS
    )
    np.testing.assert_array_equal(preprocess("T1", path, PARAMS), expected)


@pytest.mark.parametrize("dtype", [">f4", "<f4", ">i2", "<f8", "uint8"])
def test_dtypes_and_byte_orders(tmp_path: Path, dtype: str) -> None:
    vol = np.random.default_rng(2).integers(1, 200, (16, 16, 16)).astype(dtype)
    path = tmp_path / "d.nii"
    header = nib.Nifti1Header(endianness=">" if dtype.startswith(">") else "<")
    header.set_data_dtype(np.dtype(dtype))
    nib.save(nib.Nifti1Image(vol, np.eye(4), header), str(path))
    on_disk = nib.load(str(path)).get_data_dtype()
    assert on_disk == np.dtype(dtype), on_disk
    src = read_nifti(path, 3)
    np.testing.assert_array_equal(src.data, vol.astype(np.float32))
    np.testing.assert_array_equal(
        preprocess("T1", path, PARAMS), _expected_t1(vol.astype(np.float32))
    )


def test_resize_area_down_is_block_mean_and_identity_is_exact() -> None:
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype(np.float32)
    down = resize(x, (4, 4, 4))
    block = x.reshape(2, 4, 2, 4, 2, 4, 2).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(down, block, rtol=1e-6, atol=1e-6)  # measured 6.0e-8 abs
    np.testing.assert_array_equal(resize(x, (8, 8, 8)), x)
    up = resize(x[0], (16, 4, 12))  # mixed: area on the shrinking axis, trilinear on the others
    assert up.shape == (16, 4, 12)
    const = np.full((5, 7, 9), 3.0, np.float32)
    np.testing.assert_allclose(resize(const, (11, 3, 9)), 3.0, rtol=1e-6)


def _series(shape=(6, 10, 10, 10), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.uniform(500, 1500, shape).astype(np.float32)
    s[:, :2] = 0.0  # background slab
    return s


def test_rsfmri_stats_use_foreground_ddof0() -> None:
    s = _series()
    st = series_stats(s)
    fg = s[s != 0].astype(np.float64)
    assert st["global_mean"] == pytest.approx(fg.mean())
    assert st["global_std"] == pytest.approx(fg.std(ddof=0))
    assert st["global_max"] == pytest.approx(fg.max())
    assert st["valid_voxels"] == fg.size


def test_rsfmri_normalisation_modes() -> None:
    s = _series()
    st = series_stats(s)
    m, sd = st["global_mean"], st["global_std"]
    minback = normalise_series(s, "znorm_minback", st)
    np.testing.assert_allclose(minback[:, 0], -m / sd, rtol=1e-5)  # measured 6.5e-8 (float32)
    assert abs(float(minback[s != 0].mean())) < 1e-4
    zero = normalise_series(s, "znorm_zeroback", st)
    assert np.all(zero[:, :2] == 0)
    np.testing.assert_allclose(zero[s != 0], minback[s != 0])
    mm = normalise_series(s, "minmax", st)
    assert float(mm.max()) == pytest.approx(1.0)
    np.testing.assert_array_equal(normalise_series(s, "none", st), s)


def test_frame_folder_equals_4d_nifti(tmp_path: Path) -> None:
    s = _series((5, 12, 10, 8))
    nii = _save(tmp_path, "rs.nii.gz", np.moveaxis(s, 0, -1).copy(), np.eye(4))
    folder = tmp_path / "img" / "SUBJ"
    folder.mkdir(parents=True)
    for t in range(s.shape[0]):
        torch.save(torch.from_numpy(s[t].copy()), folder / f"frame_{t}.pt")
    st = series_stats(s)
    torch.save(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in st.items()}, folder / "global_stats.pt"
    )
    for norm in ("znorm_minback", "znorm_zeroback", "minmax", "none"):
        params = make_params_for({"rsfMRI": (8, 8, 8)}, {"rsfMRI": norm})
        a = series_from_source(read_series(nii), params, "rsfMRI")
        b = series_from_source(read_series(folder), params, "rsfMRI")
        assert a[1]["stats_source"] == "per_subject" and b[1]["stats_source"] == "global_stats.pt"
        np.testing.assert_array_equal(a[0], b[0])
    out = preprocess("rsfMRI", folder, make_params_for({"rsfMRI": (8, 8, 8)}))
    assert out.shape == (8, 8, 8, 5) and out.dtype == np.float16


def test_float16_overflow_is_rejected_not_clipped() -> None:
    with pytest.raises(InputRejected, match="float16 overflow"):
        to_float16(np.array([1.0, 70000.0], np.float32))
    np.testing.assert_array_equal(to_float16(np.array([65504.0], np.float32)), [65504.0])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "missing file"),
        (lambda p: p.write_bytes(b"not a nifti at all" * 10), "unreadable"),
        (
            lambda p: nib.save(
                nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), str(p)
            ),
            "wrong dimensionality",
        ),
        (
            lambda p: nib.save(
                nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(p)
            ),
            "NaN/Inf",
        ),
        (
            lambda p: nib.save(
                nib.Nifti1Image(np.full((8, 8, 8), 7, np.float32), np.eye(4)), str(p)
            ),
            "constant volume",
        ),
    ],
)
def test_t1_rejections(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "x.nii.gz"
    make(path)
    with pytest.raises(InputRejected, match=reason):
        preprocess("T1", path, PARAMS)


def test_truncated_nifti_is_rejected(tmp_path: Path) -> None:
    path = _save(tmp_path, "t.nii.gz", _ras_volume((24, 24, 24)), np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputRejected, match="unreadable"):
        preprocess("T1", path, PARAMS)


def test_frame_folder_rejections(tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    folder.mkdir()
    for t in (0, 1, 3):
        torch.save(torch.ones(4, 4, 4), folder / f"frame_{t}.pt")
    with pytest.raises(InputRejected, match="missing frame 2"):
        read_frame_folder(folder)
    flat = tmp_path / "flat"
    flat.mkdir()
    torch.save(torch.ones(4, 4), flat / "frame_0.pt")
    with pytest.raises(InputRejected, match="wrong dimensionality"):
        read_frame_folder(flat)
    empty = tmp_path / "zero"
    empty.mkdir()
    torch.save(torch.zeros(4, 4, 4), empty / "frame_0.pt")
    with pytest.raises(InputRejected, match="empty image"):
        series_from_source(
            read_frame_folder(empty), make_params_for({"rsfMRI": (4, 4, 4)}), "rsfMRI"
        )
