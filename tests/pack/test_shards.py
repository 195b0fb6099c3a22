"""Shard format: writer determinism, reader API, lazy per-process files, integrity checks."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shlex
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import xxhash
from helpers.v1_shards import V1ShardWriter, write_v1_index

from data_prep.cli import main as pack_cli
from umbrella_ds import shards
from umbrella_ds.errors import UserError, error_line
from umbrella_ds.shards import ShardError, ShardWriter, build_index, open_dataset, write_index
from umbrella_ds.shards.v1 import V1Dataset, open_any

SHAPES = {"T1": (8, 8, 8), "rsfMRI": (4, 4, 4)}
FRAMES = [11, 5, 20, 9, 13]


def _write(
    out: Path, compression: str = "none", per_shard: int = 2, version: int = shards.FORMAT_VERSION
) -> dict[str, np.ndarray]:
    """Five subjects over three shards; subject 3 lacks rsfMRI. Returns the arrays written.

    ``version`` 1: written by the test-only v1 writer (the package writes v2 only)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    truth: dict[str, np.ndarray] = {}
    records = []
    writer = V1ShardWriter if version == 1 else ShardWriter
    for k in range(3):
        w = writer(out, k, SHAPES, compression, {"T1": {"size": [8, 8, 8]}}, f"job{k}")
        for pos in range(k * per_shard, min(5, (k + 1) * per_shard)):
            sid = f"S{pos}"
            vols = {"T1": rng.standard_normal(SHAPES["T1"]).astype(np.float16)}
            truth[f"{sid}/T1"] = vols["T1"]
            if pos != 3:
                vols["rsfMRI"] = rng.standard_normal((FRAMES[pos], *SHAPES["rsfMRI"])).astype(
                    np.float16
                )
                truth[f"{sid}/rsfMRI"] = vols["rsfMRI"]
            w.add_subject(
                sid, pos, {"sex": 1 + pos % 2, "age": 100 + pos}, vols, {"T1": {"source": "x"}}
            )
        if k == 2:
            w.add_rejection("S5", "T1", "/x.nii.gz", "missing file")
        records.append(w.close())
    kwargs = dict(shapes=SHAPES, preprocessing={"T1": {"size": [8, 8, 8]}},
                  compression=compression, subjects_per_shard=per_shard)  # fmt: skip
    if version == 1:
        write_v1_index(out, records, **kwargs)
    else:
        write_index(out, build_index(records, **kwargs))
    return truth


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path / "ds"
    return out, _write(out)


def test_reader_api(packed: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, truth = packed
    ds = open_dataset(out)
    assert ds.subjects == ["S0", "S1", "S2", "S3", "S4"]
    assert ds.modalities == ["T1", "rsfMRI"]
    assert ds.shape("T1") == (8, 8, 8) and ds.shape("rsfMRI") == (4, 4, 4)
    assert ds.has("S3", "T1") and not ds.has("S3", "rsfMRI") and not ds.has("nobody", "T1")
    assert ds.phenotypes("S4") == {"sex": 1, "age": 104}
    assert ds.preprocessing == {"T1": {"size": [8, 8, 8]}}
    assert [s["shard"] for s in ds.index["subjects"]] == [0, 0, 1, 1, 2]
    for sid in ds.subjects:
        t1 = ds.read(sid, "T1")
        assert t1.dtype == np.float16 and t1.shape == (8, 8, 8)
        np.testing.assert_array_equal(t1, truth[f"{sid}/T1"])
        if sid == "S3":
            continue
        n = ds.num_frames(sid)
        assert n == FRAMES[int(sid[1])]
        win = ds.read_window(sid, "rsfMRI", 1, n - 2)
        assert win.shape == (4, 4, 4, n - 2) and win.dtype == np.float16
        np.testing.assert_array_equal(win, np.moveaxis(truth[f"{sid}/rsfMRI"][1 : n - 1], 0, -1))
        np.testing.assert_array_equal(
            ds.read(sid, "rsfMRI"), np.moveaxis(truth[f"{sid}/rsfMRI"], 0, -1)
        )
    with pytest.raises(IndexError):
        ds.read_window("S0", "rsfMRI", 5, 7)
    with pytest.raises(KeyError, match="no rsfMRI"):
        ds.num_frames("S3")
    with pytest.raises(KeyError, match="unknown subject"):
        ds.read("nobody", "T1")
    ds.check()
    assert shards.verify(out) == []


def test_storage_layout_v1(tmp_path: Path) -> None:
    out = tmp_path / "v1"
    _write(out, version=1)
    with h5py.File(out / "shard-00000.h5") as f:
        t1, rs = f[shards.DS_T1], f[shards.DS_RS_FRAMES]
        assert t1.chunks == (1, 8, 8, 8) and t1.fletcher32 and t1.dtype == np.float16
        assert rs.chunks == (shards.FRAMES_PER_CHUNK, 4, 4, 4) and rs.fletcher32
        assert list(f[shards.DS_RS_OFFSETS][()]) == [0, 11, 16]
        assert "T1_xxh3" not in f


def test_storage_layout(packed: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    out, _ = packed
    _write(tmp_path / "z", "blosc-lz4")
    with h5py.File(out / "shard-00000.h5") as f:
        t1, rs = f[shards.DS_T1], f[shards.DS_RS_FRAMES]
        assert t1.chunks == (1, 8, 8, 8) and not t1.fletcher32 and t1.dtype == np.float16
        assert rs.chunks == (shards.FRAMES_PER_CHUNK, 4, 4, 4) and not rs.fletcher32
        assert list(f[shards.DS_RS_OFFSETS][()]) == [0, 11, 16]
        # v2: xxh3-64 (seed 0) over each chunk's stored bytes, cut into one slab per row when
        # the chunk is stored uncompressed (docs/FORMAT.md)
        for ds in (t1, rs):
            digests = f[ds.name + "_xxh3"]
            assert digests.dtype == np.dtype("<u8")
            n = -(-ds.shape[0] // ds.chunks[0])
            assert digests.shape == (n, ds.chunks[0])
            for k in range(n):
                raw = ds.id.read_direct_chunk((k * ds.chunks[0], 0, 0, 0))[1]
                slab = len(raw) // ds.chunks[0]
                for j in range(ds.chunks[0]):
                    piece = raw[j * slab : (j + 1) * slab]
                    assert int(digests[k, j]) == xxhash.xxh3_64_intdigest(piece, seed=0)
    with h5py.File(tmp_path / "z" / "shard-00000.h5") as f:  # compressed: one digest per chunk
        ds = f[shards.DS_RS_FRAMES]
        raw = ds.id.read_direct_chunk((0, 0, 0, 0))[1]
        assert f[ds.name + "_xxh3"].shape == (2, 1)
        assert int(f[ds.name + "_xxh3"][0, 0]) == xxhash.xxh3_64_intdigest(raw, seed=0)
    assert (out / "index.json").read_text().count(
        '"reason": "missing file"'
    ) == 0  # lives in rejected.csv
    assert open_dataset(out).index["num_rejections"] == 1


@pytest.mark.parametrize("compression", shards.COMPRESSIONS)
def test_writes_are_byte_identical_and_read_back(tmp_path: Path, compression: str) -> None:
    truth = _write(tmp_path / "a", compression)
    _write(tmp_path / "b", compression)
    for name in ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "index.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ds = open_dataset(tmp_path / "a")
    assert ds.fingerprint == open_dataset(tmp_path / "b").fingerprint
    np.testing.assert_array_equal(ds.read("S4", "T1"), truth["S4/T1"])
    window = ds.read_window("S2", "rsfMRI", 3, 6)
    np.testing.assert_array_equal(window, np.moveaxis(truth["S2/rsfMRI"][3:9], 0, -1))


def test_failed_shard_leaves_no_file(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 0, SHAPES, "none", {}, job="j")
    with pytest.raises(ValueError, match="shape"):
        w.add_subject("S0", 0, {}, {"T1": np.zeros((4, 4, 4), np.float16)}, {})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_check_catches_truncated_and_modified_shards(
    packed: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    out, _ = packed
    trunc = tmp_path / "trunc"
    shutil.copytree(out, trunc)
    p = trunc / "shard-00001.h5"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"shard-00001\.h5.*size"):
        open_dataset(trunc).check()
    mod = tmp_path / "mod"
    shutil.copytree(out, mod)
    p = mod / "shard-00002.h5"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00002\.h5.*stamp"):
        open_dataset(mod).check()
    (mod / "shard-00002.h5").unlink()
    with pytest.raises(ShardError, match=r"shard-00002\.h5: shard missing"):
        open_dataset(mod).check()
    assert any("shard-00002.h5" in p for p in shards.verify(mod))


def test_chunk_checksum_catches_chunk_damage_on_read(
    packed: tuple[Path, dict[str, np.ndarray]],
) -> None:
    out, _ = packed
    path = out / "shard-00001.h5"
    with h5py.File(path) as f:
        offset = f[shards.DS_T1].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 10)
        b = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    ds = open_dataset(out)
    ds.read("S2", "T1")  # the other chunk is intact
    with pytest.raises(ShardError, match=r"shard-00001\.h5"):
        ds.read("S3", "T1")


def _child_read(ds: shards.ShardDataset, q: mp.Queue) -> None:
    arr = ds.read("S4", "T1")
    q.put((len(ds._files), ds._pid == os.getpid(), arr.tobytes()))


@pytest.mark.timeout(60)
def test_files_open_lazily_and_reopen_after_fork(
    packed: tuple[Path, dict[str, np.ndarray]],
) -> None:
    out, truth = packed
    ds = open_dataset(out)
    assert ds._files == {}  # nothing opened by open_dataset
    ds.read("S4", "T1")
    assert set(ds._files) == {2}
    parent_handle = ds._files[2]
    for method in ("fork", "spawn"):
        q = mp.get_context(method).Queue()
        p = mp.get_context(method).Process(target=_child_read, args=(ds, q))
        p.start()
        n_files, pid_ok, data = q.get(timeout=50)
        p.join(50)
        assert p.exitcode == 0
        assert n_files == 1 and pid_ok
        assert data == truth["S4/T1"].tobytes()
    assert ds._files[2] is parent_handle and parent_handle.id.valid  # parent unaffected
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files == {}
    np.testing.assert_array_equal(clone.read("S0", "T1"), truth["S0/T1"])


def test_open_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"index\.json"):
        open_dataset(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "umbrella-shards", "format_version": 99}')
    with pytest.raises(ShardError, match="format version 99"):
        open_dataset(tmp_path)


def _flip_in_chunk(path: Path, name: str, k: int, at: int = 10) -> None:
    with h5py.File(path) as f:
        ds = f[name]
        offset = ds.id.get_chunk_info(k).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("compression", ["none", "blosc-zstd-bitshuffle", "gzip"])
def test_flipped_chunk_byte_named_on_read_and_by_verify(
    tmp_path: Path, version: int, compression: str
) -> None:
    out = tmp_path / "ds"
    truth = _write(out, compression, version=version)
    # shard 1 holds S2 (T1 row 0, frames 0..20) and S3 (T1 row 1, no rsfMRI)
    path = out / "shard-00001.h5"
    _flip_in_chunk(path, shards.DS_T1, 1)
    _flip_in_chunk(path, shards.DS_RS_FRAMES, 1, at=3)  # frames 8..16 of S2
    ds = open_any(out)  # v1: the upgrade reader
    np.testing.assert_array_equal(ds.read("S2", "T1"), truth["S2/T1"])  # other chunk intact
    with pytest.raises(shards.ShardCorruptError, match=r"shard-00001\.h5.*subject S3 T1"):
        ds.read("S3", "T1")
    np.testing.assert_array_equal(  # a window inside chunk 0 never touches the damage
        ds.read_window("S2", "rsfMRI", 1, 6), np.moveaxis(truth["S2/rsfMRI"][1:7], 0, -1)
    )
    with pytest.raises(shards.ShardCorruptError, match=r"subject S2 rsfMRI frames \d+\.\.14"):
        ds.read_window("S2", "rsfMRI", 4, 10)
    problems = shards.verify(out)
    assert any(f"{path}: {shards.CORRUPT} (sha256 mismatch)" in p for p in problems), problems
    assert any("T1 chunk 1, subject S3 T1" in p for p in problems), problems
    assert any("rsfMRI_frames chunk 1, subject S2 frames 8..16 rsfMRI" in p for p in problems)
    assert not any("shard-00000" in p or "shard-00002" in p for p in problems)


@pytest.mark.parametrize("compression", ["none", "lzf", "blosc-lz4", "blosc-zstd-bitshuffle"])
def test_v1_and_v2_read_back_equal_arrays(tmp_path: Path, compression: str) -> None:
    """v1 is read back by the upgrade reader (shards/v1.py), the only v1 reader left."""
    truth = _write(tmp_path / "v1", compression, version=1)
    _write(tmp_path / "v2", compression, version=2)
    a, b = open_any(tmp_path / "v1"), open_dataset(tmp_path / "v2")
    assert (a.format_version, b.format_version) == (1, 2)
    assert isinstance(a, V1Dataset) and type(open_any(tmp_path / "v2")) is shards.ShardDataset
    for sid in a.subjects:
        np.testing.assert_array_equal(a.read(sid, "T1"), b.read(sid, "T1"))
        np.testing.assert_array_equal(b.read(sid, "T1"), truth[f"{sid}/T1"])
        if a.has(sid, "rsfMRI"):
            n = a.num_frames(sid)
            for start, length in ((0, n), (3, min(9, n - 3)), (n - 1, 1)):
                np.testing.assert_array_equal(
                    a.read_window(sid, "rsfMRI", start, length),
                    b.read_window(sid, "rsfMRI", start, length),
                )
    assert shards.verify(tmp_path / "v1") == [] and shards.verify(tmp_path / "v2") == []


def test_upgrade_converts_v1_to_v2(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    truth = _write(out, "blosc", version=1)
    assert shards.upgrade(out) == {"path": str(out), "shards": 3, "resumed": False}
    ds = open_dataset(out)
    assert ds.format_version == 2 and ds.index["compressions"]["T1"] == "blosc"
    assert shards.verify(out) == [] and not (out / shards.UPGRADE_DIR).exists()
    ds.check()
    for key, arr in truth.items():
        sid, m = key.split("/")
        got = ds.read(sid, m)
        np.testing.assert_array_equal(got, arr if m == "T1" else np.moveaxis(arr, 0, -1))
    assert ds.index["subjects"] == open_dataset(out).index["subjects"]
    assert shards.upgrade(out)["shards"] == 0  # already current
    # recompress while upgrading; the result is byte-identical to a direct v2 write
    shards.upgrade(out, "none")
    _write(tmp_path / "direct", "none")
    for k in range(3):
        name = shards.shard_name(k)
        assert (out / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


def test_interrupted_upgrade_rolls_forward(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "ds"
    truth = _write(out, "none", version=1)
    calls = []

    def crash_after_first(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == out:  # the roll-forward, not a shard's own rename in the stage
            calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(OSError, match="power cut"):
        shards.upgrade(out)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(shards.UpgradeRequiredError, match="umbrella-pack upgrade"):
        open_dataset(out)  # the v1 index is still in place (it moves last): rerun the upgrade
    staged = (out / shards.UPGRADE_DIR / "index.json").read_bytes()
    assert shards.upgrade(out)["resumed"] is True
    ds = open_dataset(out)
    assert ds.format_version == 2 and shards.verify(out) == []
    np.testing.assert_array_equal(ds.read("S4", "T1"), truth["S4/T1"])
    # a crash after the index moved, before the stage was dropped: training still refuses
    (out / shards.UPGRADE_DIR).mkdir()
    (out / shards.UPGRADE_DIR / "index.json").write_bytes(staged)
    with pytest.raises(ShardError, match="interrupted `umbrella-pack upgrade`"):
        open_dataset(out).check()


def test_upgrade_refuses_a_damaged_v1_shard(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _write(out, "none", version=1)
    _flip_in_chunk(out / "shard-00002.h5", shards.DS_T1, 0)
    with pytest.raises(shards.ShardCorruptError, match=r"shard-00002\.h5.*nothing upgraded"):
        shards.upgrade(out)
    assert open_any(out).format_version == 1


def test_v1_refused_for_training_with_the_upgrade_command(tmp_path: Path) -> None:
    """The training reader reads v2 only: a v1 dataset is a user error (exit 2, one line) that
    names the directory, its version and the command that converts it; that command works."""
    out = tmp_path / "old pack"
    truth = _write(out, "none", version=1)
    with pytest.raises(shards.UpgradeRequiredError) as caught:
        open_dataset(out)
    assert isinstance(caught.value, UserError)
    line = error_line(caught.value)
    assert line == (
        f"error: {out}: shard format v1; training reads format v2 only. "
        f"Convert it once with: umbrella-pack upgrade '{out}'"
    )
    argv = shlex.split(line.split("Convert it once with: ")[1])  # the command, as a shell reads it
    assert argv[:2] == ["umbrella-pack", "upgrade"]
    assert pack_cli(argv[1:]) == 0
    np.testing.assert_array_equal(open_dataset(out).read("S1", "T1"), truth["S1/T1"])
