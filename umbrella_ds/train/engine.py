"""The training run: build -> restore -> loop -> close, each a named function below.

Exit statuses (docs/OPERATIONS.md): 0 finished, 75 stopped on SIGUSR1/SIGTERM after a complete
checkpoint, 1 failed (including ``train.max_bad_steps`` non-finite steps in a row).

One optimizer step = ``accumulation`` micro-batches per rank, fetched up front so the supervised
token count of the *global* batch is known (one all-reduce, which also carries the stop flag)
before any forward. Each micro-batch's summed CE is divided by ``loss_normaliser`` so that after
DeepSpeed's 1/accumulation scaling and averaging over ranks the gradient is that of
(sum of CE over the global batch) / (its supervised tokens), exactly as one large batch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from umbrella_ds.config import FINGERPRINT_SCHEME, RunConfig
from umbrella_ds.data import ResumableSampler, slots
from umbrella_ds.data.collate import to_device
from umbrella_ds.eval.evaluate import evaluate
from umbrella_ds.model import model_forward_loss
from umbrella_ds.model.flops import FlopCounter, flop_counter
from umbrella_ds.train import checkpoint as ckpt
from umbrella_ds.train import ds_setup, env, factory, signals
from umbrella_ds.train.compile import compile_blocks
from umbrella_ds.train.determinism import enable_deterministic
from umbrella_ds.train.inputs import Inputs, build_inputs, open_data, train_loader
from umbrella_ds.train.preflight import check_keep_best_task
from umbrella_ds.train.run_logging import RunLogger, device_peak, mfu
from umbrella_ds.train.start_record import write_start
from umbrella_ds.train.trained import recipe_of

log = logging.getLogger("umbrella_ds.train")

EXIT_OK, EXIT_FAILED, EXIT_SIGNAL = 0, 1, 75
# Fault injection for tests: comma-separated 1-based step numbers whose loss is made NaN.
NAN_STEPS_ENV = "UMBRELLA_INJECT_NAN_STEPS"


class LossModule(nn.Module):
    """What DeepSpeed wraps, so every forward goes through ``engine(...)``."""

    def __init__(self, model: nn.Module, all_modalities: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.all_modalities = all_modalities

    def forward(self, batch: dict[str, Any], normaliser: float):
        return model_forward_loss(self.model, batch, normaliser, all_modalities=self.all_modalities)


def run(cfg: RunConfig, resume: str = "auto", allow_fingerprint_mismatch: bool = False) -> int:
    signals.install()
    env.apply_device_rule(cfg.train.device)  # refuses before anything is built
    denv = env.discover()
    _setup_logging(denv.rank)
    if cfg.train.deterministic:
        enable_deterministic()
    env.init_distributed(denv, cfg.train.collective_timeout_s)
    try:
        return _run(cfg, denv, resume, allow_fingerprint_mismatch)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: RunConfig, denv: env.DistEnv, resume: str, allow_mismatch: bool) -> int:
    state = build(cfg, denv, resume, allow_mismatch)
    try:
        restore(state)
        return loop(state)
    finally:
        close(state)


@dataclass
class Run:
    """Everything a run holds between build and close."""

    cfg: RunConfig
    denv: env.DistEnv
    device: torch.device
    found: ckpt.Found | None
    fingerprints: dict[str, str]
    model: nn.Module
    tokenizer: Any
    inputs: Inputs
    engine: Any  # deepspeed.DeepSpeedEngine around LossModule
    scheduler: Any
    sampler: ResumableSampler
    train_state: ckpt.TrainState
    checkpointer: ckpt.Checkpointer
    flops: FlopCounter
    logger: RunLogger | None = None


# ---------------------------------------------------------------- build


def build(cfg: RunConfig, denv: env.DistEnv, resume: str, allow_mismatch: bool) -> Run:
    """Refuse a checkpoint of another config/data first, then model, inputs, DeepSpeed, parts."""
    rank, world = denv.rank, denv.world_size
    out = Path(cfg.output_dir)
    source = open_data(cfg.data)  # the index opened and the data hashed once, for both uses
    fingerprints = {
        "config": cfg.fingerprint(),
        "model": cfg.model_fingerprint(),
        "data": source.fingerprint,
    }
    found = ckpt.find(resume, out / "checkpoints")
    if found:  # refuse before anything is converted or built
        ckpt.check_fingerprints(found, fingerprints, allow_mismatch, rank, cfg)
    universal = ckpt.prepare_universal(found, rank, world) if found else False
    dist.barrier()
    ds_cfg = ds_setup.resolve_ds_config(
        cfg.train, world, hidden_size=ds_setup.model_hidden_size(cfg.model.source),
        load_universal=universal,
    )  # fmt: skip
    zero3 = ds_setup.zero_stage(ds_cfg) == 3
    if rank == 0:
        log.info(
            "model %s: %s init, built in %s%s", cfg.model.source, cfg.model.init_kind,
            factory.build_dtype(cfg.model, cfg.train.bf16),
            ", loaded straight into the ZeRO-3 partitions"
            if zero3 and cfg.model.init_kind == "pretrained" else "",
        )  # fmt: skip
    built = factory.build_for_run(cfg, ds_cfg)
    model = built.model
    # The frozen base as this run sees it (gathered under ZeRO-3): saved with every checkpoint,
    # so export and evaluation can refuse a rebuild that is not the base the run trained on.
    base = factory.base_record(built)
    if found:
        recorded = recipe_of(found.meta)
        factory.check_resume_base(recorded, built, base, cfg, what=str(found.path))
    recipe = factory.run_recipe(cfg, built, base).to_dict()
    if cfg.train.compile == "blocks":
        n_blocks = compile_blocks(model, zero3=zero3)
        if rank == 0:
            log.info("train.compile=blocks: compiled %d transformer blocks", n_blocks)
    inputs = build_inputs(
        cfg.data, cfg.model, model, built.tokenizer, cfg.train.seed,
        local_rank=denv.node_local_rank, progress=cfg.log.progress, source=source,
    )  # fmt: skip
    check_keep_best_task(cfg, inputs)
    ck = cfg.model.checkpointing
    flops = flop_counter(model, (ck.vision, ck.language))
    engine, sched = ds_setup.initialize(
        LossModule(model, tuple(cfg.model.modalities)), cfg.train, ds_cfg
    )
    sampler = ResumableSampler(
        len(inputs.train_set),
        world_size=world,
        rank=rank,
        seed=cfg.train.seed,
        shuffle=True,
        drop_last=True,
        global_batch_size=cfg.train.global_batch,
    )
    train_state = ckpt.TrainState()
    parts = checkpoint_parts(cfg, engine, sched, sampler, train_state, fingerprints, recipe, denv)
    checkpointer = ckpt.Checkpointer(cfg.checkpoint, out / "checkpoints", rank, world, parts)
    return Run(
        cfg, denv, env.device_for(denv), found, fingerprints, model, built.tokenizer, inputs,
        engine, sched, sampler, train_state, checkpointer, flops,
    )  # fmt: skip


def checkpoint_parts(
    cfg: RunConfig, engine, sched, sampler, train_state, fingerprints, recipe, denv: env.DistEnv
) -> ckpt.Parts:
    """What a checkpoint holds, one line a part (names are meta.json keys or file groups)."""
    return ckpt.Parts(
        files={
            "model_and_optimizer": ckpt.DeepSpeedState(engine),  # trainable weights + optimizer
            "rng": ckpt.RankRng(denv.rank, device_slot=denv.node_local_rank),
        },
        state={
            "step": train_state,
            "sampler": sampler,
            "scheduler": ckpt.SchedulerState(sched),
            "epoch": ckpt.Record(lambda: sampler.epoch),
            "consumed_samples": ckpt.Record(lambda: sampler.consumed),
            "config": ckpt.Record(cfg.to_dict),
            "fingerprints": ckpt.Record(lambda: fingerprints),
            # how "config" above was hashed; checkpoints before schemes lack it (scheme 1)
            ckpt.SCHEME_KEY: ckpt.Record(lambda: FINGERPRINT_SCHEME, optional=True),
            "recipe": ckpt.Record(lambda: recipe, optional=True),  # format 2; 1 had "base"
            "trainable": ckpt.TrainableNames(engine.module),
        },
    )


# ---------------------------------------------------------------- restore


def restore(state: Run) -> None:
    """Seed each rank's streams; a found checkpoint's parts restore themselves over them."""
    cfg, rank = state.cfg, state.denv.rank
    ckpt.seed_rng(cfg.train.seed, rank)
    if state.found:
        state.checkpointer.load(state.found)
        if rank == 0:
            log.info("resumed from %s at step %d", state.found.path, state.train_state.step)
    state.logger = RunLogger(
        cfg.log, Path(cfg.output_dir), rank, cfg.train.max_steps, state.train_state.step,
        config=cfg.to_dict(),
    )  # fmt: skip
    write_start(
        state.logger, state.denv, cfg, state.fingerprints, state.found, state.model,
        ds_setup.used_config(state.engine),
    )  # fmt: skip


# ---------------------------------------------------------------- loop


def loop(state: Run) -> int:
    """Steps until train.max_steps: fetch, agree, step, log, save, evaluate; stop on a signal."""
    t = state.cfg.train
    steps = _Steps(state)
    loader = train_loader(state.inputs, state.sampler, t.micro_batch, state.cfg.data, steps.gas)
    batches_iter = iter(loader)
    bad = 0
    last_saved: Path | None = None
    while state.train_state.step < t.max_steps:
        t0 = time.perf_counter()
        if state.sampler.exhausted:
            state.sampler.set_epoch(state.sampler.epoch + 1)
            batches_iter = iter(loader)
        batches = [next(batches_iter) for _ in range(steps.gas)]
        t_data = time.perf_counter() - t0
        counts = steps.agree(batches)
        step = state.train_state.step
        if counts["stop"]:
            steps.save(step)
            if state.denv.rank == 0:
                log.warning("stopped on %s at step %d after saving", signals.requested(), step)
            return EXIT_SIGNAL
        lr = state.scheduler.get_last_lr()[0]
        loss, applied = steps.step(batches, counts, step + 1)
        state.sampler.advance(t.global_batch)
        step = state.train_state.step = step + 1
        bad = 0 if applied and math.isfinite(loss) else bad + 1
        if bad:
            if state.denv.rank == 0:
                log.warning("step %d: non-finite loss/gradients (%s), update skipped", step, loss)
            if bad >= t.max_bad_steps:
                if state.denv.rank == 0:
                    log.error(
                        "%d non-finite steps in a row: stopping; last good checkpoint: %s",
                        bad, last_saved or "none",
                    )  # fmt: skip
                return EXIT_FAILED
        steps.log(step, loss, lr, applied, counts, time.perf_counter() - t0, t_data)
        saved = None
        eval_due = _due(step, state.cfg.eval.every_steps) or (
            step == t.max_steps and state.cfg.eval.at_end
        )
        # With checkpoint.keep_best every evaluation saves first: a best can only be kept if a
        # checkpoint exists at its step (eval.every_steps need not divide checkpoint.every_steps).
        if (
            _due(step, state.cfg.checkpoint.every_steps)
            or step == t.max_steps
            or (eval_due and state.cfg.checkpoint.keep_best and state.inputs.eval_set)
        ):
            saved = last_saved = steps.save(step)
        if eval_due:
            steps.evaluate(step, saved)
    return EXIT_OK


# ---------------------------------------------------------------- close


def close(state: Run) -> None:
    if state.logger is not None:
        state.logger.close()


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class _Steps:
    """The loop's per-step pieces over a Run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.cfg, self.engine, self.sampler = run.cfg, run.engine, run.sampler
        self.inputs, self.tokenizer, self.flops = run.inputs, run.tokenizer, run.flops
        self.checkpointer = run.checkpointer
        self.device, self.rank, self.world = run.device, run.denv.rank, run.denv.world_size
        self.all_mods = tuple(run.cfg.model.modalities)
        self.gas = run.cfg.train.accumulation(self.world)
        self.device_name, self.peak, self.peak_name = device_peak()
        self.nan_steps = {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()}

    @property
    def logger(self) -> RunLogger:
        assert self.run.logger is not None
        return self.run.logger

    def agree(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One all-reduce: supervised tokens, tokens, image tokens and the stop flag.

        Collective tensors live on the training device: NCCL, the GPU backend, has no CPU
        tensors (gloo serves the CPU runs)."""
        local = torch.tensor(
            [
                sum(b["num_loss_tokens"] for b in batches),
                sum(b["num_tokens"] for b in batches),
                sum(p.numel() for b in batches for p in b["image_positions"].values()),
                float(signals.requested() is not None),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(local)
        loss_tokens, tokens, image_tokens, stop = (int(x) for x in local.tolist())
        return {
            "loss_tokens": loss_tokens,
            "tokens": tokens,
            "image_tokens": image_tokens,
            "stop": stop > 0,
        }

    def step(
        self, batches: list[dict[str, Any]], counts: dict[str, Any], step: int
    ) -> tuple[float, bool]:
        normaliser = ds_setup.loss_normaliser(counts["loss_tokens"], self.world, self.gas)
        # summed on the device and read once per step: no host sync between micro-batches
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in batches:
            dev_mb = to_device(mb, self.device)
            copied = slots.copy_event(self.device)  # GPU: the slot is free once this completes
            loss, s = self.engine(dev_mb, normaliser)
            if step in self.nan_steps:
                loss = loss * float("nan")
                s = s * float("nan")
            self.engine.backward(loss)
            slots.release(mb, copied)  # CPU: Conv3d kept the slot's images for the backward
            self.engine.step()
            loss_sum += s.detach().double()
        dist.all_reduce(loss_sum)
        return float(loss_sum) / counts["loss_tokens"], bool(self.engine.was_step_applied())

    def log(self, step, loss, lr, applied, counts, dt, t_data) -> None:
        if step % self.cfg.log.every_steps and step != self.cfg.train.max_steps:
            return
        grad_norm = self.engine.get_global_grad_norm()
        useful = self.flops.useful(counts["image_tokens"], counts["tokens"], counts["loss_tokens"])
        record = {
            "split": "train",
            "step": step,
            "epoch": self.sampler.epoch,
            "loss": loss if math.isfinite(loss) else None,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None and applied else None,
            "samples_per_s": self.cfg.train.global_batch / dt,
            "tokens_per_s": counts["tokens"] / dt,
            "mfu": mfu(useful, dt, self.peak, self.world),
            "data_wait_frac": t_data / dt,
            "skipped": not applied,
        }
        if self.flops.recomputes:
            extra = self.flops.recomputed(counts["image_tokens"], counts["tokens"])
            record["hfu"] = mfu(useful + extra, dt, self.peak, self.world)
        self.logger.write(record)
        self.logger.progress(step, loss, lr)

    def save(self, step: int) -> Path:
        path = self.checkpointer.save(step)
        if self.rank == 0:
            log.info("saved %s", path)
        return path

    def evaluate(self, step: int, saved: Path | None) -> None:
        if self.inputs.eval_set is None:
            return
        records = evaluate(
            self.engine.module.model,
            self.inputs,
            self.tokenizer,
            self.cfg.eval,
            self.cfg.eval.micro_batch or self.cfg.train.micro_batch,
            rank=self.rank,
            world_size=self.world,
            device=self.device,
            all_modalities=self.all_mods,
            step=step,
            out_dir=Path(self.cfg.output_dir),
        )
        for r in records:
            self.logger.write(r)
        if saved is not None and records:
            self.checkpointer.record_eval(saved, records)
        if self.rank == 0 and records:
            log.info("eval at step %d: %s", step, records[-1])


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
