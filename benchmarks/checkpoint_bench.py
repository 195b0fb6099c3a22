"""Checkpoint size and save/load time: trainable-only (ours) vs the full model (the predecessor's).

`python -m benchmarks.checkpoint_bench [--presets tiny llava-interleave-qwen-0.5b]` writes
benchmarks/results/checkpoint.json.

How: one process, a 1-rank DeepSpeed engine built from the engine's own pieces (`build_model`
with random weights, the engine's `LossModule`, `ds_setup.initialize` on `ds_configs/zero2.json`,
bf16), one real optimizer step on a T1 sample (so the AdamW states exist), then

- trainable-only: `engine.save_checkpoint(..., exclude_frozen_parameters=True)` inside
  `checkpoint.without_frozen`, the call `umbrella_ds.train.checkpoint.Checkpointer` makes (patch
  embedding + its fp32 master copy and AdamW states; no frozen tensor, tied aliases included),
  loaded back with `load_module_strict=False`;
- full: the same call with `exclude_frozen_parameters=False` (every parameter of the model, plus
  the same optimizer state), loaded back strictly.

Both T1-only (the 0.5B preset at 96^3 / 16^3 = 216 tokens); the 0.5B model is built in bf16
(0.86B parameters: 1.7 GB, against 3.5 GB in fp32) to fit this machine's memory, tiny in fp32
as the engine builds it. Save time is until `save_checkpoint` returns (written into the page
cache) and, separately, including an `os.sync()`; load reads from the page cache. Medians over
`--repeats`. Measures, never asserts. Run with `--worker`, this file is the 1-rank program the
benchmark starts under the deepspeed launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = ("tiny", "llava-interleave-qwen-0.5b")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(preset: str, root: Path, repeats: int, out: Path) -> None:
    import numpy as np
    import torch

    from umbrella_ds.config import TrainConfig
    from umbrella_ds.data import collate_train
    from umbrella_ds.model import build_model, get_preset, image_token_id, num_image_tokens
    from umbrella_ds.train import ds_setup, env
    from umbrella_ds.train.checkpoint import without_frozen
    from umbrella_ds.train.engine import LossModule

    denv = env.discover()
    env.init_distributed(denv, 600)
    t1 = get_preset(preset).modalities["T1"]
    spec = {"T1": t1.to_dict()}
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    t0 = time.perf_counter()
    model, _ = build_model(preset, modalities=spec, dtype=dtype, seed=0)
    build_s = time.perf_counter() - t0
    train = TrainConfig(global_batch=1, micro_batch=1, deepspeed="zero2", bf16=True, lr=1e-4)
    ds_cfg = ds_setup.resolve_ds_config(train, 1)
    engine, _ = ds_setup.initialize(LossModule(model, ("T1",)), train, ds_cfg)

    iid, n_img = image_token_id(model), num_image_tokens(model, "T1")
    ids = np.array([10] * 6 + [iid] * n_img + [11] * 8 + [12, 13], dtype=np.int64)
    labels = np.full_like(ids, -100)
    labels[-2:] = ids[-2:]
    vol = np.random.default_rng(0).standard_normal(t1.size).astype(np.float16)
    batch = collate_train(
        [{"input_ids": ids, "labels": labels, "images": [("T1", vol)], "task_id": "s0"}],
        pad_id=0, image_token_id=iid, tokens_per_image={"T1": n_img},
    )  # fmt: skip
    t0 = time.perf_counter()
    loss, _ = engine(batch, float(batch["num_loss_tokens"]))
    engine.backward(loss)
    engine.step()
    step_s = time.perf_counter() - t0

    # What DeepSpeed's exclude_frozen_parameters keeps: it drops frozen names found by
    # named_parameters(), which lists a tied weight once, so the tie's other name stays.
    trainable_names = {n for n, p in engine.module.named_parameters() if p.requires_grad}

    def large_frozen(sd: dict) -> dict[str, int]:
        return {
            k: v.numel() for k, v in sd.items() if k not in trainable_names and v.numel() > 10**5
        }

    kept_by_deepspeed = large_frozen(engine.module_state_dict(exclude_frozen_parameters=True))
    with without_frozen(engine):
        kept_by_ours = large_frozen(engine.module_state_dict(exclude_frozen_parameters=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    result = {"preset": preset, "dtype": str(dtype), "build_s": build_s, "one_step_s": step_s,
              "trainable_params": trainable, "total_params": total,
              "large_frozen_entries_kept_by_deepspeed_exclude_frozen": kept_by_deepspeed,
              "large_frozen_entries_kept_by_checkpointer": kept_by_ours}  # fmt: skip
    for kind, exclude in (("trainable", True), ("full", False)):
        saves, synced, loads, sizes = [], [], [], []
        for _r in range(repeats):
            folder = root / f"{preset}-{kind}"
            shutil.rmtree(folder, ignore_errors=True)
            os.sync()
            t0 = time.perf_counter()
            with without_frozen(engine) if exclude else contextlib.nullcontext():
                engine.save_checkpoint(
                    str(folder), tag="step", exclude_frozen_parameters=exclude, save_latest=False
                )
            saves.append(time.perf_counter() - t0)
            os.sync()
            synced.append(time.perf_counter() - t0)
            sizes.append(_dir_bytes(folder / "step"))
            files = {f.name: f.stat().st_size for f in (folder / "step").iterdir() if f.is_file()}
            t0 = time.perf_counter()
            path, _ = engine.load_checkpoint(
                str(folder), tag="step", load_module_strict=not exclude,
                load_optimizer_states=True, load_lr_scheduler_states=False,
            )  # fmt: skip
            loads.append(time.perf_counter() - t0)
            if path is None:
                raise RuntimeError(f"{folder}: DeepSpeed could not load the checkpoint it wrote")
            shutil.rmtree(folder)
        result[kind] = {
            "bytes": statistics.median(sizes),
            "save_s": statistics.median(saves),
            "save_sync_s": statistics.median(synced),
            "load_s": statistics.median(loads),
            "repeats": repeats,
            "files": files,
        }
    out.write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.preset, a.root, a.repeats, a.out)
        return 0

    from benchmarks.common import deepspeed_cmd, run_logged, write_result

    figures: dict[str, float] = {}
    ratio: dict[str, float] = {}
    details = {}
    short = {"tiny": "tiny", "llava-interleave-qwen-0.5b": "0.5B"}
    with tempfile.TemporaryDirectory(prefix="checkpoint_bench_", dir=a.workdir) as tmp:
        for preset in a.presets:
            out = Path(tmp) / f"{preset}.json"
            args = [
                "--worker",
                "--preset",
                preset,
                "--root",
                tmp,
                "--out",
                str(out),
                "--repeats",
                str(a.repeats),
            ]
            run_logged(
                deepspeed_cmd(Path(__file__).resolve(), args, 1),
                Path(tmp) / f"{preset}.log",
                timeout=900,
            )
            rec = json.loads(out.read_text())
            details[preset] = {
                k: rec[k]
                for k in (
                    "dtype", "build_s", "one_step_s", "trainable_params", "total_params",
                    "large_frozen_entries_kept_by_deepspeed_exclude_frozen",
                    "large_frozen_entries_kept_by_checkpointer",
                )
            }  # fmt: skip
            name = short[preset]
            for kind in ("trainable", "full"):
                r = rec[kind]
                label = "trainable-only" if kind == "trainable" else "full model"
                figures[f"{name} {label} MB"] = r["bytes"] / 1e6
                model_states = sum(b for f, b in r["files"].items() if "model_states" in f)
                figures[f"{name} {label} model-states file MB"] = model_states / 1e6
                figures[f"{name} {label} save s"] = r["save_s"]
                figures[f"{name} {label} save+sync s"] = r["save_sync_s"]
                figures[f"{name} {label} load s"] = r["load_s"]
            ratio[f"{name} full / trainable-only bytes"] = (
                rec["full"]["bytes"] / rec["trainable"]["bytes"]
            )
            ratio[f"{name} full / trainable-only save+sync time"] = (
                rec["full"]["save_sync_s"] / rec["trainable"]["save_sync_s"]
            )
            ratio[f"{name} full / trainable-only load time"] = (
                rec["full"]["load_s"] / rec["trainable"]["load_s"]
            )
    config = {
        "how": "DeepSpeed save_checkpoint/load_checkpoint in a 1-rank ZeRO-2 bf16 engine "
        "(ds_setup.initialize), exclude_frozen_parameters=True inside checkpoint.without_frozen (trainable-only, as "
        "Checkpointer) vs False (full)",
        "modalities": "T1 only, each preset's default grid and patch",
        "repeats": a.repeats,
        "models": details,
    }
    path = write_result("checkpoint", config, figures, ratio=ratio)
    for key, value in {**figures, **ratio}.items():
        print(f"{key}: {value:.4g}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
