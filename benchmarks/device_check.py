"""The device check: what a lent GPU must show, in two halves of at most 5 minutes each.

`python -m benchmarks.device_check correctness|throughput --out DIR [--dry-run]`, normally run
by `benchmarks/device_check.sh`, which installs the carried wheels first. Each half is
independent (its own data, its own temporary folder), so a device session of about 15 minutes
can run both, and one of them again. After every step the half's record is rewritten to
DIR/<half>.json, so a session that ends early keeps every finished step.

correctness (1 rank, NCCL, the `tiny` preset on its synthetic cohort):
  1. engine_1rank: a 6-step run, and the same run as 3 steps + a resume to 6 (constant LR, so the
     trajectories are the same): both finish, the resume starts from step 3, the losses after it
     are compared with the uninterrupted run's (a GPU is not bitwise reproducible: the figure is
     the tolerance that holds there); then `umbrella-eval --checkpoint` of the resumed run
     against its in-training evaluation.
  2. zero3_compiled_export: ZeRO-3, `train.compile=blocks`, activation checkpointing in both
     towers, then `umbrella-export` of its checkpoint; its base (built under zero.Init on the
     device) must hash as step 1's whole build does.
throughput (llava-interleave-qwen-0.5b shape, random weights, bf16, benchmarks/train_gpu.py's
cases and plumbing; results also in benchmarks/results/train_gpu.json):
  3. t1_eager_vs_compiled: T1 at 216 tokens, micro-batch 64, eager and `compile=blocks`, with the
     compiled run's recompile count (TORCH_LOGS=recompiles).
  4. rsfmri_compiled: rsfMRI at 1728 tokens, micro-batch 8, compiled.
  5. finder_and_patch_embed: `umbrella-train --find-micro-batch` on the T1 case's config, and the
     T1 patch embedding as Conv3d against reshape + Linear (forward + backward, bf16).
  6. profile: a torch.profiler trace of 5 steps of the eager T1 micro-batch-64 case (step 3's
     run, after the steps its rates come from), reduced to a table (DIR/profile.txt): top 15 operators by CUDA time (CPU time on a CPU), the patch
     embedding's, projector's and host-to-device copies' shares; the data wait is the run's
     `data_wait_frac`.

`--dry-run` runs every step on the CPU at tiny sizes (gloo instead of NCCL; no compilation:
inductor on a CPU costs minutes, and tests/equivalence/test_comparisons.py covers compiled blocks inside
the engine; step 4's rsfMRI case is train_gpu.py --smoke's), so a GPU session is not spent
finding a broken script
(tests/cli/test_device_check.py). Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import train_gpu
from benchmarks.common import REPO, bench_env, deepspeed_cmd, run_logged

HALF_BUDGET_S = 290.0  # a step starts only while the half has spent less than this
TRAIN_SCRIPT = REPO / "umbrella_ds" / "train" / "__main__.py"
RECOMPILE = re.compile(r"Recompiling function")


@dataclasses.dataclass
class Check:
    """One half's run: where it writes, what it has found so far."""

    half: str
    out: Path
    work: Path
    dry: bool
    started: float = dataclasses.field(default_factory=time.perf_counter)
    record: dict = dataclasses.field(default_factory=dict)

    @property
    def accelerator(self) -> str:
        return "cpu" if self.dry else "cuda"

    def env(self, **extra: str) -> dict[str, str]:
        env = bench_env(DS_ACCELERATOR=self.accelerator, **extra)
        if not self.dry:
            env.pop("OMP_NUM_THREADS", None)  # one rank per GPU: let it use the host's cores
        return env

    def save(self) -> None:
        path = self.out / f"{self.half}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(path)


# ---------------------------------------------------------------- correctness (steps 1-2)


def tiny_data(check: Check) -> Path:
    """A small T1 cohort (the tests' kind), packed at 32^3."""
    from benchmarks.common import synth_and_pack

    root = check.work / "tiny-data"
    if not (root / "shards").is_dir():
        synth_and_pack(root, 24, (40, 40, 40), (32, 32, 32))
    return root


def tiny_sets(check: Check, data: Path, out: Path, **extra: object) -> list[str]:
    inst = data / "raw" / "instructions"
    sets: dict[str, object] = {
        "output_dir": out,
        "data.shards": data / "shards",
        "data.train": f"[{inst / 't1_sex_train.jsonl'}]",
        "data.eval": f"[{inst / 't1_sex_eval.jsonl'}]",
        "train.device": check.accelerator,
        "train.global_batch": 4,
        "train.micro_batch": 4,
        "train.lr": 1e-4,
        "train.min_lr": 1e-4,  # constant after warm-up: a 3-step run extended to 6 is the same
        "train.warmup_steps": 0,
        "checkpoint.keep_last": 2,
        "eval.max_samples": 4,
        "eval.micro_batch": 2,
        "log.every_steps": 1,
        "log.progress": "false",
        "log.tensorboard": "false",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def train(check: Check, sets: list[str], log: Path, resume: str = "auto", **env: str) -> float:
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--resume", resume, "--set", *sets]
    cmd = deepspeed_cmd(TRAIN_SCRIPT, args, 1)
    return run_logged(cmd, log, timeout=600, env=check.env(**env))


def _records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out, "train")}


def step_engine_1rank(check: Check) -> dict:
    data = tiny_data(check)
    ref, res = check.work / "ref", check.work / "res"
    sets = {"train.max_steps": 6, "eval.at_end": "true", "checkpoint.every_steps": 3}
    t = train(check, tiny_sets(check, data, ref, **sets), ref.with_suffix(".log"))
    # the same run again from the reference's step-3 checkpoint, into another folder
    at3 = ref / "checkpoints" / "step-0000003"
    train(check, tiny_sets(check, data, res, **sets), res.with_suffix(".log"), resume=str(at3))
    starts = _records(res, "start")
    ref_l, res_l = _losses(ref), _losses(res)
    after = [s for s in range(4, 7)]
    assert sorted(res_l) == after, f"the resumed run logged steps {sorted(res_l)}"
    diffs = {s: abs(res_l[s] - ref_l[s]) / abs(ref_l[s]) for s in after}
    ev_dir = check.work / "eval"
    cmd = [
        sys.executable, "-m", "umbrella_ds.eval.eval_cli", "--checkpoint", str(res),
        "--data", str(data / "shards"), "--instructions",
        str(data / "raw" / "instructions" / "t1_sex_eval.jsonl"), "--max-samples", "4",
        "--out", str(ev_dir),
    ]  # fmt: skip
    run_logged(cmd, ev_dir.with_suffix(".log"), timeout=300, env=check.env())
    after_eval = {
        r["task"]: r for r in json.loads((ev_dir / "metrics.json").read_text())["records"]
    }
    during = {r["task"]: r for r in _records(res, "eval") if r["step"] == 6}
    return {
        "ok": len(starts) == 1 and starts[0].get("resumed_from") == str(at3),
        "device": starts[0].get("device"),
        "first_run_s": t,
        "losses_uninterrupted": ref_l,
        "losses_resumed": res_l,
        "resume_loss_rel_diff_after_step_3": diffs,
        "eval_loss_rel_diff_umbrella_eval_vs_in_training": {
            k: abs(after_eval[k]["loss"] - during[k]["loss"]) / abs(during[k]["loss"])
            for k in during
            if k in after_eval
        },
    }


def step_zero3_compiled_export(check: Check) -> dict:
    data = tiny_data(check)
    out = check.work / "zero3"
    compile_ = "none" if check.dry else "blocks"
    sets = tiny_sets(
        check, data, out,
        **{"train.max_steps": 4, "train.deepspeed": "zero3", "train.compile": compile_,
           "model.checkpointing.vision": "true", "model.checkpointing.language": "true",
           "checkpoint.every_steps": 0, "eval.at_end": "false"},
    )  # fmt: skip
    log = out.with_suffix(".log")
    wall = train(check, sets, log, TORCH_LOGS="recompiles")
    text = log.read_text(errors="replace")
    exported = check.work / "export"
    cmd = [sys.executable, "-m", "umbrella_ds.train.export", str(out), "--out", str(exported)]
    run_logged(cmd, exported.with_suffix(".log"), timeout=300, env=check.env())
    info = json.loads((exported / "export.json").read_text())
    compiled = re.search(r"compiled (\d+) transformer blocks", text)
    # One base however it is built (issue 22 §2): this run built tiny under zero.Init on the
    # device, step 1 whole under ZeRO-2; the seeded init must give both the same base hash.
    whole = check.work / "ref" / "checkpoints" / "step-0000006" / "meta.json"
    whole_hash = (
        json.loads(whole.read_text())["recipe"]["base"]["weights_sha256"]
        if whole.is_file()
        else None
    )
    zero3_hash = info["recipe"]["base"]["weights_sha256"]
    return {
        "ok": (exported / "patch_embed.safetensors").is_file()
        and (whole_hash is None or whole_hash == zero3_hash),
        "same_base_as_step_1": None if whole_hash is None else whole_hash == zero3_hash,
        "compile": compile_,
        "compiled_blocks": int(compiled.group(1)) if compiled else None,
        "recompiles": len(RECOMPILE.findall(text)),
        "losses": _losses(out),
        "train_wall_s": wall,
        "export_base_sha256": info["recipe"]["base"]["weights_sha256"],
    }


# ---------------------------------------------------------------- throughput (steps 3-6)


@dataclasses.dataclass
class Bench:
    """train_gpu's workload, data and model directory, prepared once for steps 3-6."""

    work: train_gpu.Workload
    data: train_gpu.Data
    model: Path
    root: Path
    results: dict = dataclasses.field(default_factory=dict)


# (step 3's eager, step 3's compiled, step 4, step 6) cases of train_gpu: GPU and dry run. The
# eager T1 run is also step 6's: its rates are the medians of the steps after `warmup` up to
# `measure_to`; then the profiler takes one warm-up step and traces PROFILE_ACTIVE (a 0.5B engine
# run costs about a minute of set-up, which a 5-minute half cannot spend twice on one case).
# The dry run leaves out step 4's rsfMRI case, which `benchmarks/train_gpu.py --smoke` runs on
# the CPU (tests/cli/test_bench_train_gpu.py), and compiles nothing.
PROFILE_ACTIVE = 5
GPU_PROFILE = dict(
    train_gpu.GPU_CASES[0], name="t1_216_eager_mb64_profile", warmup=4, measure_to=12, steps=18
)
GPU_PLAN = {
    "t1_eager": GPU_PROFILE,
    "t1_compiled": dict(train_gpu.GPU_CASES[1], steps=18, warmup=8),
    "rs_compiled": dict(train_gpu.GPU_CASES[2], steps=14, warmup=6),
    "profile": GPU_PROFILE,
}
DRY_PROFILE = dict(
    train_gpu.SMOKE_CASES[0], name="t1_64_eager_mb4_profile", warmup=1, measure_to=3, steps=9
)
DRY_PLAN = {
    "t1_eager": DRY_PROFILE,
    "t1_compiled": None,
    "rs_compiled": None,
    "profile": DRY_PROFILE,
}


def _plan(check: Check) -> dict:
    return DRY_PLAN if check.dry else GPU_PLAN


def bench(check: Check) -> Bench:
    if "bench" not in check.record.setdefault("_cache", {}):
        work = train_gpu.SMOKE if check.dry else train_gpu.GPU
        cases = [c for c in _plan(check).values() if c]
        root = check.work / "bench"
        root.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        data = train_gpu.prepare_data(root, cases, work)
        model = train_gpu.model_dir(root, work.preset)
        check.record["data_prep_s"] = time.perf_counter() - t0
        check.record["_cache"]["bench"] = Bench(work, data, model, root)
    return check.record["_cache"]["bench"]


def run_bench_case(check: Check, case: dict, **env: str) -> dict:
    """One train_gpu case through the engine (once: a second request returns the first run)."""
    b = bench(check)
    if case["name"] in b.results:
        return b.results[case["name"]]
    if case["name"].endswith("_profile"):
        path = b.root / "profile.json"
        # traced: the PROFILE_ACTIVE steps after measure_to + 1 (one profiler warm-up step)
        assert case["steps"] >= case["measure_to"] + 1 + PROFILE_ACTIVE, case
        env["UMBRELLA_BENCH_PROFILE"] = f"{path}:{case['measure_to'] + 1}:{PROFILE_ACTIVE}"
    cfg = train_gpu.case_config(case, b.data, b.model, b.root, b.work.workers)
    result = train_gpu.run_case(case, cfg, b.root, b.work.accelerator, extra_env=env)
    log = b.root / f"{case['name']}.log"
    if log.is_file():
        result["recompiles"] = len(RECOMPILE.findall(log.read_text(errors="replace")))
    b.results[case["name"]] = result
    return result


def step_t1_eager_vs_compiled(check: Check) -> dict:
    plan = _plan(check)
    eager = run_bench_case(check, plan["t1_eager"])
    out: dict = {"eager": eager}
    if plan["t1_compiled"] is None:
        out["compiled"] = "skipped in the dry run (no compilation on the CPU)"
        return out
    out["compiled"] = compiled = run_bench_case(check, plan["t1_compiled"], TORCH_LOGS="recompiles")
    if eager.get("samples_per_s") and compiled.get("samples_per_s"):
        out["compiled_over_eager"] = compiled["samples_per_s"] / eager["samples_per_s"]
    return out


def step_rsfmri_compiled(check: Check) -> dict:
    case = _plan(check)["rs_compiled"]
    if case is None:
        return {"skipped": "dry run: train_gpu.py --smoke runs the rsfMRI case on the CPU"}
    return run_bench_case(check, case, TORCH_LOGS="recompiles")


def step_finder_and_patch_embed(check: Check) -> dict:
    b = bench(check)
    case = _plan(check)["t1_eager"]
    cfg = train_gpu.case_config(case, b.data, b.model, b.root, b.work.workers)
    cmd = [
        sys.executable, "-m", "umbrella_ds.train", "--config", str(cfg), "--find-micro-batch",
        "--max-micro-batch", "4" if check.dry else "256", "--finder-steps", "2",
        "--set", f"train.device={check.accelerator}",
    ]  # fmt: skip
    log = b.root / "finder.log"
    wall = run_logged(cmd, log, timeout=240, env=check.env())
    table = [ln for ln in log.read_text().splitlines() if re.match(r"\s*\d+\s+(yes|no)\s", ln)]
    best = re.search(r"largest micro-batch that fits: (\d+)", log.read_text())
    return {
        "finder_wall_s": wall,
        "finder_table": table,
        "finder_best": int(best.group(1)) if best else None,
        "patch_embed": patch_embed_bench(case["mods"], b.work.preset, check.dry),
    }


def patch_embed_bench(mods: dict, preset: str, dry: bool) -> dict:
    """The T1 patch embedding's two formulations, forward + backward of the weights, bf16 on a
    GPU (fp32 on the CPU, where bf16 convolutions are slow and not what production runs)."""
    import torch

    from umbrella_ds.model import get_preset

    ((_, spec),) = mods.items()
    size, patch = spec["size"], spec["patch"]
    cfg = get_preset(preset).make_config()
    hidden = int(cfg.vision_config.hidden_size)
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    batch = 2 if dry else 64
    x = torch.randn(batch, 1, *size, device=device, dtype=dtype)
    conv = torch.nn.Conv3d(1, hidden, patch, stride=patch).to(device, dtype)
    lin = torch.nn.Linear(patch[0] * patch[1] * patch[2], hidden).to(device, dtype)

    def patches(v: torch.Tensor) -> torch.Tensor:
        g = [s // p for s, p in zip(size, patch)]
        v = v.reshape(batch, g[0], patch[0], g[1], patch[1], g[2], patch[2])
        return v.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, -1, lin.in_features)

    runs = {
        "conv3d": lambda: conv(x).flatten(2).transpose(1, 2),
        "reshape_linear": lambda: lin(patches(x)),
    }
    out: dict = {"batch": batch, "size": size, "patch": patch, "hidden": hidden,
                 "dtype": str(dtype)}  # fmt: skip
    for name, fn in runs.items():

        def step(fn: Callable = fn) -> None:
            y = fn()
            y.float().square().mean().backward()

        for _ in range(3):
            step()
        times = []
        for _ in range(5 if dry else 20):
            if not dry:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if not dry:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = statistics.median(times) * 1e3
    with torch.no_grad():  # the same map: the Linear's weight is the Conv3d's, flattened
        lin.weight.copy_(conv.weight.reshape(hidden, -1))
        lin.bias.copy_(conv.bias)
        a, b = runs["conv3d"]().float(), runs["reshape_linear"]().float()
        out["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
    out["linear_over_conv3d_time"] = out["reshape_linear_ms"] / out["conv3d_ms"]
    return out


def step_profile(check: Check) -> dict:
    b = bench(check)
    result = run_bench_case(check, _plan(check)["profile"])
    table_path = b.root / "profile.json"
    if not table_path.is_file():
        return {"ok": False, "run": result, "error": "the run wrote no profile"}
    prof = json.loads(table_path.read_text())
    wait = result.get("data_wait_frac")
    (check.out / "profile.txt").write_text(
        prof.pop("table") + f"\n\ndata_wait_frac (median over the run's measured steps): {wait}\n"
    )
    return {"ok": True, "data_wait_frac": wait, **prof}


HALVES: dict[str, list[tuple[str, Callable[[Check], dict]]]] = {
    "correctness": [
        ("1_engine_1rank", step_engine_1rank),
        ("2_zero3_compiled_export", step_zero3_compiled_export),
    ],
    "throughput": [
        ("3_t1_eager_vs_compiled", step_t1_eager_vs_compiled),
        ("4_rsfmri_compiled", step_rsfmri_compiled),
        ("5_finder_and_patch_embed", step_finder_and_patch_embed),
        ("6_profile", step_profile),
    ],
}


def environment() -> dict:
    """Versions the results were measured with; on the device torch is the image's own."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_pinned": "2.13.0 (setup.cfg); the device image has 2.11, which the check uses",
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for name in ("deepspeed", "transformers", "tokenizers", "hdf5plugin", "blosc", "nibabel"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:  # recorded: the step that imports it fails and says so
            env[name] = "not installed"
    return env


def run_half(half: str, out: Path, dry: bool, budget_s: float, workdir: Path | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix=f"device_check_{half}_", dir=workdir) as tmp:
        check = Check(half, out, Path(tmp), dry)
        check.record = {"half": half, "dry_run": dry, "environment": environment(), "steps": {}}
        check.save()
        for name, fn in HALVES[half]:
            if time.perf_counter() - check.started > budget_s:
                check.record["steps"][name] = {"status": "not run (half budget spent)"}
                check.save()
                continue
            print(f"== {half}: {name}", flush=True)
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **fn(check)}
                if result.get("ok") is False:
                    result["status"] = "failed"
            except Exception as exc:  # one step's failure is recorded; the next step runs
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[-4000:]}
            result["wall_s"] = time.perf_counter() - t0
            failed += result["status"] != "ok"
            check.record["steps"][name] = result
            save_train_gpu(check)
            check.save()
            print(json.dumps(result, default=str)[:800], flush=True)
        check.record.pop("_cache", None)
        check.record["wall_s"] = time.perf_counter() - check.started
        check.save()
    return 1 if failed else 0


def save_train_gpu(check: Check) -> None:
    """The throughput cases so far as benchmarks/results/train_gpu.json (on the device; the dry
    run writes into DIR instead), copied to DIR/train_gpu.json, which the device tool returns."""
    b = check.record.get("_cache", {}).get("bench")
    if b is None or not b.results:
        return
    config = train_gpu.run_config(b.work, [c for c in _plan(check).values() if c])
    config["data_prep_s"] = check.record.get("data_prep_s")
    config["source"] = "benchmarks/device_check.py throughput"
    config["environment"] = check.record["environment"]
    path = train_gpu.write_results(
        b.work, b.results, check.out if check.dry else train_gpu_results_dir(), config
    )
    if path.parent != check.out:
        (check.out / path.name).write_text(path.read_text())
    check.record["train_gpu_json"] = str(path)


def train_gpu_results_dir() -> Path:
    from benchmarks.common import RESULTS_DIR

    return RESULTS_DIR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("half", choices=sorted(HALVES))
    p.add_argument("--out", type=Path, required=True, help="where <half>.json is written")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny sizes")
    p.add_argument("--budget-s", type=float, default=HALF_BUDGET_S)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("device_check: needs a CUDA GPU (none visible here); use --dry-run on a CPU")
            return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_half(a.half, a.out, a.dry_run, a.budget_s, a.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
