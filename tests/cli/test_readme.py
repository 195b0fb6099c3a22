"""The README cannot drift: every command of its ```bash blocks runs, in order, on demo-sized data.

How the commands are made to run here, and nothing else changes in them:
- They run in a scratch directory laid out as the README assumes: ``configs/``, ``launch/`` and
  ``umbrella_ds/`` link to the repository; the user's own files are put under the names the
  README gives them: ``/data/abcd-bids`` (a BIDS tree made from a small synthetic cohort: T1w
  only, so the manifest's missing list names every subject's rsfMRI), ``test.jsonl`` (held-out
  instructions), ``new.nii.gz`` (a held-out subject's T1), ``runs/t1-lr2`` (a second run to
  compare: a copy of ``runs/t1``'s metrics) and ``configs/t1_sex_0.5b.yaml``, derived from the
  shipped file by changing only what names the user's machine or takes hours: the local 0.5B
  weights become the ``tiny`` preset at 32^3, the data paths the scratch ones, 20000 steps 4,
  the batch 4, no compilation, no loader workers, evaluation of 4 samples every 2 steps.
- "Coming from UMBRELLA/BrainVLM": ``/data/umbrella`` is the predecessor's material as it lays
  it out (tests/helpers/umbrella_forms.py: a flat NIfTI folder, SwiFT frame folders, instruction
  files with absolute cluster paths that the README's ``--path-map`` rewrites, a phenotype CSV,
  its run YAML at T1 32^3 and rsfMRI 8^3 x 4 frames, one epoch), and ``models/llava-interleave-qwen-0.5b-hf``
  a saved ``tiny`` base.
- Multi-hour or many-machine values are made small by the substitutions in ``SUBSTITUTIONS``
  (``--t1-size 96 96 96`` -> 32^3, ``--workers 8`` -> 2, ``--num_gpus 8`` -> 2, ``mpirun -np 32``
  -> 2 oversubscribed ranks as root, ``train.max_steps=2000`` -> 2); each must match somewhere,
  so a README edit that drops one is noticed too.
- ``make demo`` / ``make test`` are not re-run (CI runs them).
- ``sbatch`` lines are checked, not submitted: the script exists and parses (``bash -n``), every
  variable the line sets is one the script reads, and ``OVERRIDES`` are valid ``--set`` pairs for
  the line's ``CONFIG``. Why not submit them: the batch scripts themselves run on a real two-node
  cluster in tests/slurm (minutes, root only), and the README's lines ask for GPUs
  (``--gpus-per-node=4``) the local cluster does not have.
Any command that exits non-zero fails the test, with its output. About 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BIDS_DIR = "/data/abcd-bids"
UMBRELLA_DIR = "/data/umbrella"
SUBJECTS = 20

# (README text, what runs here): each must occur in the README.
SUBSTITUTIONS = [
    ("--t1-size 96 96 96", "--t1-size 32 32 32"),
    ("--workers 8", "--workers 2"),
    ("--num_gpus 8", "--num_gpus 2"),
    ("mpirun -np 32", "mpirun -np 2 --oversubscribe"),
    ("train.max_steps=2000 ", "train.max_steps=2 "),
    ("--world-size 8", "--world-size 1"),
    ("--rsfmri-size 96 96 96", "--rsfmri-size 8 8 8"),
]


def readme_commands(text: str) -> list[str]:
    """Every command of the README's ```bash blocks, continuation lines joined, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return [c for c in commands if not c.startswith("#")]


def _derived_config(work: Path) -> None:
    """configs/t1_sex_0.5b.yaml with the user's machine and the hours taken out (see above)."""
    cfg = yaml.safe_load((REPO / "configs" / "t1_sex_0.5b.yaml").read_text())
    cfg["model"] = {
        **cfg["model"],
        "preset": "tiny",
        "path": None,
        "init": None,
        "modalities": {"T1": {"size": [32, 32, 32], "patch": [8, 8, 8]}},
    }
    cfg["data"].update(shards="shards", num_workers=0)
    # device: asked for, as on any CPU machine under the deepspeed launcher (its CPU ranks get
    # CUDA_VISIBLE_DEVICES, which reads as allocated GPUs: umbrella_ds/train/env.py choose_device)
    cfg["train"].update(max_steps=4, global_batch=4, micro_batch=2, compile="none", warmup_steps=1)
    cfg["train"]["device"] = "cpu"
    cfg["checkpoint"].update(every_steps=2)
    cfg["eval"].update(every_steps=2, max_samples=4)
    cfg["log"].update(tensorboard=False, progress=False)
    (work / "configs").mkdir()
    (work / "configs" / "t1_sex_0.5b.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in (p.name for p in (REPO / "configs").iterdir() if p.name != "t1_sex_0.5b.yaml"):
        (work / "configs" / name).symlink_to(REPO / "configs" / name)


def _bids_tree(cohort: Path, root: Path) -> None:
    """The synthetic cohort as a BIDS dataset: sub-<key>/ses-baselineYear1Arm1/anat/..._T1w."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "synthetic", "BIDSVersion": "1.9.0"}')
    with open(cohort / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["participant_id\tsex\tage"]
    for row in rows:
        key, ses = row["subjectkey"], "baselineYear1Arm1"
        anat = root / f"sub-{key}" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{key}_ses-{ses}_run-01_T1w.nii.gz").symlink_to(cohort / row["T1"])
        lines.append(f"sub-{key}\t{row['sex']}\t{row['age']}")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    return env


def _umbrella_material(work: Path) -> Path:
    """The predecessor's forms standing in for /data/umbrella, and a local base to train on."""
    from helpers.umbrella_forms import old_yaml, save_tiny_base, write_umbrella_forms

    forms = write_umbrella_forms(work.parent / f"{work.name}-umbrella", subjects=12)
    old = old_yaml(img_size=32, fmri_size=8, sequence_length=4, max_epochs=1)
    forms.old_yaml.write_text(yaml.safe_dump(old, sort_keys=False))
    save_tiny_base(work / "models" / "llava-interleave-qwen-0.5b-hf")
    return forms.root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, Path]:
    """(scratch directory the commands run in, the directory standing in for /data/abcd-bids)."""
    work = tmp_path_factory.mktemp("readme")
    cohort = work.parent / f"{work.name}-cohort"
    subprocess.run(
        [BIN / "umbrella-pack", "synth", "--out", cohort, "--subjects", str(SUBJECTS), "--seed", "0",
         "--t1-shape", "24", "24", "24", "--frames", "4", "--rsfmri-shape", "8", "8", "8"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    bids = work.parent / f"{work.name}-bids"
    _bids_tree(cohort, bids)
    for name in ("launch", "umbrella_ds", "ds_configs"):
        (work / name).symlink_to(REPO / name)
    _derived_config(work)
    instructions = work / "data" / "abcd" / "instructions"
    instructions.mkdir(parents=True)
    for split in ("train", "eval"):
        shutil.copy(cohort / "instructions" / f"t1_sex_{split}.jsonl", instructions)
    shutil.copy(instructions / "t1_sex_eval.jsonl", work / "test.jsonl")
    held_out = (instructions / "t1_sex_eval.jsonl").read_text().splitlines()[0]
    key = re.search(r"NDARINV[0-9A-Z]+", held_out).group(0)
    shutil.copy(cohort / "t1" / f"{key}.nii.gz", work / "new.nii.gz")
    _umbrella_material(work)
    return work, bids


def _substitute(command: str, bids: Path, used: set[str]) -> str:
    for text, replacement in SUBSTITUTIONS:
        if text in command + " ":
            command = (command + " ").replace(text, replacement).rstrip()
            used.add(text)
    umbrella = bids.parent / f"{bids.name.removesuffix('-bids')}-umbrella"  # _umbrella_material
    return command.replace(BIDS_DIR, str(bids)).replace(UMBRELLA_DIR, str(umbrella))


def _check_sbatch(command: str) -> None:
    """The line's script exists and parses, reads every variable the line sets, and OVERRIDES
    are --set pairs its CONFIG accepts."""
    from umbrella_ds.config import load_config

    words = shlex.split(command)
    at = words.index("sbatch")
    assignments = dict(w.split("=", 1) for w in words[:at])
    script = REPO / next(w for w in words[at:] if w.endswith(".sbatch"))
    assert script.is_file(), command
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    sources = script.read_text() + (REPO / "launch" / "common.sh").read_text()
    for name in assignments:
        assert re.search(rf"\$\{{?{name}\b", sources), f"{script.name} does not read {name}"
    if "CONFIG" in assignments:
        load_config(REPO / assignments["CONFIG"], assignments.get("OVERRIDES", "").split())


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(1200)
def test_readme_commands_run_as_written(workdir):
    work, bids = workdir
    commands = readme_commands((REPO / "README.md").read_text())
    used: set[str] = set()
    ran = []
    for command in commands:
        program = command.split()[0] if "=" not in command.split()[0] else "sbatch"
        if program == "make":
            continue
        if program == "sbatch" or " sbatch " in f" {command} ":
            _check_sbatch(command)
            ran.append("sbatch")
            continue
        if program == "umbrella-report" and not (work / "runs" / "t1-lr2").exists():
            (work / "runs" / "t1-lr2").mkdir(parents=True)
            shutil.copy(work / "runs" / "t1" / "metrics.jsonl", work / "runs" / "t1-lr2")
        line = _substitute(command, bids, used)
        t0 = time.perf_counter()
        done = subprocess.run(
            ["bash", "-c", line], cwd=work, env=_env(), capture_output=True, text=True, timeout=400
        )
        output = f"$ {line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"README command failed ({done.returncode}):\n{output}"
        ran.append(f"{program} ({time.perf_counter() - t0:.0f} s)")
    unused = [text for text, _ in SUBSTITUTIONS if text not in used]
    assert not unused, f"the README no longer has {unused}: update SUBSTITUTIONS"
    programs = {r.split()[0] for r in ran}
    assert programs >= {
        "umbrella-pack", "mpirun", "umbrella-train", "deepspeed", "sbatch", "umbrella-eval",
        "umbrella-export", "umbrella-infer", "umbrella-report",
    }, ran  # fmt: skip
    # What the commands were for: the BIDS manifest packed, training resumed on 2 ranks, an answer.
    assert (work / "subjects.missing.csv").is_file() and (work / "shards" / "index.json").is_file()
    assert (work / "runs" / "t1" / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert (work / "reports" / "cmp" / "report.md").is_file()
    # Coming from UMBRELLA: every subject packed from the cluster paths, and a run trained on them.
    with open(work / "umbrella-subjects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["T1"] and r["rsfMRI"] and r["sex"] for r in rows)
    assert [r["subject_id"] for r in rows] == sorted(r["subject_id"] for r in rows)
    assert (work / "umbrella-subjects.missing.csv").read_text().count("\n") == 1  # header only
    converted = yaml.safe_load((work / "from-umbrella.yaml").read_text())
    assert list(converted["model"]["modalities"]) == ["T1", "rsfMRI"]
    assert "not-a-real-key" not in (work / "from-umbrella.yaml").read_text()
    assert (work / "runs" / "from-umbrella" / "checkpoints" / "latest").is_file()
    print("\n".join(ran))
