"""GPU training throughput inside the project's engine: llava-interleave-qwen-0.5b at its real shape.

`python -m benchmarks.train_gpu [--budget-s 600] [--only CASE ...]` (needs a CUDA GPU; on a
machine without one it says so and exits 0, writing nothing). Never run in CI.

One prepared script for a short GPU session: it packs its own data, then runs the cases of
`CASES` in order of importance, each as a separate 1-GPU run of the training engine
(`python -m umbrella_ds.train` under the deepspeed launcher, ZeRO-2 `ds_configs/zero2.json`, bf16,
random weights), and rewrites benchmarks/results/train_gpu.json after every case, so whatever the
session had time for is kept. A case that fails (e.g. out of memory) is recorded with the tail
of its log and the next one runs. Cases stop starting once `--budget-s` is spent.

Data: `umbrella-pack synth` + `build` on the GPU machine: a T1 cohort (sources 96^3, packed at
96^3 and at 90^3) and an rsfMRI cohort (96^3 x `--frames`), tasks repeated under distinct ids so
one epoch covers every measured step. The loader uses `--workers` worker processes per GPU.

Model: the preset's LlavaConfig (SigLIP 26 layers + Qwen1.5-0.5B, vocabulary 152000, 0.86B
parameters) written to a local model directory with the project's tiny ChatML tokenizer; the
config's `image_token_index` is set to that tokenizer's `<image>` id (a row of the same
152000-row embedding), which changes no shape or FLOP. Text token counts therefore come from the
tiny tokenizer (about 40 text tokens per T1 sample, as with Qwen's).

Per case, from the engine's metrics.jsonl, medians over the steps after `warmup` (compile
warm-up excluded): samples/s, tokens/s, MFU (the engine's documented formula,
`umbrella_ds/train/run_logging.py`; H100 SXM bf16 dense peak 989 TFLOP/s), data-wait share;
and the peak GPU memory allocated / reserved by PyTorch on the rank (read by this file's rank
wrapper after the engine returns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESET = "llava-interleave-qwen-0.5b"
T1_216 = {"T1": {"size": [96, 96, 96], "patch": [16, 16, 16]}}
T1_729 = {"T1": {"size": [90, 90, 90], "patch": [10, 10, 10]}}
RS_1728 = {"rsfMRI": {"size": [96, 96, 96, 24], "patch": [16, 16, 16, 3]}}

# name, modalities, micro-batch, compile, checkpointing (vision, language), steps, warm-up steps
# excluded. Order = importance: a session that ends early keeps the first ones.
CASES: list[dict] = [
    {"name": "t1_216_eager_mb64", "mods": T1_216, "mb": 64, "compile": "none", "ckpt": False, "steps": 25, "warmup": 5},
    {"name": "t1_216_blocks_mb64", "mods": T1_216, "mb": 64, "compile": "blocks", "ckpt": False, "steps": 30, "warmup": 10},
    {"name": "rs_1728_blocks_mb8", "mods": RS_1728, "mb": 8, "compile": "blocks", "ckpt": False, "steps": 30, "warmup": 10},
    {"name": "t1_216_blocks_mb128", "mods": T1_216, "mb": 128, "compile": "blocks", "ckpt": False, "steps": 25, "warmup": 8},
    {"name": "t1_216_eager_mb64_ckpt", "mods": T1_216, "mb": 64, "compile": "none", "ckpt": True, "steps": 20, "warmup": 5},
    {"name": "rs_1728_eager_mb8", "mods": RS_1728, "mb": 8, "compile": "none", "ckpt": False, "steps": 20, "warmup": 5},
    {"name": "t1_729_blocks_mb32", "mods": T1_729, "mb": 32, "compile": "blocks", "ckpt": False, "steps": 25, "warmup": 10},
    {"name": "t1_216_blocks_mb64_ckpt", "mods": T1_216, "mb": 64, "compile": "blocks", "ckpt": True, "steps": 25, "warmup": 10},
    {"name": "rs_1728_blocks_mb16_ckpt", "mods": RS_1728, "mb": 16, "compile": "blocks", "ckpt": True, "steps": 25, "warmup": 10},
    {"name": "t1_216_eager_mb16", "mods": T1_216, "mb": 16, "compile": "none", "ckpt": False, "steps": 20, "warmup": 5},
]  # fmt: skip
RESULT = "train_gpu"


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------- per-rank wrapper


def rank_main(memory_out: Path, engine_args: list[str]) -> int:
    """The engine's CLI, then this rank's peak GPU memory as PyTorch's allocator saw it."""
    import torch

    from umbrella_ds.train.cli import main as train_main

    status = train_main(engine_args)
    if torch.cuda.is_available() and int(os.environ.get("RANK", "0")) == 0:
        memory_out.write_text(
            json.dumps(
                {
                    "max_allocated_GiB": torch.cuda.max_memory_allocated() / 2**30,
                    "max_reserved_GiB": torch.cuda.max_memory_reserved() / 2**30,
                    "device": torch.cuda.get_device_name(),
                }
            )
        )
    return status


# ---------------------------------------------------------------- preparation


def model_dir(root: Path, preset: str) -> Path:
    """The preset's config + the tiny ChatML tokenizer, placeholder id aligned (module docstring)."""
    import shutil

    from transformers import AutoTokenizer

    from umbrella_ds.model import TINY_TOKENIZER_DIR, get_preset

    out = root / f"model-{preset}"
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    config = get_preset(preset).make_config()
    config.image_token_index = int(tok.convert_tokens_to_ids("<image>"))
    if hasattr(config, "image_token_id"):
        config.image_token_id = config.image_token_index
    config.save_pretrained(str(out))
    for f in TINY_TOKENIZER_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def prepare_data(
    root: Path, t1_subjects: int, rs_subjects: int, frames: int, workers: int
) -> dict[str, Path]:
    """Synthesise and pack the cohorts; returns shard folders and instruction files by key."""
    from benchmarks.common import synth_and_pack

    t1_raw, t1_96 = synth_and_pack(
        root / "t1", t1_subjects, (96, 96, 96), (96, 96, 96), workers=workers
    )
    from data_prep.pack import BuildOptions, build

    status = build(
        BuildOptions(
            manifest=t1_raw / "manifest.csv", out=root / "t1" / "shards90", modalities=["T1"],
            t1_size=(90, 90, 90), workers=workers, progress=False,
        )
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"packing the 90^3 T1 shards exited {status}")
    rs_raw, rs_shards = synth_and_pack(
        root / "rs", rs_subjects, (40, 48, 40), (32, 32, 32), frames=frames,
        rsfmri_shape=(96, 96, 96), rsfmri_size=(96, 96, 96), modalities=("rsfMRI",), workers=workers,
    )  # fmt: skip
    return {
        "t1_raw": t1_raw, "t1_96": t1_96, "t1_90": root / "t1" / "shards90",
        "rs_raw": rs_raw, "rs": rs_shards,
    }  # fmt: skip


def case_config(case: dict, data: dict[str, Path], model: Path, root: Path, workers: int) -> Path:
    """The run YAML of one case (JSON is YAML)."""
    from benchmarks.common import repeat_tasks

    rs = "rsfMRI" in case["mods"]
    raw = data["rs_raw" if rs else "t1_raw"]
    src = raw / "instructions" / ("rsfmri_sex_train.jsonl" if rs else "t1_sex_train.jsonl")
    n_src = sum(1 for line in src.read_text().splitlines() if line.strip())
    need = case["mb"] * (case["steps"] + 2)
    tasks = root / f"{case['name']}.jsonl"
    repeat_tasks(src, tasks, -(-need // n_src))
    shards = data["rs"] if rs else data["t1_90" if case["mods"] is T1_729 else "t1_96"]
    cfg = {
        "output_dir": str(root / case["name"]),
        "data": {
            "shards": str(shards), "train": [str(tasks)], "eval": [], "max_length": 2048,
            "num_workers": workers, "prefetch_factor": 4, "flip": True,
        },
        "model": {
            "preset": None, "path": str(model), "init": "random", "modalities": case["mods"],
            "checkpointing": {"vision": case["ckpt"], "language": case["ckpt"]},
        },
        "train": {
            "max_steps": case["steps"], "global_batch": case["mb"], "micro_batch": case["mb"],
            "lr": 1e-4, "warmup_steps": 0, "deepspeed": "zero2", "bf16": True, "compile": case["compile"],
        },
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "eval": {"every_steps": 0, "at_end": False},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }  # fmt: skip
    path = root / f"{case['name']}.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    return path


# ---------------------------------------------------------------- one case


def run_case(case: dict, config: Path, root: Path, accelerator: str = "cuda") -> dict:
    from benchmarks.common import bench_env, deepspeed_cmd, run_logged

    memory = root / f"{case['name']}.memory.json"
    args = ["--rank-wrapper", str(memory), "--config", str(config), "--resume", "none"]
    env = bench_env(DS_ACCELERATOR=accelerator)
    env.pop("OMP_NUM_THREADS", None)
    log = root / f"{case['name']}.log"
    t0 = time.perf_counter()
    try:
        run_logged(deepspeed_cmd(Path(__file__).resolve(), args, 1), log, timeout=900, env=env)
    except RuntimeError as exc:
        return {"status": "failed", "error": str(exc)[-3000:], "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    metrics = Path(json.loads(config.read_text())["output_dir"]) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [
        r
        for r in records
        if r.get("split") == "train" and r["step"] > case["warmup"] and not r["skipped"]
    ]
    if not train:
        return {
            "status": "failed",
            "error": f"no train records after step {case['warmup']} in {metrics}",
            "wall_s": wall,
        }

    def med(key: str) -> float | None:
        vals = [r[key] for r in train if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    out = {
        "status": "ok",
        "samples_per_s": med("samples_per_s"),
        "tokens_per_s": med("tokens_per_s"),
        "mfu": med("mfu"),
        "hfu": med("hfu"),
        "data_wait_frac": med("data_wait_frac"),
        "steps_measured": len(train),
        "first_step_s": None,
        "wall_s": wall,
    }
    first = [r for r in records if r.get("split") == "train" and r["step"] == 1]
    if first and first[0].get("samples_per_s"):
        out["first_step_s"] = case["mb"] / first[0]["samples_per_s"]  # compile warm-up shows here
    if memory.is_file():
        out.update(json.loads(memory.read_text()))
    return out


# ---------------------------------------------------------------- driver


def _figures(results: dict[str, dict]) -> dict[str, float | str]:
    figures: dict[str, float | str] = {}
    for name, r in results.items():
        if r.get("status") != "ok":
            figures[f"{name} status"] = "failed"
            continue
        figures[f"{name} samples/s"] = r["samples_per_s"]
        figures[f"{name} tokens/s"] = r["tokens_per_s"]
        if r.get("mfu") is not None:
            figures[f"{name} MFU"] = r["mfu"]
        figures[f"{name} data-wait share"] = r["data_wait_frac"]
        if "max_allocated_GiB" in r:
            figures[f"{name} peak GiB allocated"] = r["max_allocated_GiB"]
    return figures


def _ratios(results: dict[str, dict]) -> dict[str, float]:
    def sps(name: str) -> float | None:
        r = results.get(name, {})
        return r.get("samples_per_s") if r.get("status") == "ok" else None

    pairs = {
        "T1 216 blocks / eager (mb 64)": ("t1_216_blocks_mb64", "t1_216_eager_mb64"),
        "rsfMRI 1728 blocks / eager (mb 8)": ("rs_1728_blocks_mb8", "rs_1728_eager_mb8"),
        "T1 216 eager checkpointing on / off (mb 64)": (
            "t1_216_eager_mb64_ckpt",
            "t1_216_eager_mb64",
        ),
        "T1 216 blocks checkpointing on / off (mb 64)": (
            "t1_216_blocks_mb64_ckpt",
            "t1_216_blocks_mb64",
        ),
        "T1 216 eager mb 64 / mb 16": ("t1_216_eager_mb64", "t1_216_eager_mb16"),
    }
    out = {}
    for label, (a, b) in pairs.items():
        if sps(a) and sps(b):
            out[label] = sps(a) / sps(b)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The per-rank program the deepspeed launcher starts (it adds --local_rank=N first).
    rest = [x for x in argv if not x.startswith("--local_rank")]
    if rest and rest[0] == "--rank-wrapper":
        return rank_main(Path(rest[1]), rest[2:])

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--budget-s", type=float, default=600.0, help="start no case after this many seconds"
    )
    p.add_argument("--only", nargs="*", help="case names (default: all, in order)")
    p.add_argument("--workers", type=int, default=6, help="loader worker processes")
    p.add_argument("--t1-subjects", type=int, default=24)
    p.add_argument("--rs-subjects", type=int, default=6)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    a = p.parse_args(argv)
    if a.list:
        for c in CASES:
            print(c["name"], json.dumps({k: v for k, v in c.items() if k != "name"}))
        return 0
    if not _has_gpu():
        print("train_gpu: needs a CUDA GPU (none visible here); nothing measured, nothing written")
        return 0

    from benchmarks.common import write_result

    start = time.perf_counter()
    cases = [c for c in CASES if not a.only or c["name"] in a.only]
    results: dict[str, dict] = {}
    config = {
        "preset": PRESET,
        "weights": "random",
        "engine": "python -m umbrella_ds.train, deepspeed launcher, 1 GPU",
        "deepspeed": "ds_configs/zero2.json, bf16",
        "tokenizer": "tiny ChatML tokenizer; image_token_index set to its <image> id",
        "loader_workers": a.workers,
        "cases": {c["name"]: {k: v for k, v in c.items() if k != "name"} for c in cases},
        "rates": "medians over the steps after each case's warm-up",
        "mfu": "engine formula (umbrella_ds/train/run_logging.py), peak 989 TFLOP/s bf16 dense",
    }
    with tempfile.TemporaryDirectory(prefix="train_gpu_", dir=a.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = prepare_data(root, a.t1_subjects, a.rs_subjects, a.frames, a.workers)
        model = model_dir(root, PRESET)
        config["data_prep_s"] = time.perf_counter() - t0
        print(f"data and model directory ready in {config['data_prep_s']:.0f} s", flush=True)
        for case in cases:
            if time.perf_counter() - start > a.budget_s:
                results[case["name"]] = {"status": "not run (budget spent)"}
                continue
            cfg_path = case_config(case, data, model, root, a.workers)
            print(f"== {case['name']}", flush=True)
            results[case["name"]] = r = run_case(case, cfg_path, root)
            print(json.dumps(r)[:600], flush=True)
            write_result(RESULT, config, _figures(results), ratio=_ratios(results), cases=results)
    print(f"train_gpu finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
