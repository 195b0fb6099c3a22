"""Gradient communication per optimizer step: ZeRO-2 on the trainable patch embedding vs full-model DP.

`python -m benchmarks.comm_bench [--steps 5]` writes benchmarks/results/comm.json.

Measured: 2 CPU ranks (deepspeed launcher, gloo), the `tiny` preset, the training engine's own
pieces (`build_model`, the engine's `LossModule`, `ds_setup.resolve_ds_config` on
`ds_configs/zero2.json` + `ds_setup.initialize`), with DeepSpeed's communication logger switched
on (`"comms_logger": {"enabled": true, "prof_all": true}`). After one warm-up step (which also
holds the engine's start-up broadcasts) the logger is reset, `--steps` optimizer steps run, and
the bytes of every logged collective are summed per op and divided by the steps.

Compared with: what full-model data parallelism would all-reduce per step, i.e. every
parameter's gradient, at the element size the measured gradient reduction used. The same
comparison for `llava-interleave-qwen-0.5b` is *computed* from parameter counts (the model built
on the meta device), not measured. Measures, never asserts.

Run by the deepspeed launcher with `--worker`, this file is also the per-rank program.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESET = "tiny"
SPEC = {"T1": {"size": [32, 32, 32], "patch": [8, 8, 8]}}
MICRO, GLOBAL, RANKS = 8, 16, 2


def _batch(model, micro: int, seed: int) -> dict:
    """A T1 micro-batch in the collate's format: prompt, image block, a 2-token answer."""
    import numpy as np

    from umbrella_ds.data import collate_train
    from umbrella_ds.model import image_token_id, num_image_tokens

    rng = np.random.default_rng(seed)
    iid, n_img = image_token_id(model), num_image_tokens(model, "T1")
    samples = []
    for b in range(micro):
        ids = np.array([10] * 6 + [iid] * n_img + [11] * (8 + b % 3) + [12, 2], dtype=np.int64)
        labels = np.full_like(ids, -100)
        labels[-2:] = ids[-2:]
        vol = rng.standard_normal(SPEC["T1"]["size"]).astype(np.float16)
        samples.append(
            {"input_ids": ids, "labels": labels, "images": [("T1", vol)], "task_id": f"s{b}"}
        )
    return collate_train(samples, pad_id=0, image_token_id=iid, tokens_per_image={"T1": n_img})


def worker(out: Path, steps: int) -> None:
    import deepspeed.comm as dscomm
    import torch

    from umbrella_ds.config import TrainConfig
    from umbrella_ds.model import build_model, find_patch_embed
    from umbrella_ds.train import ds_setup, env
    from umbrella_ds.train.engine import LossModule

    denv = env.discover()
    env.init_distributed(denv, 600)
    train = TrainConfig(global_batch=GLOBAL, micro_batch=MICRO, deepspeed="zero2", bf16=True)
    ds_cfg = ds_setup.resolve_ds_config(train, denv.world_size)
    ds_cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    model, _ = build_model(PRESET, modalities=SPEC, seed=0)
    engine, _ = ds_setup.initialize(LossModule(model, ("T1",)), train, ds_cfg)
    gas = train.accumulation(denv.world_size)

    def step(k: int) -> None:
        for m in range(gas):
            batch = _batch(model, MICRO, seed=1000 * k + 10 * denv.rank + m)
            loss, _ = engine(batch, float(batch["num_loss_tokens"]))
            engine.backward(loss)
            engine.step()

    step(0)  # warm-up: start-up broadcasts and first-step allocations are not per-step traffic
    dscomm.comms_logger.comms_dict = {}
    for k in range(1, steps + 1):
        step(k)
    raw = dscomm.comms_logger.comms_dict
    per_op = {
        op: sum(size * rec[0] for size, rec in sizes.items()) / steps for op, sizes in raw.items()
    }
    calls = {op: sum(rec[0] for rec in sizes.values()) / steps for op, sizes in raw.items()}
    trainable = sum(p.numel() for p in find_patch_embed(model).parameters())
    total = sum(p.numel() for p in model.parameters())
    grad_elem = next(p for p in engine.module.parameters() if p.requires_grad).dtype
    if denv.rank == 0:
        record = {
            "bytes_per_step_by_op": per_op,
            "calls_per_step_by_op": calls,
            "trainable_numel": trainable,
            "total_numel": total,
            "module_dtype": str(grad_elem),
            "world_size": denv.world_size,
            "steps": steps,
            "ds_config": ds_cfg,
        }
        out.write_text(json.dumps(record, indent=1, default=str))
    torch.distributed.barrier()


def _meta_counts(preset: str) -> tuple[int, int]:
    """(trainable, total) parameters of a preset's patched model, built on the meta device."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from umbrella_ds.model import find_patch_embed, get_preset, splice_patch_embed

    p = get_preset(preset)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(p.make_config())
        splice_patch_embed(model, p.modalities)
    return sum(x.numel() for x in find_patch_embed(model).parameters()), sum(
        x.numel() for x in model.parameters()
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.out, a.steps)
        return 0

    from benchmarks.common import deepspeed_cmd, run_logged, write_result

    with tempfile.TemporaryDirectory(prefix="comm_bench_", dir=a.workdir) as tmp:
        out = Path(tmp) / "comm.json"
        script = Path(__file__).resolve()
        run_logged(
            deepspeed_cmd(script, ["--worker", "--out", str(out), "--steps", str(a.steps)], RANKS),
            Path(tmp) / "comm.log",
            timeout=600,
        )
        rec = json.loads(out.read_text())
    by_op = rec["bytes_per_step_by_op"]
    gradient_ops = {op: b for op, b in by_op.items() if "gather" not in op and b > 0}
    reduced = sum(gradient_ops.values())
    total_bytes = sum(by_op.values())
    # Element size of the gradient reduction, as measured (bf16 -> 2, fp32 -> 4).
    elem = max(1, round(reduced / rec["trainable_numel"]))
    full_dp = rec["total_numel"] * elem
    figures = {
        "tiny ZeRO-2 gradient-reduction bytes/step (measured)": reduced,
        "tiny ZeRO-2 all collectives bytes/step (measured)": total_bytes,
        "tiny full-model DP all-reduce bytes/step (computed)": full_dp,
        "tiny trainable params": rec["trainable_numel"],
        "tiny total params": rec["total_numel"],
    }
    for op, b in sorted(by_op.items()):
        figures[f"tiny {op} bytes/step"] = b
    tr05, tot05 = _meta_counts("llava-interleave-qwen-0.5b")
    figures["0.5B trainable-only gradient bytes/step (computed)"] = tr05 * elem
    figures["0.5B full-model DP all-reduce bytes/step (computed)"] = tot05 * elem
    figures["0.5B trainable params"] = tr05
    figures["0.5B total params"] = tot05
    ratio = {
        "tiny full-model DP / ZeRO-2 measured gradient bytes": full_dp / reduced
        if reduced
        else None,
        "0.5B full-model DP / trainable-only gradient bytes (computed)": tot05 / tr05,
    }
    config = {
        "preset": PRESET,
        "modalities": SPEC,
        "ranks": RANKS,
        "global_batch": GLOBAL,
        "micro_batch": MICRO,
        "deepspeed": "ds_configs/zero2.json (auto resolved by umbrella_ds.train.ds_setup) + comms_logger",
        "steps_measured": rec["steps"],
        "gradient_element_bytes": elem,
        "calls_per_step_by_op": rec["calls_per_step_by_op"],
        "gradient_ops": sorted(gradient_ops),
        "note": "gradient ops = every logged collective except all_gather (ZeRO-2's parameter gather after the step)",
    }
    path = write_result("comm", config, figures, ratio=ratio)
    for key, value in {**figures, **ratio}.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
