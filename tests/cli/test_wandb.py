"""``log.wandb_project`` logs for real: with ``WANDB_MODE=offline`` (no key, no network) the
run's losses, evaluation records and resolved config land in the offline W&B run under OUT/wandb,
and the W&B run id survives a restart. Without a key and not offline, training refuses to start
naming the setting (a tracking setting that logs nothing is worse than none)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from umbrella_ds.config import ConfigError, LogConfig, load_config
from umbrella_ds.train import preflight, wandb_log
from umbrella_ds.train.run_logging import RunLogger

pytest.importorskip("wandb")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def _offline_run(out: Path) -> Path:
    (run,) = sorted((out / "wandb").glob("offline-run-*"))
    return run


def _records(path: Path) -> list:
    """The protobuf records of an offline ``run-ID.wandb`` file: a 7-byte header (":W&B", magic
    0xBEE1, version 0), then LevelDB-log framing in 32 KiB blocks (crc32, length, type; a record
    is one FULL chunk or FIRST, MIDDLE..., LAST), each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


@pytest.mark.timeout(120)
def test_offline_run_holds_losses_eval_records_and_config(tmp_path, offline):
    cfg = load_config(None, ["log.wandb_project=umbrella-test", f"output_dir={tmp_path}"])
    logger = RunLogger(cfg.log, tmp_path, 0, 2, 0, config=cfg.to_dict())
    logger.write({"split": "start", "world_size": 1})
    for step, loss in ((1, 2.5), (2, 1.25)):
        logger.write({"split": "train", "step": step, "loss": loss, "lr": 1e-3, "skipped": False})
    logger.write({"split": "eval", "step": 2, "task": "t1_sex", "loss": 0.75, "accuracy": 0.8})
    logger.close()
    (log_file,) = _offline_run(tmp_path).glob("run-*.wandb")
    # wandb-core, a process of its own, may still be writing after finish(): the file is complete
    # once it holds the run's exit record.
    deadline = time.monotonic() + 60
    while True:
        records = _records(log_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.2)
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history.setdefault(items["_step"], {}).update(items)
    assert history[1]["train/loss"] == 2.5 and history[2]["train/loss"] == 1.25
    assert history[2]["eval/t1_sex/accuracy"] == 0.8 and history[2]["eval/t1_sex/loss"] == 0.75
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train"]["max_steps"] == cfg.train.max_steps
    assert config["log"]["wandb_project"] == "umbrella-test"
    assert run.project == "umbrella-test"
    # metrics.jsonl is written as before.
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    # A restart (requeued job) continues the same W&B run.
    run_id = (tmp_path / wandb_log.RUN_ID_FILE).read_text().strip()
    assert _offline_run(tmp_path).name.endswith(run_id)


def test_the_key_comes_only_from_the_environment(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_log.problem(None) is None
    assert "WANDB_API_KEY" in wandb_log.problem("p")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_log.problem("p") is None
    monkeypatch.delenv("WANDB_API_KEY")
    cfg = load_config(None, ["log.wandb_project=p"])
    with pytest.raises(ConfigError, match=r"^log.wandb_project='p': set WANDB_API_KEY"):
        preflight.check_run(cfg)
    assert LogConfig().wandb_project is None
