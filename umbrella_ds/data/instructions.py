"""Readers of the predecessor's instruction files -> `Task` records.

Accepted inputs (see docs/ARCHITECTURE.md, "Data"):

- JSONL, one task object a line (`*.jsonl`, or any file whose whole text is not one JSON value);
- a JSON array of task objects, or a single task object, in a `.json` file;
- a folder of `.json` / `.jsonl` files (read in sorted name order);
- per task, the current form ``{"task_id", "task_type", "subject_ids", "modalities", "images":
  [{"path", "modality"}], "conversations": [{"role", "content": str | [{"type": "image"|"text",
  ...}]}], "metadata"}`` or the older form ``{"subject_id", "modality_paths": {...},
  "conversations": [{"from": "human"|"gpt", "value": "... <image> ..."}]}``.

Images are never opened from the paths in these files: a path only names a subject (its file
stem, or its folder name for frame folders), and the image itself is read from the packed shards
by subject id and modality. Relative paths therefore need no base directory.

Where an image's subject comes from, first match wins:
1. ``subject_ids`` when it holds one id per image (positional);
2. the image path's file stem (``.../NDARINV007W6H7B.nii.gz`` -> ``NDARINV007W6H7B``; a frame
   folder ``.../img/NDARINV007W6H7B/`` -> its name);
3. the task's single subject (``subject_ids`` of length one, ``metadata.subject_id``, ``subject_id``).

In list-form content an image part and a neighbouring text part are joined with one newline
(``<image>\\nIs this ...``), the LLaVA convention; the image stays where it stands.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from umbrella_ds import modality as modality_table
from umbrella_ds.errors import UserError

IMAGE_PLACEHOLDER = "<image>"

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
# Longest first so ".nii.gz" wins over ".gz".
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".h5", ".hdf5", ".npy", ".npz", ".pt", ".pth", ".gz")


class InstructionError(UserError, ValueError):
    """An instruction file that cannot be turned into tasks; the message names file and line."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a task: read from the shards as (subject_id, modality).

    ``path`` is the file's own path, kept only for ``umbrella-pack manifest --instructions``
    (which finds the images to pack from it); it takes no part in equality or hashing."""

    subject_id: str
    modality: str
    path: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Turn:
    """One chat turn; parts keep text and images in their order of appearance."""

    role: Literal["user", "assistant", "system"]
    parts: tuple[str | ImageRef, ...]

    @property
    def text(self) -> str:
        """The turn's text with images as `<image>` (what a chat template would see)."""
        return "".join(IMAGE_PLACEHOLDER if isinstance(p, ImageRef) else p for p in self.parts)


@dataclass(frozen=True)
class Task:
    """One instruction sample, independent of file format and tokenizer."""

    task_id: str
    task_type: str
    images: tuple[ImageRef, ...]
    turns: tuple[Turn, ...]
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    source: str = ""

    @property
    def subject_ids(self) -> tuple[str, ...]:
        return tuple(im.subject_id for im in self.images)


def normalize_modality(name: str) -> str:
    """Map the predecessor's modality names (sMRI/T1, fMRI/rsfMRI) to ours; KeyError if unknown.

    The spellings are the modality table's (``umbrella_ds.modality``), case-insensitive."""
    try:
        return modality_table.get(name).name
    except modality_table.UnknownModalityError:
        raise KeyError(name) from None


def subject_from_path(path: str) -> str:
    """Subject id named by an image path: file stem without image suffixes, or the folder name."""
    name = Path(str(path).rstrip("/\\")).name
    lowered = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return name


# ------------------------------------------------------------------------------------------------
# files -> raw objects with their source


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as err:
            raise InstructionError(
                f"{source}: malformed JSON ({err.msg}, column {err.colno})"
            ) from err


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InstructionError(f"{path}: cannot read instruction file ({err})") from err
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, text)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        nonblank = [ln for ln in text.splitlines() if ln.strip()]
        if len(nonblank) > 1 and nonblank[0].lstrip().startswith("{"):
            # JSONL under another suffix: per-line parsing names the bad line.
            yield from _iter_jsonl(path, text)
            return
        raise InstructionError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
    if isinstance(value, list):
        for i, obj in enumerate(value):
            yield f"{path}[{i}]", obj
    else:
        yield str(path), value


def _iter_sources(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl")
        )
        if not files:
            raise InstructionError(f"{path}: folder holds no .json or .jsonl files")
        for f in files:
            yield from _iter_file(f)
    elif path.is_file():
        yield from _iter_file(path)
    else:
        raise InstructionError(f"{path}: no such instruction file or folder")


# ------------------------------------------------------------------------------------------------
# one raw object -> Task


@dataclass
class _Placeholder:
    modality: str | None
    path: str | None


class _TaskParser:
    """Parses one object; every error it raises names the object's source."""

    def __init__(self, obj: Any, source: str, default_id: str) -> None:
        if not isinstance(obj, Mapping):
            raise InstructionError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        self.obj = obj
        self.source = source
        self.task_id = str(obj.get("task_id") or obj.get("id") or default_id)

    def fail(self, reason: str) -> InstructionError:
        return InstructionError(f"{self.source}: task {self.task_id!r}: {reason}")

    def modality(self, name: Any) -> str:
        try:
            return normalize_modality(name)
        except KeyError:
            known = ", ".join(modality_table.spellings())
            raise self.fail(f"unknown modality {name!r} (known: {known})") from None

    def declared_images(self) -> list[_Placeholder] | None:
        """Task-level image list (current form) or modality_paths (older form), if any."""
        obj = self.obj
        if "images" in obj:
            images = obj["images"]
            if not isinstance(images, list):
                raise self.fail("'images' must be a list")
            modalities = obj.get("modalities") or []
            out = []
            for k, im in enumerate(images):
                if isinstance(im, str):
                    mod = modalities[k] if k < len(modalities) else None
                    out.append(_Placeholder(mod, im))
                elif isinstance(im, Mapping):
                    mod = im.get("modality") or (modalities[k] if k < len(modalities) else None)
                    out.append(_Placeholder(mod, im.get("path") or im.get("image_path")))
                else:
                    raise self.fail(f"images[{k}] must be an object or a path string")
            return out
        if "modality_paths" in obj:
            mp = obj["modality_paths"]
            if not isinstance(mp, Mapping):
                raise self.fail("'modality_paths' must be an object {modality: path}")
            out = []
            for mod, paths in mp.items():
                for p in paths if isinstance(paths, list) else [paths]:
                    out.append(_Placeholder(mod, p))
            return out
        return None

    def turn_parts(self, content: Any, turn_no: int) -> list[str | _Placeholder]:
        """Content -> text and placeholders in order (images not yet paired with declarations)."""
        if isinstance(content, str):
            return _split_text(content)
        if not isinstance(content, list):
            raise self.fail(f"turn {turn_no}: content must be a string or a list of parts")
        parts: list[str | _Placeholder] = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                piece: list[str | _Placeholder] = _split_text(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                piece = _split_text(str(part.get("text", "")))
            elif isinstance(part, Mapping) and part.get("type") == "image":
                piece = [
                    _Placeholder(part.get("modality"), part.get("image_path") or part.get("path"))
                ]
            else:
                raise self.fail(
                    f"turn {turn_no} part {j}: expected a text or image part, got {part!r}"
                )
            if (
                parts
                and piece
                and (isinstance(parts[-1], _Placeholder) or isinstance(piece[0], _Placeholder))
            ):
                parts.append("\n")
            parts.extend(piece)
        return parts

    def subject_resolver(self, n_images: int):
        obj = self.obj
        ids = obj.get("subject_ids")
        if ids is not None and not isinstance(ids, list):
            ids = [ids]
        meta = obj.get("metadata") or {}
        single = None
        if ids and len(set(map(str, ids))) == 1:
            single = str(ids[0])
        elif isinstance(meta, Mapping) and meta.get("subject_id"):
            single = str(meta["subject_id"])
        elif obj.get("subject_id") and not isinstance(obj.get("subject_id"), list):
            single = str(obj["subject_id"])
        elif isinstance(obj.get("subject_id"), list) and len(obj["subject_id"]) == n_images:
            ids = obj["subject_id"]
        positional = [str(s) for s in ids] if ids and len(ids) == n_images else None

        def resolve(k: int, path: str | None) -> str:
            if positional is not None:
                return positional[k]
            if path:
                return subject_from_path(path)
            if single is not None:
                return single
            raise self.fail(
                f"image {k}: no subject id (give subject_ids, metadata.subject_id or an image path)"
            )

        return resolve

    def parse(self) -> Task:
        obj = self.obj
        convs = obj.get("conversations", obj.get("messages"))
        if not isinstance(convs, list) or not convs:
            raise self.fail("'conversations' must be a non-empty list of turns")
        declared = self.declared_images()

        raw_turns: list[tuple[str, list[str | _Placeholder]]] = []
        for i, turn in enumerate(convs):
            if not isinstance(turn, Mapping):
                raise self.fail(f"turn {i}: expected an object")
            role_name = turn.get("role", turn.get("from"))
            role = _ROLE_ALIASES.get(str(role_name).lower()) if role_name is not None else None
            if role is None:
                raise self.fail(f"turn {i}: unknown role {role_name!r}")
            content = turn["content"] if "content" in turn else turn.get("value")
            if content is None:
                raise self.fail(f"turn {i}: no content")
            raw_turns.append((role, self.turn_parts(content, i)))

        placeholders = [p for _, parts in raw_turns for p in parts if isinstance(p, _Placeholder)]
        if declared is not None and len(declared) != len(placeholders):
            raise self.fail(
                f"{len(placeholders)} image placeholder(s) in the conversation but "
                f"{len(declared)} image(s) declared"
            )
        modalities_list = obj.get("modalities") or []
        resolve = self.subject_resolver(len(placeholders))
        refs: list[ImageRef] = []
        for k, ph in enumerate(placeholders):
            decl = declared[k] if declared is not None else None
            mod_name = ph.modality or (decl.modality if decl else None)
            if mod_name is None and len(set(modalities_list)) == 1:
                mod_name = modalities_list[0]
            if mod_name is None:
                raise self.fail(f"image {k}: no modality given")
            modality = self.modality(mod_name)
            if decl is not None and decl.modality and self.modality(decl.modality) != modality:
                raise self.fail(
                    f"image {k}: modality {mod_name!r} in the conversation but "
                    f"{decl.modality!r} in the image list"
                )
            path = ph.path or (decl.path if decl else None)
            refs.append(ImageRef(resolve(k, path), modality, str(path) if path else None))

        it = iter(refs)
        turns = tuple(
            Turn(
                role,
                tuple(next(it) if isinstance(p, _Placeholder) else p for p in parts if p != ""),
            )
            for role, parts in raw_turns
        )
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise self.fail("'metadata' must be an object")
        task_type = obj.get("task_type") or _derive_task_type(refs)
        return Task(
            task_id=self.task_id,
            task_type=str(task_type),
            images=tuple(refs),
            turns=turns,
            metadata=dict(metadata),
            source=self.source,
        )


def _split_text(text: str) -> list[str | _Placeholder]:
    pieces = text.split(IMAGE_PLACEHOLDER)
    out: list[str | _Placeholder] = []
    for k, piece in enumerate(pieces):
        if k:
            out.append(_Placeholder(None, None))
        if piece:
            out.append(piece)
    return out


def _derive_task_type(refs: Sequence[ImageRef]) -> str:
    if len(refs) <= 1:
        return "T1"
    return "T3" if len({r.subject_id for r in refs}) > 1 else "T2"


def parse_task(obj: Any, source: str, default_id: str | None = None) -> Task:
    """One raw task object -> Task; errors name `source`."""
    return _TaskParser(obj, source, default_id or source).parse()


def load_instructions(path: str | Path) -> list[Task]:
    """Read every task of a JSONL file, JSON array/object file, or folder of such files."""
    path = Path(path)
    tasks = []
    for source, obj in _iter_sources(path):
        default_id = f"{Path(source.split(':')[0].split('[')[0]).stem}-{len(tasks)}"
        tasks.append(parse_task(obj, source, default_id))
    return tasks


class MissingSubjectError(InstructionError):
    """Tasks name subjects (or subject/modality pairs) that the shards do not hold."""


def resolve_subjects(
    tasks: Iterable[Task],
    available: set[str] | frozenset[str],
    missing: Literal["error", "skip"] = "error",
    *,
    has=None,
) -> tuple[list[Task], int]:
    """Keep tasks whose images all exist in the shards; raise or count the others.

    `has(subject, modality) -> bool` (e.g. the shard reader's `has`) additionally checks that the
    subject holds that modality; without it only the subject id is checked.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    kept: list[Task] = []
    bad: list[tuple[Task, list[str]]] = []
    for task in tasks:
        absent = [
            f"{im.subject_id}/{im.modality}" if im.subject_id in available else im.subject_id
            for im in task.images
            if im.subject_id not in available
            or (has is not None and not has(im.subject_id, im.modality))
        ]
        if absent:
            bad.append((task, absent))
        else:
            kept.append(task)
    if bad and missing == "error":
        shown = "; ".join(f"{t.task_id} ({', '.join(a)})" for t, a in bad[:20])
        more = f"; ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise MissingSubjectError(
            f"data.missing_subjects: {len(bad)} task(s) name subjects absent from the shards: "
            f"{shown}{more} "
            "(pack them, or set data.missing_subjects=skip to drop them with a count)"
        )
    return kept, len(bad)
