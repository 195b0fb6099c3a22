"""A synthetic cohort laid out as the predecessor (UMBRELLA/BrainVLM) lays it out, for migration tests.

``write_umbrella_forms(out)`` makes, from ``umbrella-pack synth``'s phantoms (so the sex signal is
learnable), the material a user of the predecessor brings:

- ``sMRI_freesurfer_256/{subjectkey}.nii.gz``: one flat folder of T1 NIfTIs;
- ``rsfMRI_SwiFT/img/{subjectkey}/frame_{i}.pt`` + ``global_stats.pt``: SwiFT frame folders;
- ``ABCD_phenotype_total.csv``: ``subjectkey, sex (1 male, 2 female), age, BMI_sds``;
- instruction files whose image paths are absolute *cluster* paths (``CLUSTER_T1``,
  ``CLUSTER_FMRI``) that ``--path-map`` rewrites to the folders above (``forms.path_maps``):
  - ``sex_classification/{train,test}_conversations.jsonl``: T1 JSONL, answers ``"female."``;
  - ``rsfmri_sex/{train,test}_conversations.jsonl``: the same task on ``fMRI`` frame folders;
  - ``sex_comparison_conversations/{train,test}/{key}_{same|different}_sex_comparison.json``:
    T3 JSON folders, one object a file, sentence answers, ``metadata.subject_label``,
    ``reference_label`` and ``comparison_type``;
  - ``sex_comparison_simple/{train,test}_conversations.jsonl``: T3 JSONL, short answers;
- ``umbrella_llava_train.yaml``: the predecessor's run YAML (``sMRI``/``fMRI`` blocks, a
  ``wandb.API_KEY`` that must never be copied);
- ``hf_deepspeed_zero2.json``: an HF-Trainer-style DeepSpeed JSON: no ``optimizer`` section,
  ``"auto"`` values, an ``offload_optimizer`` block.

The forms imitate the predecessor's public ``sample_data/`` and ``project/config/`` (texts
paraphrased where they are prose); nothing is copied from it. Every record's label is its
``metadata.subject_label``. Reused by tests/pack, tests/train and tests/cli (the README test and
the end-to-end migration test).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLUSTER_ROOT = "/pscratch/sd/u/user/data/1.ABCD"
CLUSTER_T1 = f"{CLUSTER_ROOT}/2.sMRI_freesurfer_256"
CLUSTER_FMRI = f"{CLUSTER_ROOT}/3.rsfMRI_SwiFT/img"
FAKE_WANDB_KEY = "not-a-real-key-0000000000000000000000000"

T1_PROMPT = "Analyze this T1-weighted brain MRI scan. Determine the biological sex of the subject."
FMRI_PROMPT = "Analyze this resting-state fMRI. Determine the biological sex of the subject."
REF_PROMPT = (
    "Here is a T1-weighted brain MRI from a {label} participant. "
    "This will serve as your reference scan."
)
ACK = "Understood. I've analyzed the reference {label} brain scan."
QUERY_PROMPT = (
    "Analyze this scan relative to the reference. Classify the biological sex and explain key "
    "differences."
)
SAME_ANSWER = (
    "This scan likely belongs to a {label} subject. Key features align with the reference {label} "
    "scan in terms of overall brain volume and regional proportions."
)
DIFFERENT_ANSWER = (
    "This scan likely belongs to a {label} subject. Unlike the reference {ref} scan, this shows "
    "structural characteristics typical of {label} neuroanatomy."
)


@dataclass
class UmbrellaForms:
    """Where each piece was written; ``instructions[name][split]`` is a file or a folder."""

    root: Path
    t1_dir: Path
    frames_dir: Path
    phenotypes: Path
    old_yaml: Path
    ds_json: Path
    instructions: dict[str, dict[str, Path]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # subjectkey -> "male" | "female"
    splits: dict[str, list[str]] = field(default_factory=dict)  # "train"/"test" -> keys

    @property
    def path_maps(self) -> list[str]:
        """The ``--path-map OLD=NEW`` arguments that point the cluster paths here."""
        return [f"{CLUSTER_T1}={self.t1_dir}", f"{CLUSTER_FMRI}={self.frames_dir}"]

    def files(self, split: str, names: tuple[str, ...] | None = None) -> list[Path]:
        """The instruction files/folders of one split (``train`` or ``test``)."""
        return [v[split] for k, v in self.instructions.items() if names is None or k in names]


def _image(modality: str, path: str) -> dict[str, Any]:
    return {"type": "image", "modality": modality, "image_path": path}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def single_task(key: str, label: str, modality: str, path: str, prompt: str) -> dict[str, Any]:
    """T1/rsfMRI classification in the predecessor's form: image first, answer ``"female."``."""
    return {
        "task_id": f"{key}_sex_classification",
        "task_type": "T1",
        "subject_ids": [key],
        "modalities": [modality],
        "images": [{"path": path, "token": "<image>", "modality": modality}],
        "conversations": [
            {"role": "user", "content": [_image(modality, path), _text(prompt)]},
            {"role": "assistant", "content": [_text(f"{label}.")]},
        ],
        "metadata": {"subject_id": key, "subject_label": label, "task": "sex_classification"},
    }


def comparison_task(
    ref: str, ref_label: str, query: str, label: str, paths: dict[str, str], sentence: bool
) -> dict[str, Any]:
    """T3 in the predecessor's form: reference scan, acknowledgement, query scan, answer."""
    kind = "same" if ref_label == label else "different"
    if sentence:
        template = SAME_ANSWER if kind == "same" else DIFFERENT_ANSWER
        answer = template.format(label=label, ref=ref_label)
    else:
        answer = f"{label}."
    return {
        "task_id": f"{query}_{kind}_sex_comparison",
        "task_type": "T3",
        "subject_ids": [ref, query],
        "modalities": ["sMRI", "sMRI"],
        "images": [
            {"path": paths[ref], "token": "<image>", "modality": "sMRI"},
            {"path": paths[query], "token": "<image>", "modality": "sMRI"},
        ],
        "conversations": [
            {
                "role": "user",
                "content": [_text(REF_PROMPT.format(label=ref_label)), _image("sMRI", paths[ref])],
            },
            {"role": "assistant", "content": [_text(ACK.format(label=ref_label))]},
            {"role": "user", "content": [_text(QUERY_PROMPT), _image("sMRI", paths[query])]},
            {"role": "assistant", "content": [_text(answer)]},
        ],
        "metadata": {
            "subject_id": query,
            "subject_label": label,
            "reference_id": ref,
            "reference_label": ref_label,
            "comparison_type": kind,
            "task": "sex_classification_via_comparison",
        },
    }


def old_yaml(
    *, sequence_length: int = 4, img_size: int = 24, fmri_size: int = 8, max_epochs: int = 2
) -> dict[str, Any]:
    """The predecessor's run YAML (its UMBRELLA_gemini form: ``sMRI``/``fMRI``), sized small."""
    return {
        "wandb": {"API_KEY": FAKE_WANDB_KEY},
        "seed": 1234,
        "dataset": {
            "train_size": 0.8,
            "val_size": 0.1,
            "test_size": 0.1,
            "add_context": False,
            "sMRI": {
                "target": ["sex"],
                "img_size": [img_size] * 3,
                "study_sample": ["ABCD"],
                "meta_dir": [f"{CLUSTER_ROOT}/ABCD_phenotype_total.csv"],
                "img_dir": [CLUSTER_T1],
            },
            "fMRI": {
                "target": ["sex"],
                "img_size": [fmri_size] * 3 + [sequence_length],
                "study_sample": [],
                "img_dir": [],
                "dataset_split_num": 1,
                "sequence_length": sequence_length,
                "stride_between_seq": 1,
                "stride_within_seq": 1,
                "shuffle_time_sequence": False,
                "input_scaling_method": "znorm_minback",
                "label_scaling_method": "standardization",
                "dtype": "float16",
            },
        },
        "model": {
            "hf_name": "llava-hf/llava-interleave-qwen-0.5b-hf",
            "sMRI": {"patch_size": [8, 8, 8]},
            "fMRI": {"patch_size": [4, 4, 4, 2]},
        },
        "trainer": {
            "max_epochs": max_epochs,
            "learning_rate": 0.00005,
            "warmup_steps": 1,
            "weight_decay": 0.01,
            "per_device_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True,
            "mixed_precision": "bf16",
            "logging_steps": 1,
            "ckpt_dir": None,
            "resume_training": False,
        },
    }


HF_DS_JSON: dict[str, Any] = {
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 5e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "contiguous_gradients": True,
    },
}


def save_tiny_base(out: str | Path, seed: int = 123) -> Path:
    """A local "pretrained" base for ``--model-path``: the ``tiny`` architecture, random weights,
    saved unpatched by transformers (hub key layout) with its tokenizer."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from umbrella_ds.model import TINY_TOKENIZER_DIR, get_preset

    out = Path(out)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(get_preset("tiny").make_config()).save_pretrained(str(out))
    for f in TINY_TOKENIZER_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_umbrella_forms(
    out: str | Path,
    *,
    subjects: int = 12,
    seed: int = 0,
    t1_shape: tuple[int, int, int] = (24, 24, 24),
    frames: int = 4,
    rsfmri_shape: tuple[int, int, int] = (8, 8, 8),
) -> UmbrellaForms:
    """Write the predecessor's forms under ``out`` (see the module docstring); a few seconds."""
    from data_prep.synth import SEX_CODES, synth

    out = Path(out)
    cohort = out / ".synth"
    synth(cohort, subjects, seed, t1_shape, frames, rsfmri_shape)
    with open(cohort / "phenotypes.csv", newline="") as f:
        pheno = list(csv.DictReader(f))
    keys = [row["subjectkey"] for row in pheno]
    labels = {row["subjectkey"]: SEX_CODES[int(row["sex"])] for row in pheno}

    t1_dir = out / "sMRI_freesurfer_256"
    frames_dir = out / "rsfMRI_SwiFT" / "img"
    t1_dir.mkdir(parents=True)
    for key in keys:
        shutil.copy(cohort / "t1" / f"{key}.nii.gz", t1_dir / f"{key}.nii.gz")
    shutil.copytree(cohort / "rsfmri_frames" / "img", frames_dir)
    phenotypes = out / "ABCD_phenotype_total.csv"
    shutil.copy(cohort / "phenotypes.csv", phenotypes)
    shutil.rmtree(cohort)

    # Subjects alternate male/female (synth): an even count of at least 4 gives each split two of
    # each sex, so every query has a reference of either sex other than itself.
    if subjects < 8:
        raise ValueError("write_umbrella_forms: subjects must be >= 8")
    n_test = max(4, 2 * (len(keys) // 8))
    splits = {"train": sorted(keys[:-n_test]), "test": sorted(keys[-n_test:])}
    t1_paths = {k: f"{CLUSTER_T1}/{k}.nii.gz" for k in keys}
    forms = UmbrellaForms(
        out, t1_dir, frames_dir, phenotypes, out / "umbrella_llava_train.yaml",
        out / "hf_deepspeed_zero2.json", labels=labels, splits=splits,
    )  # fmt: skip
    names = (
        "sex_classification",
        "rsfmri_sex",
        "sex_comparison_conversations",
        "sex_comparison_simple",
    )
    forms.instructions = {name: {} for name in names}
    for split, members in splits.items():
        t1 = [single_task(k, labels[k], "sMRI", t1_paths[k], T1_PROMPT) for k in members]
        forms.instructions["sex_classification"][split] = _write_jsonl(
            out / "sex_classification" / f"{split}_conversations.jsonl", t1
        )
        fmri = [
            single_task(k, labels[k], "fMRI", f"{CLUSTER_FMRI}/{k}", FMRI_PROMPT) for k in members
        ]
        forms.instructions["rsfmri_sex"][split] = _write_jsonl(
            out / "rsfmri_sex" / f"{split}_conversations.jsonl", fmri
        )
        folder = out / "sex_comparison_conversations" / split
        folder.mkdir(parents=True)
        simple = []
        for j, query in enumerate(members):
            # One reference of each sex for every query: a "same" and a "different" comparison.
            for ref_label in ("male", "female"):
                ref = next(
                    members[(j + d) % len(members)]
                    for d in range(1, len(members) + 1)
                    if labels[members[(j + d) % len(members)]] == ref_label
                    and members[(j + d) % len(members)] != query
                )
                task = comparison_task(ref, ref_label, query, labels[query], t1_paths, True)
                kind = task["metadata"]["comparison_type"]
                (folder / f"{query}_{kind}_sex_comparison.json").write_text(
                    json.dumps(task, indent=2), encoding="utf-8"
                )
                simple.append(
                    comparison_task(ref, ref_label, query, labels[query], t1_paths, False)
                )
        forms.instructions["sex_comparison_conversations"][split] = folder
        forms.instructions["sex_comparison_simple"][split] = _write_jsonl(
            out / "sex_comparison_simple" / f"{split}_conversations.jsonl", simple
        )

    img = t1_shape[0]
    forms.old_yaml.write_text(
        yaml.safe_dump(old_yaml(sequence_length=frames, img_size=img, fmri_size=rsfmri_shape[0]),
                       sort_keys=False)
    )  # fmt: skip
    forms.ds_json.write_text(json.dumps(HF_DS_JSON, indent=4))
    return forms
