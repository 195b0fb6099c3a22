"""Reading the manifest CSV that ``umbrella-pack build --manifest`` packs.

The other side of ``bids.py`` and ``umbrella_manifest.py``, which write it: one row per subject,
``subject_id`` (or the predecessor's ``subjectkey``), one image column per modality (the modality
table's ``manifest_column``: ``T1``, ``rsfMRI``, ...), and every other column a phenotype. A
problem with the file is a usage error (exit 2) naming the manifest and the line; an image that
cannot be read is not: packing rejects that one input and lists it in ``rejected.csv``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umbrella_ds import modality as modality_table
from umbrella_ds.errors import UsageError

ID_COLUMNS = ("subject_id", "subjectkey")


@dataclass
class Row:
    """One subject of the manifest; ``position`` (0-based row number) decides its shard."""

    position: int
    subject_id: str
    paths: dict[str, str]  # modality -> resolved source path ("" when not listed)
    phenotypes: dict[str, Any]


def parse_value(text: str) -> Any:
    """Phenotype cell -> int, float, str, or None when empty (kept exactly otherwise)."""
    text = text.strip()
    if text == "" or text.lower() in ("na", "nan", "n/a", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_manifest(path: Path, modalities: list[str] | None) -> tuple[list[Row], list[str]]:
    """Parse the manifest; relative image paths resolve against the manifest's folder.

    ``modalities`` None packs every image column the manifest has; returns the rows and the
    modalities they are packed for."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        records = list(reader)
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise UsageError(
            f"manifest {path}: needs a subject_id or subjectkey column (has {columns})"
        )
    known = modality_table.all()
    column = {m.name: m.manifest_column for m in known}
    available = [m.name for m in known if m.manifest_column in columns]
    if modalities is None:
        modalities = available
    unknown = [m for m in modalities if m not in column]
    if unknown:
        raise UsageError(f"unknown modality {unknown}; choose from {list(column)}")
    missing = [m for m in modalities if column[m] not in columns]
    if missing:
        raise UsageError(
            f"manifest {path}: missing column(s) {missing} for the requested modalities"
        )
    if not modalities:
        raise UsageError(f"manifest {path}: no image column ({' or '.join(column.values())})")
    pheno_cols = [c for c in columns if c not in ID_COLUMNS and c not in column.values()]
    base = path.resolve().parent
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        sid = (rec.get(id_col) or "").strip()
        line = i + 2
        if not sid:
            raise UsageError(f"manifest {path}: line {line} has an empty {id_col}")
        if sid in seen:
            raise UsageError(
                f"manifest {path}: duplicate subject id {sid!r} (lines {seen[sid]} and {line})"
            )
        seen[sid] = line
        paths = {}
        for m in modalities:
            cell = (rec.get(column[m]) or "").strip()
            paths[m] = str(base / cell) if cell and not os.path.isabs(cell) else cell
        pheno = {c: parse_value(rec.get(c) or "") for c in pheno_cols}
        rows.append(Row(i, sid, paths, pheno))
    if not rows:
        raise UsageError(f"manifest {path}: no subjects")
    return rows, list(modalities)
