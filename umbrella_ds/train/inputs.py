"""Training and evaluation inputs from the data config: tasks, renderer, datasets, sampler, loader.

Token counts per image come from the model's patch embedding (never recomputed here). The data
fingerprint that guards a resume covers the shards' index and the content of every instruction
file, so a resume onto changed data is refused even if the paths are the same. A run opens the
index and hashes the files once (`open_data`), early: the engine checks the fingerprint against
a checkpoint before the model is built, then hands the same `DataSource` to `build_inputs`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umbrella_ds import modality as modality_table
from umbrella_ds.config import ConfigError, DataConfig, ModelConfig
from umbrella_ds.data import (
    InstructionDataset,
    Renderer,
    ResumableSampler,
    build_loader,
    collate_eval,
    collate_train,
    load_instructions,
    resolve_subjects,
    slots,
)
from umbrella_ds.data.staging import stage_for_node
from umbrella_ds.data.template import ChatTemplate, template_of
from umbrella_ds.eval.leakage import check_no_overlap
from umbrella_ds.model import image_token_id, num_image_tokens
from umbrella_ds.shards import ShardDataset, open_dataset

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    train_set: InstructionDataset
    eval_set: InstructionDataset | None
    collate_train: Any
    collate_eval: Any
    data_fingerprint: str
    pad_id: int
    eos_id: int  # the template's stop id: greedy generation ends on it
    template: ChatTemplate  # the base model's conversation template (evaluation scores with it)
    num_workers: int = 0  # data.num_workers: evaluation's loader uses them too


@dataclass(frozen=True)
class DataSource:
    """The shards' index, opened once, and the data fingerprint, hashed once."""

    shards: ShardDataset
    fingerprint: str


def open_data(data: DataConfig) -> DataSource:
    """Open ``data.shards``'s index and hash it with the instruction files (train, then eval)."""
    shards = open_dataset(data.shards)
    return DataSource(shards, data_fingerprint(shards.fingerprint, data.train + data.eval))


def build_inputs(
    data: DataConfig,
    model_cfg: ModelConfig,
    model,
    tokenizer,
    seed: int,
    local_rank: int = 0,
    progress: bool = False,
    source: DataSource | None = None,
) -> Inputs:
    """``local_rank``: the node-local rank (the launcher's); with ``data.stage_dir`` rank 0 of
    each node copies the shards there and every rank reads them from there. ``source``: what
    `open_data` gave for ``data`` (the engine's, opened before the model), else opened here."""
    if tokenizer is None:
        raise RuntimeError(f"model {model_cfg.source!r} has no tokenizer; training needs one")
    source = source or open_data(data)
    shards_dir, shards = data.shards, source.shards
    if data.stage_dir:  # the node's copy (its index is the same bytes, so the same fingerprint)
        shards_dir = str(stage_for_node(data.shards, data.stage_dir, local_rank, progress))
        shards = open_dataset(shards_dir)
    shards.check()
    mods = list(model_cfg.modalities)
    tokens = {m: num_image_tokens(model, m) for m in mods}
    template = template_of(model)
    renderer = Renderer(tokenizer, tokens, data.max_length, data.overflow, template=template)
    series_length = modality_table.window_length(model_cfg.modalities)
    available = set(shards.subjects)

    def dataset(files: list[str], train: bool) -> InstructionDataset:
        tasks = [t for f in files for t in load_instructions(f)]
        tasks, skipped = resolve_subjects(tasks, available, data.missing_subjects, has=shards.has)
        if skipped:
            log.warning("skipped %d task(s) whose subjects are not in %s", skipped, data.shards)
        ds = InstructionDataset(
            tasks,
            shards_dir,
            renderer,
            train=train,
            seed=seed,
            series_length=series_length,
            window_stride=data.window_stride,
            windows=data.windows,
            flip=data.flip,
        )
        if ds.num_rejected:
            log.warning("%d task(s) longer than data.max_length were rejected", ds.num_rejected)
        if len(ds) == 0:
            key = "data.train" if train else "data.eval"
            raise ConfigError(f"{key}: no usable tasks in {files}")
        return ds

    if not data.train:
        raise ConfigError("data.train: names no instruction file")
    train_set = dataset(data.train, train=True)
    eval_set = dataset(data.eval, train=False) if data.eval else None
    if eval_set is not None:
        shared = check_no_overlap(train_set.tasks, eval_set.tasks, allow=data.allow_overlap)
        if shared:
            log.warning(
                "%d subject(s) in both data.train and data.eval (allowed by data.allow_overlap)",
                len(shared),
            )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_id = template.eos_id(tokenizer)
    kw = {
        "pad_id": int(pad_id),
        "image_token_id": image_token_id(model),
        "tokens_per_image": tokens,
    }
    return Inputs(
        train_set=train_set,
        eval_set=eval_set,
        collate_train=functools.partial(collate_train, **kw),
        collate_eval=functools.partial(collate_eval, **kw),
        data_fingerprint=source.fingerprint,
        pad_id=int(pad_id),
        eos_id=int(eos_id),
        template=template,
        num_workers=data.num_workers,
    )


def data_fingerprint(shards_fingerprint: str, files: list[str]) -> str:
    """The shards' index hash with every instruction file's name and bytes (a folder: its
    ``*.json*`` files, sorted)."""
    h = hashlib.sha256(shards_fingerprint.encode())
    for f in files:
        p = Path(f)
        paths = sorted(p.rglob("*.json*")) if p.is_dir() else [p]
        for q in paths:
            h.update(q.name.encode())
            h.update(q.read_bytes())
    return h.hexdigest()[:16]


def slot_pool(train_set: InstructionDataset, micro_batch: int, gas: int, data: DataConfig):
    """The loader workers' batch slots (`umbrella_ds.data.slots`), sized to cover the ``gas``
    micro-batches a step fetches plus the prefetch; a config that shared memory cannot hold is
    refused before anything is allocated. None without workers."""
    if data.num_workers < 1:
        return None
    if data.prefetch_factor < 1:
        raise ConfigError(
            f"data.prefetch_factor: must be >= 1 with workers, got {data.prefetch_factor}"
        )
    reader = train_set.shards  # the index only: shards open in the workers, after the fork
    layouts = slots.image_layouts(train_set.tasks, reader, micro_batch, train_set.series_length)
    per_worker = slots.slots_per_worker(gas, data.num_workers, data.prefetch_factor)
    need = slots.SlotPool.nbytes_for(layouts, data.num_workers, per_worker)
    free = _shm_free_bytes()
    if need > free:
        raise ConfigError(
            f"data.num_workers: {data.num_workers} workers x {per_worker} batch slots "
            f"({gas} micro-batches per step + data.prefetch_factor {data.prefetch_factor}) need "
            f"{need / 1e9:.2f} GB of shared memory, {SHM_DIR} has {free / 1e9:.2f} GB free: lower "
            "data.num_workers or data.prefetch_factor, or enlarge /dev/shm"
        )
    return slots.SlotPool(layouts, data.num_workers, per_worker)


SHM_DIR = "/dev/shm"  # where torch's shared memory (shm_open) lives on Linux


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 1 << 62  # no /dev/shm to ask: torch's allocation says it if it fails
    return st.f_bavail * st.f_frsize


def train_loader(
    inputs: Inputs, sampler: ResumableSampler, micro_batch: int, data: DataConfig, gas: int = 1
):
    """The training loader; with workers, its batches live in reused slots and must be released
    (`umbrella_ds.data.slots.release`) once their micro-batch's backward is done."""
    return build_loader(
        inputs.train_set,
        sampler,
        inputs.collate_train,
        batch_size=micro_batch,
        num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor,
        pin_memory=True,
        persistent_workers=True,
        seed=sampler.seed,
        pool=slot_pool(inputs.train_set, micro_batch, gas, data),
    )
