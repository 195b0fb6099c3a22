"""Leakage guard: no subject may be in both the training and the evaluation set.

A held-out metric is only held out if the evaluation subjects were never trained on. Every image
of a task counts, so a T3 comparison whose *reference* scan is an evaluation subject leaks that
subject as much as a T1 task on it does. Training refuses to start and names the subjects, unless
the run config says ``data.allow_overlap: true`` (e.g. a deliberate sanity check on train data).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from umbrella_ds.data import Task
from umbrella_ds.errors import UserError

SHOWN = 20  # subjects named in the message (the count is always complete)


class LeakageError(UserError, RuntimeError):
    """Subjects shared by the training and evaluation sets (the message names them; exit 2)."""


def shared_subjects(
    train: Iterable[Task], evaluation: Iterable[Task]
) -> dict[str, tuple[list[str], list[str]]]:
    """subject -> (training task ids, evaluation task ids) for every subject in both sets."""
    seen_train: dict[str, list[str]] = defaultdict(list)
    for task in train:
        for subject in dict.fromkeys(task.subject_ids):
            seen_train[subject].append(task.task_id)
    shared: dict[str, tuple[list[str], list[str]]] = {}
    for task in evaluation:
        for subject in dict.fromkeys(task.subject_ids):
            if subject in seen_train:
                shared.setdefault(subject, (seen_train[subject], []))[1].append(task.task_id)
    return dict(sorted(shared.items()))


def check_no_overlap(
    train: Iterable[Task], evaluation: Iterable[Task], *, allow: bool, where: str = ""
) -> dict[str, tuple[list[str], list[str]]]:
    """Raise LeakageError naming the shared subjects unless ``allow``; returns them either way."""
    shared = shared_subjects(train, evaluation)
    if shared and not allow:
        named = "; ".join(
            f"{s} (train: {', '.join(tr[:2])}{' ...' if len(tr) > 2 else ''}; "
            f"eval: {', '.join(ev[:2])}{' ...' if len(ev) > 2 else ''})"
            for s, (tr, ev) in list(shared.items())[:SHOWN]
        )
        more = f" and {len(shared) - SHOWN} more" if len(shared) > SHOWN else ""
        raise LeakageError(
            f"{len(shared)} subject(s) are in both the training and the evaluation set"
            f"{' (' + where + ')' if where else ''}: {named}{more}. Split by subject "
            "(umbrella-pack synth does), or set data.allow_overlap: true if this is intended"
        )
    return shared
