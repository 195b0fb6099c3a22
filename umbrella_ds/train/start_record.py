"""The ``"split": "start"`` record and provenance.json a run writes once its model is built.

Every rank calls `write_start` (it gathers each rank's host and SLURM node); rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch.distributed as dist

from umbrella_ds.config import RunConfig
from umbrella_ds.model import find_patch_embed, parameter_table
from umbrella_ds.provenance import write_provenance
from umbrella_ds.train.env import DistEnv
from umbrella_ds.train.run_logging import RunLogger, device_peak

log = logging.getLogger("umbrella_ds.train")


def write_start(
    logger: RunLogger,
    denv: DistEnv,
    cfg: RunConfig,
    fingerprints,
    found,
    model,
    deepspeed: dict[str, Any],
) -> None:
    """``deepspeed``: the resolved DeepSpeed config the run uses (`ds_setup.used_config`), kept in
    both records, because users ask what their run ran with and the JSON file held "auto"."""
    hosts: list[Any] = [None] * denv.world_size
    dist.all_gather_object(
        hosts, {"rank": denv.rank, "host": denv.host, "slurm_node": denv.slurm_node}
    )
    if denv.rank != 0:
        return
    resumed_from = str(found.path) if found else None
    write_provenance(
        cfg.output_dir,
        kind="train",
        config=cfg.to_dict(),
        inputs=dict(fingerprints),
        extra={"launcher": denv.launcher, "resumed_from": resumed_from, "deepspeed": deepspeed},
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
            "resumed_from": resumed_from,
            "fingerprints": fingerprints,
            "deepspeed": deepspeed,
            "parameters": table,
            "image_tokens": image_tokens,
            "device": device_name,
            "peak_flops": peak,
            "peak_name": peak_name,
        }
    )
