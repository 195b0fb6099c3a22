"""``umbrella-eval``: greedy evaluation of a checkpoint or an export on packed subjects.

    umbrella-eval --checkpoint RUN_DIR|CKPT_DIR|STEP_DIR|EXPORT_DIR|RUN.yaml --data SHARD_DIR \\
                  --instructions FILE [FILE ...] [--out DIR]

``--checkpoint RUN.yaml`` evaluates a run config that sets ``model.patch_embed_init`` (a patch
embedding trained by UMBRELLA/BrainVLM) on its base, as step 0: no training needed to score it.

The numbers are the in-training evaluation's: the same dataset construction (the run config's
data section, with --data and --instructions swapped in), the same sharding over ranks, the same
greedy decoding, labels, likelihood choice, answer parsing and statistics
(``evaluate.evaluate_set``). The model is loaded by the one loader of trained models
(``train/trained.load``), without DeepSpeed: the frozen base rebuilt from the checkpoint's or
export's ModelRecipe and checked against its hash, the trained patch embedding from the
checkpoint's fp32 master weights, cast to bf16 when the run trained in bf16 (what DeepSpeed's
module held), so a checkpoint evaluated here gives the record its run logged at that step.

Started alone it runs on one process; under the deepspeed launcher, torchrun, srun or mpirun it
shards the evaluation set over the ranks (``train/env.py`` discovery). Every rank holds the whole
model: a model that only fits partitioned (ZeRO-3) is evaluated during training instead.

Rank 0 alone writes ``OUT/predictions.jsonl``, ``OUT/metrics.json`` and ``OUT/provenance.json``.
Exit status: 0 done, 1 failed (traceback), 2 usage error (one ``error: ...`` line from rank 0,
umbrella_ds/errors.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umbrella_ds import errors
from umbrella_ds.errors import UsageError, UserError, add_debug_flag, run_main

log = logging.getLogger("umbrella_ds.eval")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, errors.EXIT_FAILED, errors.EXIT_USAGE


def make_parser() -> argparse.ArgumentParser:
    from umbrella_ds.train import env

    p = argparse.ArgumentParser(
        prog="umbrella-eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run dir or its checkpoints dir (through `latest`), a step dir, an umbrella-export "
        "dir, or a run YAML setting model.patch_embed_init (the predecessor's weights, step 0)",
    )
    p.add_argument("--data", required=True, help="packed shard directory (umbrella-pack build)")
    p.add_argument(
        "--instructions", required=True, nargs="+", help="instruction file(s) or folder(s)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: RUN_DIR/eval-STEP for a checkpoint, EXPORT_DIR/eval for "
        "an export)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: the run's eval.max_new_tokens ('derived': per task, from its references)",
    )
    p.add_argument("--micro-batch", type=int, default=None, help="default: the run's eval value")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate the first N only")
    p.add_argument(
        "--base",
        default=None,
        help="where the frozen base comes from (preset or local dir), if not where the run had it",
    )
    p.add_argument("--timeout-s", type=int, default=1800, help="collective timeout")
    env.add_device_flag(p, unset="the evaluated run's train.device")
    add_debug_flag(p)
    # The deepspeed launcher appends --local_rank=N (the rank comes from the environment).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------- what to evaluate


@dataclasses.dataclass
class EvalTarget:
    """What is evaluated: a trained checkpoint or export (`trained.Trained`), or a run config
    whose model.patch_embed_init names a predecessor-trained patch embedding (step 0)."""

    kind: str  # "checkpoint" | "export" | "config"
    path: Path  # step dir, export dir or run YAML
    config: Any  # RunConfig
    step: int
    fingerprint: str  # sha256 of meta.json / export.json / the YAML
    trained: Any = None  # trained.Trained, for a checkpoint or an export


def resolve_target(path: str) -> EvalTarget:
    from umbrella_ds.train.checkpoint import CheckpointError
    from umbrella_ds.train.trained import EXPORT_INFO, locate

    p = Path(path).expanduser().resolve()
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return _config_target(p)
    try:
        found = locate(p)
    except CheckpointError as exc:
        raise UsageError(f"--checkpoint {path}: {exc} (nor an export: no {EXPORT_INFO})") from exc
    except UserError as exc:
        raise UsageError(str(exc)) from exc
    return EvalTarget(
        found.kind, found.path, found.config, found.step, _sha(found.record_file), found
    )


def _config_target(path: Path) -> EvalTarget:
    """A run YAML whose model.patch_embed_init names a predecessor-trained patch embedding."""
    from umbrella_ds.config import load_config

    cfg = load_config(path)
    if not cfg.model.patch_embed_init:
        raise UsageError(
            f"--checkpoint {path}: a run config is evaluated from model.patch_embed_init, which it "
            "does not set (a trained run: pass its run or checkpoint directory)"
        )
    return EvalTarget("config", path, cfg, 0, _sha(path))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_out(src: EvalTarget) -> Path:
    if src.kind == "config":
        return src.path.parent / f"eval-{src.path.stem}"
    if src.kind == "export":
        return src.path / "eval"
    # step dir = RUN/checkpoints/step-N  ->  RUN/eval-step-N
    return src.path.parent.parent / f"eval-{src.path.name}"


def load_model(src: EvalTarget, base: str | None):
    """The patched model and tokenizer in the dtype the run evaluated in, in eval mode."""
    from umbrella_ds.model.patch_embed_init import apply_config
    from umbrella_ds.train import trained
    from umbrella_ds.train.base_weights import BaseMismatchError
    from umbrella_ds.train.factory import cast_like_deepspeed

    try:
        if src.kind == "config":  # the run's base (nothing recorded to check), the init loaded
            model, tokenizer = trained.recipe_for_config(src.config).build(source=base)
            apply_config(model, src.config.model)
        else:
            model, tokenizer, _ = trained.load(src.trained, base=base)
    except BaseMismatchError as exc:  # another base than the run trained on: the user's to fix
        raise UsageError(f"--base: {exc}") from exc
    cast_like_deepspeed(model, src.config.train.bf16)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from umbrella_ds.train import env
    from umbrella_ds.train.preflight import check_base, check_shards

    src = resolve_target(args.checkpoint)
    if args.device is not None:
        env.apply_device_rule(args.device, "--device")
    else:
        env.apply_device_rule(
            src.config.train.device, "train.device (of the evaluated run)", recorded=True
        )
    check_base(args.base)
    for name in ("max_new_tokens", "micro_batch", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    data_dir = Path(args.data).expanduser().resolve()
    try:
        check_shards(str(data_dir), "--data")
    except UserError as exc:
        raise UsageError(str(exc)) from None
    files = [str(Path(f).expanduser().resolve()) for f in args.instructions]
    for f in files:
        if not Path(f).exists():
            raise UsageError(f"--instructions {f}: no such file or folder")
    out = Path(args.out).expanduser().resolve() if args.out else default_out(src)

    denv = env.discover()
    env.init_distributed(denv, args.timeout_s)
    try:
        return _run(src, args, denv, data_dir, files, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(src: EvalTarget, args, denv, data_dir: Path, files: list[str], out: Path) -> int:
    import torch.distributed as dist

    from umbrella_ds.eval.evaluate import evaluate_set
    from umbrella_ds.io import atomic_write_text
    from umbrella_ds.provenance import write_provenance
    from umbrella_ds.shards import open_dataset
    from umbrella_ds.train import env
    from umbrella_ds.train.inputs import build_inputs

    cfg = src.config
    model, tokenizer = load_model(src, args.base)
    device = env.device_for(denv)
    model.to(device)
    # The run's data settings (windows, max_length, ...) with this data: the eval set is built
    # exactly as build_inputs builds it in training (it is also passed as "train" only because
    # build_inputs needs one; overlap with itself is of course allowed here).
    data = dataclasses.replace(
        cfg.data, shards=str(data_dir), train=files, eval=files, allow_overlap=True
    )
    inputs = build_inputs(data, cfg.model, model, tokenizer, cfg.train.seed)
    ecfg = dataclasses.replace(
        cfg.eval,
        max_new_tokens=args.max_new_tokens or cfg.eval.max_new_tokens,
        max_samples=args.max_samples if args.max_samples is not None else cfg.eval.max_samples,
    )
    micro = args.micro_batch or cfg.eval.micro_batch or cfg.train.micro_batch
    records, preds = evaluate_set(
        model,
        inputs,
        tokenizer,
        ecfg,
        micro,
        rank=denv.rank,
        world_size=denv.world_size,
        device=device,
        all_modalities=tuple(cfg.model.modalities),
        step=src.step,
    )
    hosts: list[Any] = [None] * denv.world_size
    dist.all_gather_object(hosts, {"rank": denv.rank, "host": denv.host, "node": denv.slurm_node})
    if denv.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
        summary = {
            "source": {"kind": src.kind, "path": str(src.path), "step": src.step},
            "data": str(data_dir),
            "instructions": files,
            "max_new_tokens": ecfg.max_new_tokens,
            "micro_batch": micro,
            "world_size": denv.world_size,
            "records": records,
        }
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1) + "\n")
        write_provenance(
            out,
            kind="eval",
            config={
                **cfg.to_dict(),
                "eval": dataclasses.asdict(ecfg),
                "data": dataclasses.asdict(data),
            },
            inputs={
                f"{src.kind}": src.fingerprint,
                "shards_index": open_dataset(data_dir).fingerprint,
                "data": inputs.data_fingerprint,
            },
            extra={"source": str(src.path), "step": src.step, "launcher": denv.launcher},
            ranks=hosts,
        )
        for r in records:
            log.info("%s", json.dumps(r))
        print(f"umbrella-eval: {len(preds)} predictions, metrics in {out / 'metrics.json'}")
    dist.barrier()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = make_parser().parse_args(argv)
    rank = next(
        (
            os.environ[k]
            for k in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
            if k in os.environ
        ),
        "0",
    )
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except UserError:
        raise  # one line, exit 2 (umbrella_ds.errors.run_main)
    except Exception:
        log.exception("umbrella-eval failed")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
