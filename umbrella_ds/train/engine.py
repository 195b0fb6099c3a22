"""The training run: build -> restore -> loop (step, log, eval, save) -> close.

Exit statuses (docs/OPERATIONS.md): 0 finished, 75 stopped on SIGUSR1/SIGTERM after a complete
checkpoint, 1 failed (including ``train.max_bad_steps`` non-finite steps in a row).

One optimizer step = ``accumulation`` micro-batches per rank, fetched up front so the supervised
token count of the *global* batch is known (one all-reduce, which also carries the stop flag)
before any forward. Each micro-batch's summed CE is divided by ``loss_normaliser`` so that after
DeepSpeed's 1/accumulation scaling and averaging over ranks the gradient is that of
(sum of CE over the global batch) / (its supervised tokens), exactly as one large batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from umbrella_ds.config import ConfigError, RunConfig
from umbrella_ds.data import ResumableSampler
from umbrella_ds.model import (
    build_model,
    find_patch_embed,
    language_model,
    lm_head,
    model_forward_loss,
    parameter_table,
    projector,
    vision_tower,
)
from umbrella_ds.model.build import random_init_path
from umbrella_ds.provenance import write_provenance
from umbrella_ds.shards import open_dataset
from umbrella_ds.train import checkpoint as ckpt
from umbrella_ds.train import ds_setup, env, signals
from umbrella_ds.train.base_weights import base_weights_sha256, check_base
from umbrella_ds.train.evaluate import evaluate, task_name
from umbrella_ds.train.inputs import (
    Inputs,
    build_inputs,
    data_fingerprint,
    to_device,
    train_loader,
)
from umbrella_ds.train.run_logging import FlopCounter, RunLogger, device_peak, mfu

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
    denv = env.discover()
    _setup_logging(denv.rank)
    env.init_distributed(denv, cfg.train.collective_timeout_s)
    try:
        return _run(cfg, denv, resume, allow_fingerprint_mismatch)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: RunConfig, denv: env.DistEnv, resume: str, allow_mismatch: bool) -> int:
    import deepspeed

    rank, world = denv.rank, denv.world_size
    out = Path(cfg.output_dir)
    device = env.device_for(denv)
    # -- build
    fingerprints = {
        "config": cfg.fingerprint(),
        "model": cfg.model_fingerprint(),
        "data": data_fingerprint(
            open_dataset(cfg.data.shards).fingerprint, cfg.data.train + cfg.data.eval
        ),
    }
    found = ckpt.find(resume, out / "checkpoints")
    if found:  # refuse before anything is converted or built
        ckpt.check_fingerprints(found, fingerprints, allow_mismatch, rank)
    universal = ckpt.prepare_universal(found, rank, world) if found else False
    dist.barrier()
    ds_cfg = ds_setup.resolve_ds_config(cfg.train, world, load_universal=universal)
    zero3 = ds_setup.zero_stage(ds_cfg) == 3
    all_mods = tuple(cfg.model.modalities)
    pretrained = cfg.model.init_kind == "pretrained"
    pretrained_zero3 = zero3 and pretrained
    # DeepSpeed casts every parameter to bf16 in a bf16 run anyway; reading pretrained weights as
    # bf16 halves the host memory each rank needs while loading (14 GB instead of 28 for a 7B).
    # Random init stays fp32, so the presets' initial values do not depend on train.bf16.
    build_dtype = torch.bfloat16 if cfg.train.bf16 and pretrained else torch.float32
    if rank == 0:
        log.info(
            "model %s: %s init, built in %s%s", cfg.model.source, cfg.model.init_kind, build_dtype,
            ", loaded straight into the ZeRO-3 partitions" if pretrained_zero3 else "",
        )  # fmt: skip
    with (
        ds_setup.zero3_pretrained_loading(ds_cfg) if pretrained_zero3 else contextlib.nullcontext()
    ):
        model, tokenizer = build_model(
            cfg.model.source,
            modalities={
                m: {"size": s.size, "patch": s.patch} for m, s in cfg.model.modalities.items()
            },
            init=cfg.model.init,
            dtype=build_dtype,
            zero3_init=(lambda: deepspeed.zero.Init(config_dict_or_path=ds_cfg)) if zero3 else None,
            activation_checkpointing=(
                cfg.model.checkpointing.vision,
                cfg.model.checkpointing.language,
            ),
            seed=cfg.train.seed,
        )
    # The frozen base as this run sees it (gathered under ZeRO-3): saved with every checkpoint,
    # so export and evaluation can refuse a rebuild that is not the base the run trained on.
    base = {
        "weights_sha256": base_weights_sha256(model),
        "init_path": random_init_path(zero3, cfg.model.init_kind),
    }
    if found:
        check_base(
            found.meta.get("base", {}).get("weights_sha256"), base["weights_sha256"],
            what=str(found.path), source=cfg.model.source,
            hint="resume with the base the checkpoint was trained on, or start a new output_dir",
        )  # fmt: skip
    if cfg.train.compile == "blocks":
        n_blocks = compile_blocks(model, zero3=zero3)
        if rank == 0:
            log.info("train.compile=blocks: compiled %d transformer blocks", n_blocks)
    inputs = build_inputs(cfg.data, cfg.model, model, tokenizer, cfg.train.seed)
    _check_keep_best_task(cfg, inputs)
    ck = cfg.model.checkpointing
    flops = flop_counter(model, (ck.vision, ck.language))
    engine, sched = ds_setup.initialize(LossModule(model, all_mods), cfg.train, ds_cfg)
    sampler = ResumableSampler(
        len(inputs.train_set),
        world_size=world,
        rank=rank,
        seed=cfg.train.seed,
        shuffle=True,
        drop_last=True,
        global_batch_size=cfg.train.global_batch,
    )
    checkpointer = ckpt.Checkpointer(cfg.checkpoint, out / "checkpoints", rank, world)
    # -- restore
    step = 0
    ckpt.seed_rng(cfg.train.seed, rank)
    if found:
        checkpointer.load(engine, found)
        step = int(found.meta["step"])
        sampler.load_state_dict(found.meta["sampler"])
        sched.load_state_dict(found.meta["scheduler"])
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
        if rank == 0:
            log.info("resumed from %s at step %d", found.path, step)
    logger = RunLogger(cfg.log, out, rank, cfg.train.max_steps, step, config=cfg.to_dict())
    _write_start(logger, denv, cfg, fingerprints, found, model)
    trainer = _Trainer(cfg, engine, sched, sampler, inputs, tokenizer, checkpointer, logger, flops)
    trainer.fingerprints, trainer.base = fingerprints, base
    trainer.device, trainer.rank, trainer.world, trainer.all_mods = device, rank, world, all_mods
    try:
        return trainer.loop(step)
    finally:
        logger.close()


class _Trainer:
    """The loop and its per-step pieces; state lives in the objects it was given."""

    def __init__(
        self, cfg, engine, sched, sampler, inputs: Inputs, tokenizer, checkpointer, logger, flops
    ):
        self.cfg, self.engine, self.sched, self.sampler = cfg, engine, sched, sampler
        self.inputs, self.tokenizer, self.checkpointer, self.logger = (
            inputs,
            tokenizer,
            checkpointer,
            logger,
        )
        self.flops = flops
        self.gas = cfg.train.accumulation(dist.get_world_size())
        self.device_name, self.peak, self.peak_name = device_peak()
        self.nan_steps = {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()}

    def loop(self, step: int) -> int:
        t = self.cfg.train
        loader = train_loader(self.inputs, self.sampler, t.micro_batch, self.cfg.data)
        batches_iter = iter(loader)
        bad = 0
        last_saved: Path | None = None
        while step < t.max_steps:
            t0 = time.perf_counter()
            if self.sampler.exhausted:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                batches_iter = iter(loader)
            batches = [next(batches_iter) for _ in range(self.gas)]
            t_data = time.perf_counter() - t0
            counts = self._agree(batches)
            if counts["stop"]:
                self._save(step)
                if self.rank == 0:
                    log.warning("stopped on %s at step %d after saving", signals.requested(), step)
                return EXIT_SIGNAL
            lr = self.sched.get_last_lr()[0]
            loss, applied = self._step(batches, counts, step + 1)
            self.sampler.advance(t.global_batch)
            step += 1
            if not applied or not math.isfinite(loss):
                bad += 1
                if self.rank == 0:
                    log.warning(
                        "step %d: non-finite loss/gradients (%s), update skipped", step, loss
                    )
                if bad >= t.max_bad_steps:
                    if self.rank == 0:
                        log.error(
                            "%d non-finite steps in a row: stopping; last good checkpoint: %s",
                            bad,
                            last_saved or "none",
                        )
                    return EXIT_FAILED
            else:
                bad = 0
            dt = time.perf_counter() - t0
            self._log(step, loss, lr, applied, counts, dt, t_data)
            saved = None
            eval_due = self._due(step, self.cfg.eval.every_steps) or (
                step == t.max_steps and self.cfg.eval.at_end
            )
            # With checkpoint.keep_best every evaluation saves first: a best can only be kept if
            # a checkpoint exists at its step (eval.every_steps need not divide into
            # checkpoint.every_steps).
            if (
                self._due(step, self.cfg.checkpoint.every_steps)
                or step == t.max_steps
                or (eval_due and self.cfg.checkpoint.keep_best and self.inputs.eval_set)
            ):
                saved = last_saved = self._save(step)
            if eval_due:
                self._evaluate(step, saved)
        return EXIT_OK

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def _agree(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
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

    def _step(
        self, batches: list[dict[str, Any]], counts: dict[str, Any], step: int
    ) -> tuple[float, bool]:
        normaliser = ds_setup.loss_normaliser(counts["loss_tokens"], self.world, self.gas)
        # summed on the device and read once per step: no host sync between micro-batches
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in batches:
            loss, s = self.engine(to_device(mb, self.device), normaliser)
            if step in self.nan_steps:
                loss = loss * float("nan")
                s = s * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += s.detach().double()
        dist.all_reduce(loss_sum)
        return float(loss_sum) / counts["loss_tokens"], bool(self.engine.was_step_applied())

    def _log(self, step, loss, lr, applied, counts, dt, t_data) -> None:
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

    def _save(self, step: int) -> Path:
        client = {
            "step": step,
            "epoch": self.sampler.epoch,
            "consumed_samples": self.sampler.consumed,
            "sampler": self.sampler.state_dict(),
            "scheduler": self.sched.state_dict(),
            "config": self.cfg.to_dict(),
            "fingerprints": self.fingerprints,
            "base": self.base,
            "trainable": sorted(
                n for n, p in self.engine.module.named_parameters() if p.requires_grad
            ),
        }
        path = self.checkpointer.save(self.engine, step, client)
        if self.rank == 0:
            log.info("saved %s", path)
        return path

    def _evaluate(self, step: int, saved: Path | None) -> None:
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


def _check_keep_best_task(cfg: RunConfig, inputs: Inputs) -> None:
    """A keep_best naming a task the evaluation set does not have would never record a best
    checkpoint; say so before training rather than after it."""
    key = cfg.checkpoint.keep_best_key()
    if key is None or key[0] == "all" or inputs.eval_set is None:
        return
    tasks = sorted({task_name(t) for t in inputs.eval_set.tasks})
    if key[0] not in tasks:
        raise ConfigError(
            f"checkpoint.keep_best={cfg.checkpoint.keep_best!r}: the evaluation set has no task "
            f"{key[0]!r} (its tasks: {tasks}; a bare metric name uses the mean over them)"
        )


def _write_start(logger: RunLogger, denv: env.DistEnv, cfg: RunConfig, fps, found, model) -> None:
    hosts: list[Any] = [None] * denv.world_size
    dist.all_gather_object(
        hosts, {"rank": denv.rank, "host": denv.host, "slurm_node": denv.slurm_node}
    )
    if denv.rank == 0:
        write_provenance(
            cfg.output_dir,
            kind="train",
            config=cfg.to_dict(),
            inputs=dict(fps),
            extra={"launcher": denv.launcher, "resumed_from": str(found.path) if found else None},
            ranks=[{"rank": h["rank"], "host": h["host"], "node": h["slurm_node"]} for h in hosts],
        )
        _, table = parameter_table(model)
        image_tokens = [spec.describe(m) for m, spec in find_patch_embed(model).specs.items()]
        log.info("image tokens per modality:\n  %s", "\n  ".join(image_tokens))
        device_name, peak, peak_name = device_peak()
        logger.write(
            {
                "split": "start",
                "time": time.time(),
                "world_size": denv.world_size,
                "launcher": denv.launcher,
                "ranks": hosts,
                "resumed_from": str(found.path) if found else None,
                "fingerprints": fps,
                "parameters": table,
                "image_tokens": image_tokens,
                "device": device_name,
                "peak_flops": peak,
                "peak_name": peak_name,
            }
        )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every encoder layer of the vision tower and decoder layer of the language model."""
    return [
        m for m in model.modules() if type(m).__name__.endswith(("EncoderLayer", "DecoderLayer"))
    ]


def compile_blocks(model: nn.Module, zero3: bool = False) -> int:
    """Regional compilation (``train.compile=blocks``): ``module.compile()`` on every block.

    Compiling blocks, not the whole model, keeps compile time to one graph per block type and
    leaves the host-built index gathers, the per-modality loop and DeepSpeed's engine eager.
    Call it after the model is built and before ``deepspeed.initialize``.

    ZeRO-3 registers parameter-gathering hooks on every submodule; inside a compiled block each
    of them is a graph break (they are ``torch.compiler.disable``d) and the NVTX-wrapped
    post-forward hook makes dynamo recompile until it hits its recompile limit. So under ZeRO-3
    each block is declared a ZeRO-3 *leaf module*: its parameters are gathered once at block
    entry and released at exit, hooks sit only on the block, and the block body compiles as one
    graph. NVTX ranges are switched off, as ``DeepSpeedEngine.compile`` does, for the same reason.
    Returns the number of blocks compiled.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise RuntimeError("train.compile=blocks: found no transformer blocks to compile")
    if zero3:
        import deepspeed.utils.nvtx
        from deepspeed.utils import set_z3_leaf_modules

        deepspeed.utils.nvtx.enable_nvtx = False
        set_z3_leaf_modules(model, sorted({type(b) for b in blocks}, key=lambda t: t.__name__))
    for block in blocks:
        block.compile()
    return len(blocks)


def _numel(module: nn.Module) -> int:
    # ZeRO-3 partitioned parameters are empty locally; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _feature_layers(layer: int | list[int], num_layers: int) -> int:
    """Encoder layers the selected hidden state depends on (hidden_states[0] = embeddings)."""
    idx = [layer] if isinstance(layer, int) else list(layer)
    return max(i if i >= 0 else num_layers + 1 + i for i in idx)


def flop_counter(model: nn.Module, checkpointing: tuple[bool, bool]) -> FlopCounter:
    """The FLOP formula's parameter counts, read from the built model (see run_logging)."""
    tower = vision_tower(model)
    vt = getattr(tower, "vision_model", tower)
    layers = list(vt.encoder.layers)
    per_layer = [_numel(m) for m in layers]
    grad_layers = sum(per_layer[: _feature_layers(model.config.vision_feature_layer, len(layers))])
    proj = _numel(projector(model))
    head = getattr(vt, "head", None)  # SigLIP pooling head: runs forward, gets no gradient
    head_kv = 0
    if head is not None:
        h_v = int(vt.config.hidden_size)
        head_kv = 2 * h_v * h_v  # key/value projections of every token (the query is one probe)
    lm = language_model(model)
    n_lang = sum(_numel(m) for m in lm.layers)
    weight = lm_head(model).weight
    vocab, hidden = (int(x) for x in getattr(weight, "ds_shape", weight.shape))
    vision_ck, language_ck = checkpointing
    return FlopCounter(
        vision_forward=sum(per_layer) + proj + head_kv,
        vision_backward=grad_layers + proj,
        language=n_lang,
        hidden=hidden,
        vocab=vocab,
        vision_recompute=grad_layers if vision_ck else 0,
        language_recompute=n_lang if language_ck else 0,
    )


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
