"""checkpoint.keep_best: a bare metric ranks by the mean over tasks, TASK/METRIC by one task.

The engine-level behaviour (the best checkpoint survives keep_last, `best` names it) is tested
on 2 ranks in test_eval_infer.py; here, which record a name reads, which direction is better,
and that a task the evaluation set lacks is refused before training.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers.training import base_sets, check, run_train

from umbrella_ds.config import CheckpointConfig, ConfigError, RunConfig
from umbrella_ds.train.checkpoint import Checkpointer
from umbrella_ds.train.preflight import check_keep_best_task


def _records(step_auroc: float, step_loss: float, mean_accuracy: float) -> list[dict]:
    return [
        {"split": "eval", "task": "t1_sex", "auroc": step_auroc, "accuracy": 0.5},
        {"split": "eval", "task": "age", "mae": 2.0},
        {"split": "eval", "task": "all", "loss": step_loss, "accuracy": mean_accuracy},
    ]


def _best(root) -> tuple[str, float]:
    best = json.loads((root / "best.json").read_text())
    assert (root / "best").read_text().strip() == best["tag"]
    return best["tag"], best["value"]


@pytest.mark.parametrize(
    ("name", "key"),
    [("accuracy", ("all", "accuracy")), ("t1_sex/auroc", ("t1_sex", "auroc")), (None, None)],
)
def test_keep_best_key(name, key):
    assert CheckpointConfig(keep_best=name).keep_best_key() == key


def test_per_task_metric_ranks_by_that_task(tmp_path):
    ck = Checkpointer(CheckpointConfig(keep_best="t1_sex/auroc"), tmp_path, rank=0, world_size=1)
    ck.record_eval(tmp_path / "step-0000001", _records(0.6, 1.0, 0.9))
    ck.record_eval(tmp_path / "step-0000002", _records(0.8, 2.0, 0.1))  # the task's best
    ck.record_eval(tmp_path / "step-0000003", _records(0.7, 0.5, 0.99))  # best mean, not task
    assert _best(tmp_path) == ("step-0000002", 0.8)


def test_bare_metric_reads_the_summary_and_loss_is_lower_better(tmp_path):
    ck = Checkpointer(CheckpointConfig(keep_best="loss"), tmp_path, rank=0, world_size=1)
    for step, loss in ((1, 1.0), (2, 0.4), (3, 0.7)):
        ck.record_eval(tmp_path / f"step-{step:07d}", _records(0.9, loss, 0.5))
    assert _best(tmp_path) == ("step-0000002", 0.4)


def test_missing_value_records_nothing_and_says_so(tmp_path, caplog):
    ck = Checkpointer(CheckpointConfig(keep_best="age/auroc"), tmp_path, rank=0, world_size=1)
    ck.record_eval(tmp_path / "step-0000001", _records(0.9, 1.0, 0.5))
    assert not (tmp_path / "best.json").exists()
    assert "age/auroc" in caplog.text and "t1_sex" in caplog.text


def test_only_rank_zero_records(tmp_path):
    ck = Checkpointer(CheckpointConfig(keep_best="accuracy"), tmp_path, rank=1, world_size=2)
    ck.record_eval(tmp_path / "step-0000001", _records(0.9, 1.0, 0.5))
    assert not (tmp_path / "best.json").exists()


def _inputs(*task_names: str):
    tasks = [SimpleNamespace(metadata={"task": n}, task_type="classification") for n in task_names]
    return SimpleNamespace(eval_set=SimpleNamespace(tasks=tasks))


def test_unknown_task_is_refused_before_training():
    cfg = RunConfig()
    cfg.checkpoint.keep_best = "t1_age/accuracy"
    with pytest.raises(ConfigError, match=r"no task 't1_age'.*\['t1_sex', 't3_sex'\]"):
        check_keep_best_task(cfg, _inputs("t1_sex", "t3_sex", "t1_sex"))
    cfg.checkpoint.keep_best = "t3_sex/accuracy"
    check_keep_best_task(cfg, _inputs("t1_sex", "t3_sex"))  # known task: accepted
    cfg.checkpoint.keep_best = "accuracy"
    check_keep_best_task(cfg, _inputs("t1_sex"))  # the mean: no task to check


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_evaluations_between_checkpoints_still_keep_a_best(train_data, tmp_path):
    """eval.every_steps=3 with checkpoint.every_steps=2: the step-3 evaluation has no scheduled
    checkpoint to record, so with keep_best set the engine saves one first (it used to record no
    best at all, silently)."""
    out = tmp_path / "run"
    sets = base_sets(
        train_data, out,
        **{"train.max_steps": 4, "train.global_batch": 2, "train.micro_batch": 2,
           "train.bf16": "false", "checkpoint.every_steps": 2, "checkpoint.keep_last": 1,
           "checkpoint.keep_best": "loss", "eval.every_steps": 3, "eval.at_end": "false",
           "eval.max_new_tokens": 2, "eval.max_samples": 2},
    )  # fmt: skip
    check(run_train(1, sets, timeout=240))
    ckpts = out / "checkpoints"
    assert _best(ckpts)[0] == "step-0000003"
    assert (ckpts / "step-0000003" / "meta.json").is_file()  # kept as the best, past keep_last
