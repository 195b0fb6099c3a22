"""Runs equivalence cases one after another in one process group, through the real engine.

Started by the deepspeed launcher (1 rank for the reference, 2 for the run under test):
    deepspeed --num_gpus N tests/equivalence/driver.py --data DIR --out DIR CASE [CASE ...]
Each case is a whole training run (`engine._run`: build, restore, loop, evaluate, save) into
OUT/CASE/. One launch serves every case, so the process start-up and DeepSpeed's comm set-up
are paid once. Besides the run's own outputs, rank 0 writes OUT/CASE/modalities.json: per
training micro-batch, the modalities each rank's batch held (what makes a case "mixed"), and
OUT/CASE/initial_trainable.pt: the trainable parameters as built, before the first step (gathered
under ZeRO-3), so the weight check can compare the trained updates (see test_equivalence.py).
Every rank writes OUT/CASE/log-rankR.txt: the case's log records, torch's warnings among them (a
dynamo recompile-limit warning is what test_comparisons.py looks for). Before a case that compiles
(train.compile other than none), dynamo's caches are reset, so it compiles as a fresh process does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch._dynamo
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import by_name, overrides

from umbrella_ds.config import load_config
from umbrella_ds.train import engine, env, signals

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("cases", nargs="+")
    args = p.parse_args()
    signals.install()
    denv = env.discover()
    engine._setup_logging(denv.rank)
    env.init_distributed(denv, 600)
    seen: list[list[str]] = []
    forward = engine.model_forward_loss

    def recording_forward(model, batch, normaliser, all_modalities=()):
        if model.training:
            seen.append(sorted(m for m, x in batch["images"].items() if x.shape[0]))
        return forward(model, batch, normaliser, all_modalities=all_modalities)

    engine.model_forward_loss = recording_forward
    restore = engine.restore

    def recording_restore(state: engine.Run) -> None:
        restore(state)
        trainable = [(n, p) for n, p in state.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            initial = {n: p.detach().float().cpu().clone() for n, p in trainable}
        if denv.rank == 0:
            torch.save(initial, Path(state.cfg.output_dir) / "initial_trainable.pt")

    engine.restore = recording_restore
    try:
        for name in args.cases:
            out = args.out / name
            cfg = load_config(
                REPO / "configs" / "demo.yaml", overrides(by_name(name), args.data, out)
            )
            seen.clear()
            if cfg.train.compile != "none":
                torch._dynamo.reset()
            with _case_log(out / f"log-rank{denv.rank}.txt"):
                code = engine._run(cfg, denv, "none", False)
            if code != engine.EXIT_OK:
                return code
            per_rank: list[list[list[str]] | None] = [None] * denv.world_size
            dist.all_gather_object(per_rank, list(seen))
            if denv.rank == 0:
                (out / "modalities.json").write_text(json.dumps(per_rank))
            gc.collect()
    finally:
        dist.destroy_process_group()
    return 0


@contextlib.contextmanager
def _case_log(path: Path) -> Iterator[None]:
    """The records of one case, at the levels the run prints them, into ``path``: the root logger's
    (umbrella_ds) and torch's (which do not propagate to the root)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("torch"), logging.getLogger("torch._dynamo")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


if __name__ == "__main__":
    sys.exit(main())
