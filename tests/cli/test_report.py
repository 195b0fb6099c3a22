"""umbrella-report: loss curves (PNG) and a markdown table of several runs' metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from umbrella_ds.report import ReportError, load_run, main


def write_run(path: Path, records: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (path / "metrics.jsonl").write_text(text)
    return path


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_run(
        tmp_path / "a" / "run",
        [
            {"split": "start", "step": 0, "ranks": []},
            *({"split": "train", "step": s, "loss": 5.0 / s} for s in range(1, 6)),
            {"split": "eval", "step": 5, "task": "t1_sex", "loss": 0.7, "accuracy": 0.75,
             "balanced_accuracy": 0.7, "auroc": 0.8, "count": 8, "unparseable": 1,
             "ci95": {"accuracy": [0.5, 1.0]}},
            {"split": "eval", "step": 5, "task": "all", "loss": 0.7, "accuracy": 0.75, "count": 8},
            # Resumed after step 3: steps 4, 5 logged again; the later records win.
            {"split": "start", "step": 3, "ranks": []},
            {"split": "train", "step": 4, "loss": 1.25},
            {"split": "train", "step": 5, "loss": 0.9},
        ],
        tail='{"split": "train", "st',  # a run still writing its last line
    )  # fmt: skip
    b = write_run(
        tmp_path / "b" / "run",
        [
            *({"split": "train", "step": s, "loss": 3.0} for s in range(1, 4)),
            {"split": "eval", "step": 3, "task": "bmi", "loss": 1.5, "mae": 0.42,
             "pearson_r": 0.3, "count": 8, "unparseable": 0},
        ],
    )  # fmt: skip
    return a, b


def test_load_run_keeps_the_later_record_of_a_step(runs: tuple[Path, Path]) -> None:
    run = load_run(runs[0])
    assert run.last_step == 5 and run.final_loss == pytest.approx(0.9)
    assert run.train[4] == pytest.approx(1.25)
    assert set(run.last_eval()) == {"t1_sex", "all"}
    assert run.eval_loss_curve() == [(5, 0.7)]


@pytest.mark.timeout(60)
def test_report_writes_png_and_markdown(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md == capsys.readouterr().out.split("wrote ")[0]
    # Both runs share the name "run": labelled with their parent folder.
    assert "| a/run | 5 | 0.9 | 5 |" in md
    assert "| b/run | 3 | 3 | 3 |" in md
    assert "| a/run | t1_sex | 0.75 [0.5, 1] | 0.7 | 0.8 | – | – | 0.7 | 8 | 1 |" in md
    assert "| b/run | bmi | – | – | – | 0.42 | 0.3 | 1.5 | 8 | 0 |" in md
    assert "95% bootstrap interval" in md


@pytest.mark.timeout(60)
def test_malformed_line_inside_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = write_run(tmp_path / "bad", [{"split": "train", "step": 1, "loss": 1.0}])
    with open(bad / "metrics.jsonl", "a") as f:
        f.write("not json\n" + json.dumps({"split": "train", "step": 2, "loss": 1.0}) + "\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: malformed"):
        load_run(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty/metrics.jsonl: no such file"):
        load_run(tmp_path / "empty")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "umbrella_ds.report",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "missing: no such run directory" in r.stderr  # a user error
