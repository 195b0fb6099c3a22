"""The predecessor's instruction files -> the manifest CSV that ``umbrella-pack build`` reads.

    umbrella-pack manifest --instructions FILE|DIR ... [--phenotypes CSV]
                           [--path-map OLD=NEW ...] --out manifest.csv

A UMBRELLA/BrainVLM user has no manifest: the images to pack are the ones the instruction files
name (``images[].path`` / ``image_path``, or ``modality_paths`` in the older form), each a NIfTI
per subject (``.../2.sMRI_freesurfer_256/{subjectkey}.nii.gz``) or a SwiFT frame folder
(``.../img/{subjectkey}``). The files are read by the same parser training uses
(``umbrella_ds.data.instructions``), so the subject and modality of each image are the ones
training will ask the shards for; modality names come from the modality table (``sMRI`` -> T1,
``fMRI`` -> rsfMRI).

- ``--path-map OLD=NEW`` rewrites a path that starts with the folder ``OLD`` (the cluster the
  files were written on) to start with ``NEW``; the longest matching ``OLD`` wins, and only whole
  path components match. A relative path left after that resolves against its instruction file's
  folder. The manifest holds absolute paths.
- One row per subject, sorted by subject key (the manifest order decides shard assignment, so
  the same files give the same shards whatever order the instruction files list them in):
  ``subject_id``, one image column per modality the files name (table order), then the
  phenotype columns of ``--phenotypes`` joined by ``subjectkey`` or ``subject_id`` (a subject
  without a phenotype row gets blank cells).
- An image that does not exist (or a frame folder without ``frame_0.pt``) leaves that cell
  blank and is listed with the reason in ``<out stem>.missing.csv`` (``subject_id, modality,
  path, reason``); a subject none of whose images exist has no row. Two different paths for one
  subject and modality are a usage error naming both and where they were read.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.bids import missing_path
from umbrella_ds import modality as modality_table
from umbrella_ds.data.instructions import load_instructions
from umbrella_ds.errors import UsageError
from umbrella_ds.io import atomic_path

KEY_COLUMNS = ("subjectkey", "subject_id")
MISSING_COLUMNS = ("subject_id", "modality", "path", "reason")
_SOURCE_FILE = re.compile(r"^(.*?)(?::\d+|\[\d+\])?$")


@dataclass(frozen=True)
class PathMap:
    """``OLD=NEW``: a path under the folder OLD moves under NEW."""

    old: str
    new: str

    @classmethod
    def parse(cls, text: str) -> PathMap:
        old, sep, new = text.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise UsageError(f"--path-map {text!r}: expected OLD=NEW (two folder prefixes)")
        return cls(old.strip().rstrip("/") or "/", new.strip().rstrip("/") or "/")

    def apply(self, path: str) -> str | None:
        """The rewritten path, or None when ``path`` is not under OLD (whole components only)."""
        if path == self.old:
            return self.new
        prefix = self.old if self.old.endswith("/") else self.old + "/"
        if path.startswith(prefix):
            return str(Path(self.new) / path[len(prefix) :])
        return None


def rewrite(path: str, maps: Sequence[PathMap]) -> str:
    """Apply the longest matching ``--path-map`` (none matching: the path unchanged)."""
    for m in sorted(maps, key=lambda m: len(m.old), reverse=True):
        done = m.apply(path)
        if done is not None:
            return done
    return path


@dataclass
class InstructionManifest:
    """Rows (column -> cell, sorted by subject) and what is missing, with why."""

    columns: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)
    missing: list[dict[str, str]] = field(default_factory=list)
    tasks: int = 0


def _source_file(source: str) -> Path:
    """``/x/a.jsonl:12`` or ``/x/b.json[3]`` -> the file the record came from."""
    m = _SOURCE_FILE.match(source)
    return Path(m.group(1) if m else source)


def missing_reason(path: Path, modality: modality_table.Modality) -> str | None:
    """Why this image cannot be packed as found (None: it is there). A cheap check: existence and,
    for a frame folder, its first frame; ``umbrella-pack build`` reads and validates the rest."""
    if not path.exists():
        return "missing file"
    if path.is_dir():
        if not modality.is_series:
            return "a folder, not a NIfTI file"
        if not (path / "frame_0.pt").is_file():
            return "empty image: no frame_0.pt in the frame folder"
    return None


def _phenotypes(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """CSV keyed by ``subjectkey`` (the predecessor's) or ``subject_id`` -> (columns, key -> row)."""
    if not path.is_file():
        raise UsageError(f"--phenotypes {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        key = next((k for k in KEY_COLUMNS if k in fields), None)
        if key is None:
            raise UsageError(f"{path}:1: no subjectkey or subject_id column (has {fields})")
        columns = [c for c in fields if c not in KEY_COLUMNS]
        clash = [c for c in columns if modality_table.is_known(c)]
        if clash:
            raise UsageError(
                f"{path}:1: column(s) {clash} would collide with the manifest's image columns"
            )
        table: dict[str, dict[str, str]] = {}
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            subject = row.get(key, "")
            if not subject:
                raise UsageError(f"{path}:{line}: empty {key}")
            if subject in table:
                raise UsageError(f"{path}:{line}: subject {subject} listed twice")
            table[subject] = {c: row.get(c, "") for c in columns}
    return columns, table


def scan(
    instructions: Iterable[str | os.PathLike[str]],
    *,
    phenotypes: str | os.PathLike[str] | None = None,
    path_maps: Sequence[str] = (),
) -> InstructionManifest:
    """Read every instruction file/folder and find each (subject, modality)'s image."""
    maps = [PathMap.parse(t) for t in path_maps]
    found: dict[tuple[str, str], tuple[str, str]] = {}  # (subject, modality) -> (path, source)
    n_tasks = 0
    for item in instructions:
        item = Path(item).expanduser()
        if not item.exists():
            raise UsageError(f"--instructions {item}: no such file or folder")
        for task in load_instructions(item):
            n_tasks += 1
            for k, im in enumerate(task.images):
                if not im.path:
                    raise UsageError(
                        f"{task.source}: task {task.task_id!r}: image {k} has no path, so there "
                        "is nothing to pack for it"
                    )
                path = Path(rewrite(im.path, maps)).expanduser()
                if not path.is_absolute():
                    path = _source_file(task.source).resolve().parent / path
                path_text = os.path.normpath(str(path))
                key = (im.subject_id, im.modality)
                seen = found.setdefault(key, (path_text, task.source))
                if seen[0] != path_text:
                    raise UsageError(
                        f"{task.source}: subject {im.subject_id} {im.modality}: image {path_text} "
                        f"but {seen[1]} gives {seen[0]}; one image per subject and modality"
                    )
    if not n_tasks:
        raise UsageError("--instructions: the files hold no tasks")
    named = modality_table.ordered({m for _, m in found})
    pheno_columns, pheno = _phenotypes(Path(phenotypes)) if phenotypes else ([], {})
    columns = ["subject_id", *(modality_table.get(m).manifest_column for m in named)]
    out = InstructionManifest(columns=[*columns, *pheno_columns], tasks=n_tasks)
    for subject in sorted({s for s, _ in found}):
        row = {"subject_id": subject}
        present = False
        for name in named:
            m = modality_table.get(name)
            entry = found.get((subject, name))
            cell = ""
            if entry is not None:
                reason = missing_reason(Path(entry[0]), m)
                if reason is None:
                    cell, present = entry[0], True
                else:
                    out.missing.append(
                        {
                            "subject_id": subject,
                            "modality": name,
                            "path": entry[0],
                            "reason": reason,
                        }
                    )
            row[m.manifest_column] = cell
        if present:
            out.rows.append({**row, **pheno.get(subject, dict.fromkeys(pheno_columns, ""))})
    return out


def write(manifest: InstructionManifest, out: str | os.PathLike[str]) -> Path:
    """The manifest CSV at ``out`` and the missing list beside it; returns the missing list's path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(out, manifest.columns, manifest.rows)
    missing = missing_path(out)
    _write_csv(missing, MISSING_COLUMNS, manifest.missing)
    return missing


def _write_csv(path: Path, columns: Iterable[str], rows: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
