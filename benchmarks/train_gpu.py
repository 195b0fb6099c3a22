"""GPU training throughput inside the project's engine: llava-interleave-qwen-0.5b at its real shape.

`python -m benchmarks.train_gpu [--budget-s 600] [--only CASE ...]` (needs a CUDA GPU; on a
machine without one it says so and exits 0, writing nothing). Never run in CI. `--smoke` runs
the same plumbing on CPU with the `tiny` preset and three small cases (about a minute; the suite
does, in tests/cli/test_bench_train_gpu.py), so a GPU session is not spent finding a broken script.

One prepared script for a short GPU session: it packs its own data, then runs the cases of
`CASES` in order of importance, each as a separate 1-GPU run of the training engine
(`python -m umbrella_ds.train` under the deepspeed launcher, ZeRO-2 `ds_configs/zero2.json`, bf16,
random weights), and rewrites benchmarks/results/train_gpu.json after every case, so whatever the
session had time for is kept. A case that fails (e.g. out of memory) is recorded with the tail
of its log and the next one runs. Cases stop starting once `--budget-s` is spent.

Data: `umbrella-pack synth` + `build` on the GPU machine, only what the selected cases read: a
T1 cohort (sources 96^3, packed at 96^3 and at 90^3) and an rsfMRI cohort (96^3 x `--frames`),
tasks repeated under distinct ids so one epoch covers every measured step. The loader uses `--workers` worker processes per GPU.

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
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T1_216 = {"T1": {"size": [96, 96, 96], "patch": [16, 16, 16]}}
T1_729 = {"T1": {"size": [90, 90, 90], "patch": [10, 10, 10]}}
RS_1728 = {"rsfMRI": {"size": [96, 96, 96, 24], "patch": [16, 16, 16, 3]}}

# name, modalities, micro-batch, compile, checkpointing (vision, language), steps, warm-up steps
# excluded. Order = importance: a session that ends early keeps the first ones.
GPU_CASES: list[dict] = [
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
GPU_RATIOS = {
    "T1 216 blocks / eager (mb 64)": ("t1_216_blocks_mb64", "t1_216_eager_mb64"),
    "rsfMRI 1728 blocks / eager (mb 8)": ("rs_1728_blocks_mb8", "rs_1728_eager_mb8"),
    "T1 216 eager checkpointing on / off (mb 64)": ("t1_216_eager_mb64_ckpt", "t1_216_eager_mb64"),
    "T1 216 blocks checkpointing on / off (mb 64)": (
        "t1_216_blocks_mb64_ckpt",
        "t1_216_blocks_mb64",
    ),
    "T1 216 eager mb 64 / mb 16": ("t1_216_eager_mb64", "t1_216_eager_mb16"),
}

# The same plumbing on CPU with the tiny preset (`--smoke`): proves the script end to end before a
# GPU session is spent on it (tests/cli/test_bench_train_gpu.py). Its figures mean nothing.
T1_64 = {"T1": {"size": [32, 32, 32], "patch": [8, 8, 8]}}
RS_256 = {"rsfMRI": {"size": [32, 32, 32, 8], "patch": [8, 8, 8, 4]}}
SMOKE_CASES: list[dict] = [
    {"name": "t1_64_eager_mb4", "mods": T1_64, "mb": 4, "compile": "none", "ckpt": False, "steps": 5, "warmup": 2},
    {"name": "t1_64_eager_mb4_ckpt", "mods": T1_64, "mb": 4, "compile": "none", "ckpt": True, "steps": 5, "warmup": 2},
    {"name": "rs_256_eager_mb2", "mods": RS_256, "mb": 2, "compile": "none", "ckpt": False, "steps": 4, "warmup": 1},
]  # fmt: skip
SMOKE_RATIOS = {
    "T1 64 eager checkpointing on / off (mb 4)": ("t1_64_eager_mb4_ckpt", "t1_64_eager_mb4")
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one invocation measures, and where: the preset, its cases, the ratios between them."""

    preset: str
    cases: list[dict]
    ratios: dict[str, tuple[str, str]]
    accelerator: str  # DS_ACCELERATOR of the runs
    result: str  # <results-dir>/<result>.json
    t1_subjects: int
    rs_subjects: int
    frames: int  # rsfMRI frames per synthetic subject (windows are cut from them)
    workers: int  # loader worker processes per GPU


GPU = Workload(
    preset="llava-interleave-qwen-0.5b", cases=GPU_CASES, ratios=GPU_RATIOS, accelerator="cuda",
    result="train_gpu", t1_subjects=24, rs_subjects=6, frames=32, workers=6,
)  # fmt: skip
SMOKE = Workload(
    preset="tiny", cases=SMOKE_CASES, ratios=SMOKE_RATIOS, accelerator="cpu",
    result="train_gpu_smoke", t1_subjects=8, rs_subjects=4, frames=12, workers=1,
)  # fmt: skip


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------- per-rank wrapper


def rank_main(memory_out: Path, engine_args: list[str]) -> int:
    """The engine's CLI, then this rank's peak GPU memory as PyTorch's allocator saw it. With
    UMBRELLA_BENCH_PROFILE=PATH:SKIP:ACTIVE, rank 0 also traces ACTIVE steps after SKIP ones
    with torch.profiler and writes their table to PATH (`profile_engine`)."""
    import torch

    from umbrella_ds.train.cli import main as train_main

    profiler = None
    spec = os.environ.get("UMBRELLA_BENCH_PROFILE")
    if spec and int(os.environ.get("RANK", "0")) == 0:
        path, skip, active = spec.rsplit(":", 2)
        profiler = profile_engine(Path(path), int(skip), int(active))
    try:
        status = train_main(engine_args)
    finally:
        if profiler is not None:
            profiler.stop()
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


# ---------------------------------------------------------------- profile (device check step 6)

PROFILE_TOP = 15
PROFILE_RANGES = ("patch_embed", "projector")


def _mark(module, name: str, backward: bool = True) -> None:
    """Profiler ranges around a module's forward and, with ``backward``, its backward (module
    hooks: opens when the gradient of its output arrives, closes when its inputs' is done; a
    module whose inputs need no gradient, the patch embedding's, would get an empty range)."""
    from torch.autograd.profiler import record_function

    def opener(label: str):
        def hook(*_):
            rf = record_function(label)
            rf.__enter__()
            open_ranges.setdefault(label, []).append(rf)

        return hook

    def closer(label: str):
        def hook(*_):
            stack = open_ranges.get(label)
            if stack:
                stack.pop().__exit__(None, None, None)

        return hook

    open_ranges: dict[str, list] = {}
    module.register_forward_pre_hook(opener(f"{name}.forward"))
    module.register_forward_hook(closer(f"{name}.forward"))
    if backward:
        module.register_full_backward_pre_hook(opener(f"{name}.backward"))
        module.register_full_backward_hook(closer(f"{name}.backward"))


def profile_table(prof, cuda: bool) -> dict:
    """The trace reduced: top operators by device time (CPU time without a GPU), the shares of
    the marked ranges and of host-to-device copies in the traced steps' total."""
    events = prof.key_averages()

    def self_time(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", 0.0))
        return float(e.self_cpu_time_total)

    def total_time(e) -> float:
        if cuda:
            return float(getattr(e, "device_time_total", 0.0))
        return float(e.cpu_time_total)

    ops = [
        e
        for e in events  # operators: not our ranges, not the profiler's own per-step range
        if not any(e.key.startswith(r) for r in (*PROFILE_RANGES, "ProfilerStep"))
    ]
    total = sum(self_time(e) for e in ops) or 1.0
    top = sorted(ops, key=self_time, reverse=True)[:PROFILE_TOP]
    clock = "CUDA" if cuda else "CPU"
    shares = {
        e.key: total_time(e) / total
        for e in events
        if any(e.key.startswith(r) for r in PROFILE_RANGES)
    }
    # The patch embedding's backward: its input needs no gradient, so no module hook brackets it;
    # in the T1 cases its Conv3d is the model's only convolution.
    conv_bwd = [e for e in ops if e.key == "aten::convolution_backward"]
    if conv_bwd:
        shares["patch_embed.backward (aten::convolution_backward)"] = (
            sum(total_time(e) for e in conv_bwd) / total
        )
    h2d = sum(self_time(e) for e in ops if "HtoD" in e.key or "Memcpy H2D" in e.key)
    rows = [f"top {PROFILE_TOP} operators by self {clock} time ({total / 1e3:.1f} ms traced)"]
    rows.append(f"{'operator':<60} {'self ms':>10} {'share':>7} {'calls':>7}")
    for e in top:
        rows.append(
            f"{e.key[:60]:<60} {self_time(e) / 1e3:>10.2f} {self_time(e) / total:>7.1%} "
            f"{e.count:>7}"
        )
    rows.append("")
    for key, share in sorted(shares.items()):
        rows.append(f"{key:<60} {share:>7.1%} of the traced {clock} time")
    rows.append(
        f"{'host-to-device copies':<60} "
        + (f"{h2d / total:>7.1%}" if cuda else "    n/a (no device)")
    )
    return {
        "clock": clock,
        "traced_ms": total / 1e3,
        "top": [
            {
                "op": e.key,
                "self_ms": self_time(e) / 1e3,
                "share": self_time(e) / total,
                "calls": e.count,
            }
            for e in top
        ],
        "range_shares": shares,
        "h2d_share": h2d / total if cuda else None,
        "table": "\n".join(rows),
    }


def profile_engine(out: Path, skip: int, active: int):
    """Wrap the engine: mark the patch embedding and projector once built, trace ACTIVE steps
    after SKIP + 1 (one profiler warm-up step), write ``profile_table`` as JSON to ``out``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from umbrella_ds.model import find_patch_embed, projector
    from umbrella_ds.train import engine

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def ready(p) -> None:
        out.write_text(json.dumps(profile_table(p, cuda)))

    prof = profile(
        activities=activities,
        schedule=schedule(wait=max(0, skip - 1), warmup=1, active=active, repeat=1),
        on_trace_ready=ready,
    )
    build, step = engine.build, engine._Steps.step

    def traced_build(*args, **kwargs):
        state = build(*args, **kwargs)
        _mark(find_patch_embed(state.model), "patch_embed", backward=False)
        _mark(projector(state.model), "projector")
        prof.start()
        return state

    def traced_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        prof.step()
        return result

    engine.build = traced_build
    engine._Steps.step = traced_step
    return prof


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


def data_needs(cases: list[dict]) -> dict[str, list[tuple[int, ...]]]:
    """Input grids the cases read, per modality, in first-use order: only these are packed."""
    needs: dict[str, list[tuple[int, ...]]] = {}
    for case in cases:
        for modality, spec in case["mods"].items():
            sizes = needs.setdefault(modality, [])
            if tuple(spec["size"]) not in sizes:
                sizes.append(tuple(spec["size"]))
    return needs


@dataclasses.dataclass
class Data:
    raw: dict[str, Path]  # modality -> synthetic cohort (manifest, instruction files)
    shards: dict[tuple[str, tuple[int, ...]], Path]  # (modality, input grid) -> packed shards


def prepare_data(root: Path, cases: list[dict], work: Workload) -> Data:
    """Synthesise and pack what the cases read: T1 at its largest grid, then packed again at
    each other grid; one rsfMRI cohort at its spatial grid (windows are cut at read time)."""
    from benchmarks.common import synth_and_pack
    from data_prep.pack import BuildOptions, build

    needs = data_needs(cases)
    unknown = set(needs) - {"T1", "rsfMRI"}
    if unknown:
        raise ValueError(f"train_gpu: no synthetic data for modalities {sorted(unknown)}")
    data = Data(raw={}, shards={})
    if "T1" in needs:
        sizes = needs["T1"]
        source = tuple(max(size[i] for size in sizes) for i in range(3))
        data.raw["T1"], first = synth_and_pack(
            root / "t1", work.t1_subjects, source, sizes[0], workers=work.workers
        )
        data.shards[("T1", sizes[0])] = first
        for size in sizes[1:]:
            out = root / "t1" / f"shards{'x'.join(map(str, size))}"
            status = build(
                BuildOptions(
                    manifest=data.raw["T1"] / "manifest.csv", out=out, modalities=["T1"],
                    sizes={"T1": size}, workers=work.workers, progress=False,
                )
            )  # fmt: skip
            if status != 0:
                raise RuntimeError(f"packing the {size} T1 shards into {out} exited {status}")
            data.shards[("T1", size)] = out
    if "rsfMRI" in needs:
        grids = {size[:3] for size in needs["rsfMRI"]}
        if len(grids) != 1:
            raise ValueError(f"train_gpu: one rsfMRI spatial grid per run, cases ask for {grids}")
        (grid,) = grids
        frames = max(work.frames, *(size[3] for size in needs["rsfMRI"]))
        data.raw["rsfMRI"], shards = synth_and_pack(
            root / "rs", work.rs_subjects, (40, 48, 40), (32, 32, 32), frames=frames,
            rsfmri_shape=grid, rsfmri_size=grid, modalities=("rsfMRI",), workers=work.workers,
        )  # fmt: skip
        for size in needs["rsfMRI"]:
            data.shards[("rsfMRI", size)] = shards
    return data


def case_config(case: dict, data: Data, model: Path, root: Path, workers: int) -> Path:
    """The run YAML of one case (JSON is YAML)."""
    from benchmarks.common import repeat_tasks

    ((modality, spec),) = case["mods"].items()
    raw = data.raw[modality]
    src = (
        raw
        / "instructions"
        / ("t1_sex_train.jsonl" if modality == "T1" else "rsfmri_sex_train.jsonl")
    )
    n_src = sum(1 for line in src.read_text().splitlines() if line.strip())
    need = case["mb"] * (case["steps"] + 2)
    tasks = root / f"{case['name']}.jsonl"
    repeat_tasks(src, tasks, -(-need // n_src))
    shards = data.shards[(modality, tuple(spec["size"]))]
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


def run_case(
    case: dict,
    config: Path,
    root: Path,
    accelerator: str = "cuda",
    extra_env: dict[str, str] | None = None,
) -> dict:
    from benchmarks.common import bench_env, deepspeed_cmd, run_logged

    memory = root / f"{case['name']}.memory.json"
    args = ["--rank-wrapper", str(memory), "--config", str(config), "--resume", "none"]
    args += ["--set", f"train.device={accelerator}"]  # asked for, never inferred (env.py)
    env = bench_env(DS_ACCELERATOR=accelerator, **(extra_env or {}))
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
        if r.get("split") == "train"
        and case["warmup"] < r["step"] <= case.get("measure_to", case["steps"])
        and not r["skipped"]
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


def _ratios(results: dict[str, dict], pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    def sps(name: str) -> float | None:
        r = results.get(name, {})
        return r.get("samples_per_s") if r.get("status") == "ok" else None

    out = {}
    for label, (a, b) in pairs.items():
        rate_a, rate_b = sps(a), sps(b)
        if rate_a and rate_b:
            out[label] = rate_a / rate_b
    return out


def run_config(work: Workload, cases: list[dict]) -> dict:
    """What a result file says was run: preset, engine, DeepSpeed config, the cases' settings."""
    return {
        "preset": work.preset,
        "weights": "random",
        "engine": f"python -m umbrella_ds.train, deepspeed launcher, 1 rank ({work.accelerator})",
        "deepspeed": "ds_configs/zero2.json, bf16",
        "tokenizer": "tiny ChatML tokenizer; image_token_index set to its <image> id",
        "loader_workers": work.workers,
        "cases": {c["name"]: {k: v for k, v in c.items() if k != "name"} for c in cases},
        "rates": "medians over the steps after each case's warm-up",
        "mfu": "engine formula (umbrella_ds/train/run_logging.py), peak 989 TFLOP/s bf16 dense",
    }


def write_results(
    work: Workload, results: dict[str, dict], results_dir: Path, config: dict
) -> Path:
    """<results_dir>/<work.result>.json: figures and ratios of the cases in ``results``."""
    from benchmarks.common import write_result

    return write_result(
        work.result, config, _figures(results), results_dir=results_dir,
        ratio=_ratios(results, work.ratios), cases=results,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The per-rank program the deepspeed launcher starts (it adds --local_rank=N first).
    rest = [x for x in argv if not x.startswith("--local_rank")]
    if rest and rest[0] == "--rank-wrapper":
        return rank_main(Path(rest[1]), rest[2:])

    from benchmarks.common import RESULTS_DIR

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--budget-s", type=float, default=600.0, help="start no case after this many seconds"
    )
    p.add_argument("--only", nargs="*", help="case names (default: all, in order)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny preset's cases on CPU: checks the script, measures nothing that matters",
    )
    p.add_argument("--workers", type=int, default=None, help="loader worker processes")
    p.add_argument("--t1-subjects", type=int, default=None)
    p.add_argument("--rs-subjects", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    a = p.parse_args(argv)
    base = SMOKE if a.smoke else GPU
    overrides = {
        "workers": a.workers, "t1_subjects": a.t1_subjects, "rs_subjects": a.rs_subjects,
        "frames": a.frames,
    }  # fmt: skip
    work = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if a.list:
        for c in work.cases:
            print(c["name"], json.dumps({k: v for k, v in c.items() if k != "name"}))
        return 0
    known = [c["name"] for c in work.cases]
    unknown = sorted(set(a.only or ()) - set(known))
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {known}")
    if work.accelerator == "cuda" and not _has_gpu():
        print("train_gpu: needs a CUDA GPU (none visible here); nothing measured, nothing written")
        return 0

    start = time.perf_counter()
    cases = [c for c in work.cases if not a.only or c["name"] in a.only]
    results: dict[str, dict] = {}
    config = run_config(work, cases)

    def save() -> Path:
        """Rewritten after every case, so a session that ends early keeps what it measured."""
        return write_results(work, results, a.results_dir, config)

    with tempfile.TemporaryDirectory(prefix="train_gpu_", dir=a.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = prepare_data(root, cases, work)
        model = model_dir(root, work.preset)
        config["data_prep_s"] = time.perf_counter() - t0
        print(f"data and model directory ready in {config['data_prep_s']:.0f} s", flush=True)
        for case in cases:
            if time.perf_counter() - start > a.budget_s:
                results[case["name"]] = {"status": "not run (budget spent)"}
                continue
            cfg_path = case_config(case, data, model, root, work.workers)
            print(f"== {case['name']}", flush=True)
            results[case["name"]] = r = run_case(case, cfg_path, root, work.accelerator)
            print(json.dumps(r)[:600], flush=True)
            save()
    path = save()  # also records the cases the budget left out
    print(f"train_gpu finished in {time.perf_counter() - start:.0f} s; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
