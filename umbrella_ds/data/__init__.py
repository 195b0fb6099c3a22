"""Instruction data: predecessor formats -> tokens, labels, images, batches."""

from .collate import collate_eval, collate_train
from .dataset import InstructionDataset
from .instructions import (
    ImageRef,
    InstructionError,
    MissingSubjectError,
    Task,
    Turn,
    load_instructions,
    normalize_modality,
    parse_task,
    resolve_subjects,
    subject_from_path,
)
from .loader import build_loader
from .render import (
    IGNORE_INDEX,
    EvalSample,
    RenderedSample,
    Renderer,
    RenderError,
    SampleTooLongError,
)
from .sampler import ResumableSampler

__all__ = [
    "IGNORE_INDEX",
    "EvalSample",
    "ImageRef",
    "InstructionDataset",
    "InstructionError",
    "MissingSubjectError",
    "RenderError",
    "RenderedSample",
    "Renderer",
    "ResumableSampler",
    "SampleTooLongError",
    "Task",
    "Turn",
    "build_loader",
    "collate_eval",
    "collate_train",
    "load_instructions",
    "normalize_modality",
    "parse_task",
    "resolve_subjects",
    "subject_from_path",
]
