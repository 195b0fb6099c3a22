"""What every benchmark shares: the machine it ran on, medians, and one JSON result per benchmark.

Benchmarks measure and never assert. Figures that compare two paths are measured side by side in
one run, so the ratio holds for the machine named in the result even when absolute times drift.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count and GPU (if any): enough to know which figures are comparable."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        # Other work on the machine skews every figure: the 1-minute load average when written.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_result(
    name: str,
    config: dict[str, Any],
    figures: dict[str, Any],
    results_dir: Path = RESULTS_DIR,
    **extra: Any,
) -> Path:
    """Write <results_dir>/<name>.json (default benchmarks/results): name, machine, config,
    figures (units in the keys)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "machine": machine(), "config": config, "figures": figures, **extra}
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- multi-process runs

REPO = Path(__file__).resolve().parents[1]


def bench_env(**extra: str) -> dict[str, str]:
    """Environment of the processes a benchmark starts: CPU DeepSpeed, cached JIT builds,
    one intra-op thread per rank (ranks are processes already), no hub access."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deepspeed_cmd(script: Path | str, args: list[str], ranks: int) -> list[str]:
    """`deepspeed --num_gpus N` on a free port (with DS_ACCELERATOR=cpu: N CPU ranks), started
    as a module of this interpreter so it works wherever DeepSpeed is importable."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
        "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip


def run_logged(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> float:
    """Run `cmd` from the repository root with output to `log`; wall seconds. A failure raises
    naming the log and quoting its tail, so a broken run is never reported as a figure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=env or bench_env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{cmd[:4]}... timed out after {timeout:.0f} s; log: {log}") from exc
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(
            f"{' '.join(map(str, cmd[:6]))}... exited {proc.returncode}; log {log}:\n{tail}"
        )
    return time.perf_counter() - start


def synth_and_pack(
    root: Path,
    subjects: int,
    t1_source: tuple[int, int, int],
    t1_size: tuple[int, int, int],
    frames: int = 4,
    rsfmri_shape: tuple[int, int, int] = (24, 28, 24),
    rsfmri_size: tuple[int, int, int] | None = None,
    modalities: tuple[str, ...] = ("T1",),
    workers: int = 1,
) -> tuple[Path, Path]:
    """`umbrella-pack synth` + `build` into root/raw and root/shards (quietly); returns both."""
    import contextlib
    import io

    from data_prep.pack import BuildOptions, build
    from data_prep.synth import synth

    raw, shards = root / "raw", root / "shards"
    with contextlib.redirect_stdout(io.StringIO()):
        synth(raw, subjects, 0, tuple(t1_source), frames, tuple(rsfmri_shape))
        status = build(
            BuildOptions(
                manifest=raw / "manifest.csv",
                out=shards,
                modalities=list(modalities),
                sizes={"T1": tuple(t1_size), "rsfMRI": tuple(rsfmri_size or rsfmri_shape)},
                workers=workers,
                subjects_per_shard=max(1, -(-subjects // max(1, workers))),
                progress=False,
            )
        )
    if status != 0:
        raise RuntimeError(f"packing {raw} into {shards} exited {status}")
    return raw, shards


def repeat_tasks(src: Path, dst: Path, copies: int) -> int:
    """A JSONL with every task of `src` repeated `copies` times under distinct task ids, so a
    few (large) synthetic subjects still fill many optimizer steps per epoch."""
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    with open(dst, "w") as f:
        for k in range(copies):
            for line in lines:
                task = json.loads(line)
                task["task_id"] = f"{task['task_id']}_rep{k}"
                f.write(json.dumps(task) + "\n")
    return len(lines) * copies


def disk_write_mb_per_s(directory: Path, size_bytes: int, repeats: int = 3) -> float:
    """The disk's sequential write speed, the limit of any writer to `directory` (pack_bench):
    like `dd bs=8M conv=fsync`, a file of `size_bytes` written in 8 MiB blocks then fsync'd;
    median MB/s over `repeats`. The block is random so compressing filesystems gain nothing."""
    block = os.urandom(8 << 20)
    path = Path(directory) / ".disk_write_probe"
    rates = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            with open(path, "wb") as f:
                written = 0
                while written < size_bytes:
                    written += f.write(block[: min(len(block), size_bytes - written)])
                f.flush()
                os.fsync(f.fileno())
            rates.append(written / 1e6 / (time.perf_counter() - start))
            path.unlink()
    finally:
        path.unlink(missing_ok=True)
    return statistics.median(rates)


# ---------------------------------------------------------------- realistic shards, quickly


def realistic_images(
    subjects: int, t1_grid: tuple[int, int, int], rs_grid: tuple[int, int, int], frames: int
) -> list[dict[str, Any]]:
    """Normalised float16 images as packing stores them, from the synthetic phantoms: T1
    z-scored over the volume, rsfMRI (the realistic brain-in-background series) z-scored over
    its brain voxels with the background at -mean/std (`znorm_minback`). Made in memory, so
    read and compression benchmarks at the GPU shapes skip NIfTI writing and decoding."""
    import numpy as np

    from data_prep.synth import Subject, bold, phantom

    out = []
    for i in range(subjects):
        s = Subject(f"S{i:04d}", 1 + i % 2, 120, 0.0, False, False)
        rng = np.random.default_rng([7, i])
        t1 = phantom(s, t1_grid, rng).astype(np.float64)
        t1 = ((t1 - t1.mean()) / t1.std()).astype(np.float16)
        rs = bold(s, rs_grid, rng, frames)
        fg = rs[rs != 0]
        mean, std = float(fg.mean()), float(fg.std())
        rs -= mean
        rs /= std
        out.append({"id": s.key, "T1": t1, "rsfMRI": rs.astype(np.float16)})
    return out


def write_shards(
    out: Path,
    images: list[dict[str, Any]],
    compression: str | dict[str, str],
    per_shard: int,
    format_version: int | None = None,
) -> float:
    """`images` packed into `out` through ShardWriter (what `build` does after preprocessing);
    returns the seconds spent writing (compression included)."""
    from umbrella_ds import shards

    out.mkdir(parents=True, exist_ok=True)
    version = format_version or shards.FORMAT_VERSION
    writer: Any = shards.ShardWriter
    if version == 1:  # the package writes v2 only; v1 through the test-only writer
        from tests.helpers.v1_shards import V1ShardWriter

        writer = V1ShardWriter
    shapes = {"T1": images[0]["T1"].shape, "rsfMRI": images[0]["rsfMRI"].shape[1:]}
    records = []
    start = time.perf_counter()
    for k in range(0, len(images), per_shard):
        w = writer(out, k // per_shard, shapes, compression, {}, f"bench{k}")
        for pos, img in enumerate(images[k : k + per_shard], start=k):
            w.add_subject(img["id"], pos, {}, {"T1": img["T1"], "rsfMRI": img["rsfMRI"]}, {})
        records.append(w.close())
    seconds = time.perf_counter() - start
    index = shards.build_index(
        records,
        shapes=shapes,
        preprocessing={},
        compression=compression if isinstance(compression, str) else "per-modality",
        subjects_per_shard=per_shard,
        compressions=compression if isinstance(compression, dict) else None,
    )
    index["format_version"] = version
    shards.write_index(out, index)
    return seconds
