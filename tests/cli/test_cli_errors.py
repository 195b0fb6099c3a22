"""Every CLI's user errors: one ``error: WHERE: WHAT`` line on stderr, no traceback, exit 2;
internal failures keep their traceback; ``--debug`` / ``UMBRELLA_DEBUG=1`` show it for a user
error too; under the deepspeed launcher the line appears once and the launcher exits 2.

Most cases run the CLI's ``main`` in this process (no process start, nothing heavy imported
before the error); one 2-rank launch covers an error raised inside the training run after the
ranks joined (batch arithmetic), which is the path a SLURM user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.training import REPO, base_sets, run_train

from umbrella_ds import errors

DEMO = REPO / "configs" / "demo.yaml"


def _one_error_line(err: str, where: str) -> str:
    """The error line, checked to be the only line and to start with ``error: WHERE``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {where}"), err
    assert "Traceback" not in err
    return lines[0]


def _run(main, argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- the convention itself


def test_run_main_formats_user_errors_and_lets_failures_through(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)

    def user(_argv):
        raise errors.UsageError("--flag: bad\nsecond line")

    assert errors.run_main(user, []) == 2
    assert capsys.readouterr().err == "error: --flag: bad; second line\n"

    def crash(_argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # Python prints the traceback, exit 1
        errors.run_main(crash, [])


def test_debug_flag_and_env_show_the_traceback(capsys, monkeypatch):
    from umbrella_ds.train.cli import main as train_main

    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    rc, err = _run(train_main, ["--config", str(DEMO), "--set", "train.max_steps=many", "--debug"], capsys)  # fmt: skip
    assert rc == 2 and "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("error: train.max_steps: expected an integer")
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    rc, err = _run(train_main, ["--config", str(DEMO), "--set", "train.max_steps=many"], capsys)
    assert rc == 2 and "Traceback" in err


def test_only_rank_0_prints_unless_debugging(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    monkeypatch.setenv("RANK", "1")
    exc = errors.UsageError("--x: bad")
    errors.report(exc, debug=False)
    assert capsys.readouterr().err == ""
    errors.report(exc, debug=True)
    assert capsys.readouterr().err.rstrip().endswith("[rank 1] error: --x: bad")
    # mpirun inside a SLURM allocation: the MPI rank wins over the daemon's SLURM_PROCID.
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert errors.process_rank() == 3


# ---------------------------------------------------------------- umbrella-train


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("train.lr_schedule=cosine", "train.lr_schedule: unknown config key"),
        ("train.max_steps=many", "train.max_steps: expected an integer"),
        ("data.shards=/nonexistent/shards", "data.shards: /nonexistent/shards holds no index.json"),
        ("model.preset=llava-9000", "model.preset: 'llava-9000' is neither a preset"),
        ("checkpoint.keep_best=a/b/c", "checkpoint.keep_best='a/b/c': expected METRIC"),
        ("train.deepspeed=zero9", "train.deepspeed: expected one of"),
    ],
)
def test_train_config_errors(override, where, capsys, train_data):
    from umbrella_ds.train.cli import main as train_main

    sets = base_sets(train_data, train_data / "unused-out")
    rc, err = _run(train_main, ["--config", str(DEMO), "--set", *sets, override], capsys)
    assert rc == 2
    _one_error_line(err, where)


def test_train_file_errors(tmp_path, capsys, train_data):
    from umbrella_ds.train.cli import main as train_main

    rc, err = _run(train_main, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2
    _one_error_line(err, f"{tmp_path / 'nope.yaml'}: cannot read config")
    sets = base_sets(train_data, tmp_path / "out")
    gone = tmp_path / "gone.jsonl"
    rc, err = _run(train_main, ["--config", str(DEMO), "--set", *sets, f"data.train=[{gone}]"], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, f"data.train[0]: {gone}: no such instruction file")
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text("{not json")
    rc, err = _run(train_main, ["--config", str(DEMO), "--set", *sets, f"train.deepspeed={bad_ds}"], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, f"train.deepspeed: cannot read {bad_ds}")
    rc, err = _run(train_main, ["--config", str(DEMO), "--find-micro-batch", "--text-tokens", "0"], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, "--text-tokens: must be >= 1")


def test_errors_raised_while_reading_data_are_user_errors(tmp_path):
    """Raised deep in the library, they reach run_main as UserErrors naming file:line or key."""
    from helpers.data import t1_task

    from umbrella_ds.data import (
        MissingSubjectError,
        load_instructions,
        parse_task,
        resolve_subjects,
    )
    from umbrella_ds.eval.leakage import LeakageError, check_no_overlap

    bad = tmp_path / "a.jsonl"
    bad.write_text(json.dumps(t1_task()) + "\n{oops\n")
    with pytest.raises(errors.UserError, match=rf"^{bad}:2: malformed JSON"):
        load_instructions(bad)
    task = parse_task(t1_task(), "x")
    with pytest.raises(MissingSubjectError) as missing:
        resolve_subjects([task], set())
    assert isinstance(missing.value, errors.UserError)
    assert str(missing.value).startswith("data.missing_subjects: 1 task(s)")
    assert "set data.missing_subjects=skip" in str(missing.value)
    from umbrella_ds.train.checkpoint import find

    with pytest.raises(errors.UserError, match=rf"^{tmp_path / 'nope'}: not a checkpoint"):
        find(str(tmp_path / "nope"), tmp_path / "checkpoints")  # --resume PATH
    with pytest.raises(LeakageError) as leak:
        check_no_overlap([task], [task], allow=False)
    assert isinstance(leak.value, errors.UserError) and "data.allow_overlap" in str(leak.value)


def test_keep_best_and_batch_errors_are_config_errors():
    from umbrella_ds.config import ConfigError, load_config

    cfg = load_config(DEMO, ["train.global_batch=8", "train.micro_batch=8"])
    with pytest.raises(ConfigError, match=r"train.global_batch=8 is not divisible") as e:
        cfg.train.accumulation(2)
    assert isinstance(e.value, errors.UserError)


@pytest.mark.timeout(300)
def test_launcher_prints_the_error_once_and_exits_2(train_data, tmp_path):
    """Global batch 8 = micro-batch 8 x 2 ranks does not divide: found after the ranks joined,
    on both; rank 0 alone prints it, and the deepspeed launcher exits 2 (its first failing rank's
    status)."""
    sets = base_sets(train_data, tmp_path / "out", **{"train.global_batch": 8, "train.micro_batch": 8})  # fmt: skip
    proc = run_train(2, sets, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    lines = [line for line in text.splitlines() if "error: train.global_batch=8" in line]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith(
        "error: train.global_batch=8 is not divisible by train.micro_batch=8"
    )
    assert "Traceback" not in text


# ---------------------------------------------------------------- the other CLIs


def test_pack_errors(tmp_path, capsys):
    from data_prep.cli import main as pack_main

    rc, err = _run(pack_main, ["verify", str(tmp_path)], capsys)
    assert rc == 2
    _one_error_line(err, f"{tmp_path}: no index.json")
    rc, err = _run(pack_main, ["build", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, f"manifest {tmp_path / 'm.csv'}: no such file")
    rc, err = _run(pack_main, ["manifest", "--bids", str(tmp_path / "nope"), "--out", str(tmp_path / "m.csv")], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, "--bids")


def test_eval_export_infer_report_path_errors(tmp_path, capsys, train_data):
    from umbrella_ds.eval.eval_cli import main as eval_main
    from umbrella_ds.infer import main as infer_main
    from umbrella_ds.report import main as report_main
    from umbrella_ds.train.export import main as export_main

    rc, err = _run(export_main, [str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert rc == 2
    _one_error_line(err, f"{tmp_path}: not a checkpoint")
    rc, err = _run(eval_main, ["--checkpoint", str(tmp_path), "--data", str(tmp_path), "--instructions", str(tmp_path)], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, f"--checkpoint {tmp_path}: ")
    rc, err = _run(infer_main, ["--model", str(tmp_path), "--prompt", "q", "--scan", "T1=x.nii.gz"], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, f"--model {tmp_path}: no export.json")
    rc, err = _run(infer_main, ["--model", str(tmp_path), "--prompt", "q", "--scan", "T1"], capsys)
    assert rc == 2
    _one_error_line(err, "--scan 'T1': expected MODALITY=PATH")
    rc, err = _run(infer_main, ["--model", str(tmp_path), "--prompt", "q", "--scan", "DWI=x"], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, "--scan 'DWI=x': unknown modality")
    rc, err = _run(infer_main, ["--model", str(tmp_path), "--prompt", "q", "--scan", "T1=x", "--base", "nope"], capsys)  # fmt: skip
    assert rc == 2
    _one_error_line(err, "--base: 'nope' is neither a preset")
    rc, err = _run(report_main, [str(tmp_path / "r"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    _one_error_line(err, f"{tmp_path / 'r'}: no such run directory")


# ---------------------------------------------------------------- umbrella-infer prompts


def _turn_parts(task):
    return [(p if isinstance(p, str) else p.modality) for p in task.turns[0].parts]


def test_infer_prompt_placeholders_stand_where_the_user_puts_them():
    from umbrella_ds.infer import InferError, build_task

    t1, rs = ("T1", Path("a.nii.gz")), ("rsfMRI", Path("b.nii.gz"))
    # One placeholder per scan, in the order of the --scan flags.
    task = build_task("Compare <image> with <image>: same subject?", [t1, rs])
    assert _turn_parts(task) == ["Compare ", "T1", " with ", "rsfMRI", ": same subject?"]
    # "<image>\nQ" renders exactly as a prompt without placeholders: images first.
    with_ph, without = (
        build_task("<image>\nWhat is the sex?", [t1]),
        build_task("What is the sex?", [t1]),
    )
    assert [t.text for t in with_ph.turns] == [t.text for t in without.turns]
    assert with_ph.images == without.images
    assert _turn_parts(build_task("<image> What is the sex?", [t1])) == ["T1", " What is the sex?"]
    with pytest.raises(InferError, match=r"^--prompt: 2 <image> placeholder\(s\) but 1 --scan"):
        build_task("<image> and <image>?", [t1])
