"""Instruction records, the tiny tokenizer and a fake shard reader for the data tests."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "umbrella_ds" / "model" / "presets" / "tiny-tokenizer"
SUBJECT_A = "NDARINV007W6H7B"
SUBJECT_B = "NDARINV1111AAAA"


@lru_cache(maxsize=1)
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def t1_task(subject: str = SUBJECT_A, answer: str = "female.", task_id: str | None = None) -> dict:
    """A predecessor-format T1 task (as `umbrella-pack synth` and the predecessor write them)."""
    path = f"/data/abcd/T1/{subject}.nii.gz"
    return {
        "task_id": task_id or f"t1_sex_{subject}",
        "task_type": "T1",
        "subject_ids": [subject],
        "modalities": ["sMRI"],
        "images": [{"path": path, "token": "<image>", "modality": "sMRI"}],
        "conversations": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "modality": "sMRI", "image_path": path},
                    {"type": "text", "text": "What is the sex of this subject?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "metadata": {"subject_id": subject, "subject_label": answer.rstrip("."), "task": "sex"},
    }


def t3_task(ref: str = SUBJECT_A, query: str = SUBJECT_B, modality: str = "sMRI") -> dict:
    """A predecessor-format T3 comparison: reference scan, acknowledgement, query scan, answer.

    The query image stands after some text, to check it is kept where it stands.
    """
    suffix = ".nii.gz" if modality == "sMRI" else ""
    paths = [f"/data/{s}{suffix}" for s in (ref, query)]
    return {
        "task_id": f"t3_{ref}_{query}",
        "task_type": "T3",
        "subject_ids": [ref, query],
        "modalities": [modality, modality],
        "images": [{"path": p, "token": "<image>", "modality": modality} for p in paths],
        "conversations": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "modality": modality, "image_path": paths[0]},
                    {"type": "text", "text": "Reference subject: male."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Understood."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Now this one:"},
                    {"type": "image", "modality": modality, "image_path": paths[1]},
                    {"type": "text", "text": "Same sex?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "no."}]},
        ],
        "metadata": {"subject_id": query, "subject_label": "female", "task": "sex_comparison"},
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class FakeShards:
    """Duck-typed shard reader: T1 voxels encode the subject, rsfMRI voxels encode frame number."""

    def __init__(self, subjects, t1_shape=(4, 5, 6), rs_shape=(3, 3, 3), frames=20):
        self.subjects = list(subjects)
        self.t1_shape, self.rs_shape, self.frames = t1_shape, rs_shape, frames

    def has(self, subject, modality):
        return subject in self.subjects

    def num_frames(self, subject):
        return self.frames

    def read(self, subject, modality):
        assert modality == "T1"
        base = float(self.subjects.index(subject))
        grid = np.arange(np.prod(self.t1_shape), dtype=np.float32).reshape(self.t1_shape)
        return (grid / grid.size + base).astype(np.float16)

    def read_window(self, subject, modality, start, length):
        assert modality == "rsfMRI" and start >= 0 and start + length <= self.frames
        t = np.arange(start, start + length, dtype=np.float16)
        return np.broadcast_to(t, (*self.rs_shape, length)).copy()
