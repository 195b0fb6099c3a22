"""Checks of what a run config or a flag names, before any process group or model exists.

Why here and not where the path is first used: there, a missing shard directory or an unknown
preset surfaces as a ShardError or ValueError from deep in the build, after the ranks have joined
and DeepSpeed has started, and reads like a crash. Checked first, it is one line naming the key
(``data.shards``, ``model.preset``, ``--base``) and exit status 2 (umbrella_ds/errors.py).
Every rank runs the same checks on the same inputs, so every rank fails the same way.
"""

from __future__ import annotations

from pathlib import Path

from umbrella_ds.config import ConfigError, RunConfig
from umbrella_ds.errors import UsageError
from umbrella_ds.train import wandb_log

INDEX = "index.json"  # the shard index (umbrella_ds.shards.INDEX_NAME), without importing h5py


def model_source_problem(source: str) -> str | None:
    """Why ``source`` is neither a preset name nor a Hugging Face model directory, or None."""
    from umbrella_ds.model.presets import list_presets

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{path} has no config.json (not a Hugging Face model directory)"
        return None
    if source in list_presets():
        return None
    return f"{source!r} is neither a preset ({', '.join(list_presets())}) nor a local directory"


def check_base(base: str | None) -> None:
    """``--base`` of umbrella-eval / -export / -infer."""
    if base is not None and (problem := model_source_problem(base)):
        raise UsageError(f"--base: {problem}")


def check_shards(path: str, where: str) -> None:
    """A packed shard directory: ``index.json`` is there (its content is checked when opened)."""
    if not path:
        raise ConfigError(f"{where}: not set (a packed shard directory, umbrella-pack build --out)")
    if not (Path(path) / INDEX).is_file():
        raise ConfigError(
            f"{where}: {path} holds no {INDEX} (not a packed shard directory; "
            "umbrella-pack build --manifest ... --out DIR writes one)"
        )


def check_run(cfg: RunConfig) -> None:
    """What training needs to exist: shards, instruction files, the model, the DeepSpeed JSON."""
    from umbrella_ds.train.ds_setup import load_ds_json

    if problem := wandb_log.problem(cfg.log.wandb_project):
        raise ConfigError(f"log.wandb_project={cfg.log.wandb_project!r}: {problem}")
    check_shards(cfg.data.shards, "data.shards")
    for key in ("train", "eval"):
        for i, f in enumerate(getattr(cfg.data, key)):
            if not Path(f).exists():
                raise ConfigError(f"data.{key}[{i}]: {f}: no such instruction file or folder")
    key = "model.path" if cfg.model.path else "model.preset"
    if problem := model_source_problem(cfg.model.source):
        raise ConfigError(f"{key}: {problem}")
    from umbrella_ds.model.build import tokenizer_problem

    if problem := tokenizer_problem(cfg.model.source):
        raise ConfigError(f"{key}: {problem}")
    load_ds_json(cfg.train.deepspeed)  # ConfigError naming train.deepspeed if unreadable


def check_keep_best_task(cfg: RunConfig, inputs) -> None:
    """A keep_best naming a task the evaluation set does not have would never record a best
    checkpoint; say so before training rather than after it (``inputs``: train.inputs.Inputs)."""
    from umbrella_ds.eval.evaluate import task_name

    key = cfg.checkpoint.keep_best_key()
    if key is None or key[0] == "all" or inputs.eval_set is None:
        return
    tasks = sorted({task_name(t) for t in inputs.eval_set.tasks})
    if key[0] not in tasks:
        raise ConfigError(
            f"checkpoint.keep_best={cfg.checkpoint.keep_best!r}: the evaluation set has no task "
            f"{key[0]!r} (its tasks: {tasks}; a bare metric name uses the mean over them)"
        )
