"""ChatML rendering of tasks into token ids and labels.

Each turn is rendered as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and tokenized on its own:
special tokens split the text at turn boundaries, so concatenating the turns gives the same ids
as tokenizing the whole conversation (tested against `apply_chat_template`), while the renderer
knows exactly which tokens are an assistant reply. Within a turn, character offsets separate the
role header from the content.

Supervision: only assistant reply tokens and that turn's ``<|im_end|>``; headers, the newline
after ``<|im_end|>``, system and user turns, and image tokens are -100.

Images: ``<image>`` stays where it stands in the content and becomes `tokens_per_image[modality]`
copies of the image token id (the count comes from the model's patch embedding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .instructions import IMAGE_PLACEHOLDER, ImageRef, Task, Turn

IGNORE_INDEX = -100
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


class RenderError(ValueError):
    """A task that cannot become a training or evaluation sample (message names the task)."""


class SampleTooLongError(RenderError):
    """A sample longer than max_length that may not (or cannot) be truncated."""


@dataclass(frozen=True)
class RenderedSample:
    input_ids: np.ndarray  # int64 (S,)
    labels: np.ndarray  # int64 (S,), IGNORE_INDEX where unsupervised
    image_modalities: tuple[str, ...]  # one per image block, in order
    truncated: bool = False


@dataclass(frozen=True)
class EvalSample:
    prompt_ids: np.ndarray  # int64 (P,), ends with "<|im_start|>assistant\n"
    target_text: str
    image_modalities: tuple[str, ...]


@dataclass
class _TurnTokens:
    ids: list[int]
    supervised: list[bool]


class Renderer:
    """Tokenizer + image token counts + length policy -> samples.

    overflow="reject": a sample longer than max_length raises SampleTooLongError.
    overflow="truncate": trailing text is cut to max_length, but only when no image block is cut
    and at least one supervised token remains; otherwise the sample is rejected as above.
    """

    def __init__(
        self,
        tokenizer,
        tokens_per_image: Mapping[str, int],
        max_length: int,
        overflow: Literal["reject", "truncate"] = "reject",
    ) -> None:
        if overflow not in ("reject", "truncate"):
            raise ValueError(f"overflow must be 'reject' or 'truncate', got {overflow!r}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        for mod, n in tokens_per_image.items():
            if int(n) <= 0:
                raise ValueError(f"tokens_per_image[{mod!r}] must be positive, got {n}")
        self.tokenizer = tokenizer
        self.tokens_per_image = {m: int(n) for m, n in tokens_per_image.items()}
        self.max_length = int(max_length)
        self.overflow = overflow
        self.image_token_id = self._special_id(IMAGE_PLACEHOLDER)
        self.im_end_id = self._special_id(IM_END)
        self._special_id(IM_START)
        self._check_template()

    # -- setup checks ---------------------------------------------------------------------------

    def _special_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk):
            raise ValueError(
                f"tokenizer has no {token!r} token; the renderer needs ChatML + <image>"
            )
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if ids != [tid]:
            raise ValueError(f"tokenizer splits {token!r} into {ids}; it must be one special token")
        return int(tid)

    def _check_template(self) -> None:
        """Refuse a tokenizer whose chat template is not the ChatML this renderer writes."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template (ChatML expected)")
        probe = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "<image>\nq"},
            {"role": "assistant", "content": "a."},
        ]
        ours = "".join(_turn_text(m["role"], m["content"]) for m in probe)
        theirs = self.tokenizer.apply_chat_template(probe, tokenize=False)
        if theirs != ours:
            raise ValueError(
                f"tokenizer's chat template is not plain ChatML: renders {theirs!r}, expected {ours!r}"
            )

    # -- rendering ------------------------------------------------------------------------------

    def _n_tokens(self, modality: str, task: Task) -> int:
        if modality not in self.tokens_per_image:
            raise RenderError(
                f"task {task.task_id!r}: modality {modality!r} has no image token count "
                f"(configured: {sorted(self.tokens_per_image)})"
            )
        return self.tokens_per_image[modality]

    def _render_turn(self, turn: Turn, task: Task) -> _TurnTokens:
        content = turn.text
        for p in turn.parts:
            if isinstance(p, str) and IMAGE_PLACEHOLDER in p:
                raise RenderError(f"task {task.task_id!r}: text part contains a literal <image>")
        header = f"{IM_START}{turn.role}\n"
        text = _turn_text(turn.role, content)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        modalities = [p.modality for p in turn.parts if isinstance(p, ImageRef)]
        # Supervised: tokens overlapping the content or the closing <|im_end|> of an assistant turn.
        sup_lo, sup_hi = len(header), len(header) + len(content) + len(IM_END)
        supervised = [
            turn.role == "assistant" and tid != self.image_token_id and e > sup_lo and s < sup_hi
            for tid, (s, e) in zip(ids, enc["offset_mapping"])
        ]
        # Expand images, carrying the (unsupervised) flags along.
        out_ids: list[int] = []
        out_sup: list[bool] = []
        k = 0
        for tid, sup in zip(ids, supervised):
            if tid == self.image_token_id:
                if k >= len(modalities):
                    raise RenderError(f"task {task.task_id!r}: text contains a literal <image>")
                n = self._n_tokens(modalities[k], task)
                out_ids.extend([tid] * n)
                out_sup.extend([False] * n)
                k += 1
            else:
                out_ids.append(tid)
                out_sup.append(sup)
        if k != len(modalities):
            raise RenderError(
                f"task {task.task_id!r}: {len(modalities)} images in a turn but {k} <image> tokens"
            )
        return _TurnTokens(out_ids, out_sup)

    def render_train(self, task: Task) -> RenderedSample:
        """Full conversation -> ids and labels; applies the overflow policy."""
        if not any(t.role == "assistant" for t in task.turns):
            raise RenderError(
                f"task {task.task_id!r} ({task.source}): no assistant turn to supervise"
            )
        ids: list[int] = []
        sup: list[bool] = []
        for turn in task.turns:
            tt = self._render_turn(turn, task)
            ids.extend(tt.ids)
            sup.extend(tt.supervised)
        input_ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(sup, dtype=bool), input_ids, IGNORE_INDEX).astype(np.int64)
        modalities = tuple(im.modality for im in task.images)
        truncated = False
        if len(input_ids) > self.max_length:
            input_ids, labels = self._truncate(task, input_ids, labels)
            truncated = True
        return RenderedSample(input_ids, labels, modalities, truncated)

    def _truncate(
        self, task: Task, input_ids: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n, limit = len(input_ids), self.max_length
        where = f"task {task.task_id!r} ({task.source}): {n} tokens > max_length {limit}"
        if self.overflow == "reject":
            raise SampleTooLongError(f"{where} (overflow='reject')")
        image_pos = np.flatnonzero(input_ids == self.image_token_id)
        if image_pos.size and image_pos[-1] >= limit:
            raise SampleTooLongError(f"{where}: truncation would cut an image block")
        labels = labels[:limit]
        # Position 0 is never predicted, so a label there does not count.
        if not np.any(labels[1:] != IGNORE_INDEX):
            raise SampleTooLongError(f"{where}: truncation would leave no supervised token")
        return input_ids[:limit], labels

    def render_eval(self, task: Task) -> EvalSample:
        """All turns before the final assistant answer + the assistant header; the answer as text."""
        if not task.turns or task.turns[-1].role != "assistant":
            raise RenderError(
                f"task {task.task_id!r} ({task.source}): the last turn must be the assistant's answer"
            )
        final = task.turns[-1]
        if any(isinstance(p, ImageRef) for p in final.parts):
            raise RenderError(f"task {task.task_id!r}: the final answer may not contain an image")
        ids: list[int] = []
        for turn in task.turns[:-1]:
            ids.extend(self._render_turn(turn, task).ids)
        ids.extend(self.tokenizer.encode(f"{IM_START}assistant\n", add_special_tokens=False))
        if len(ids) > self.max_length:
            raise SampleTooLongError(
                f"task {task.task_id!r} ({task.source}): prompt of {len(ids)} tokens > "
                f"max_length {self.max_length}"
            )
        modalities = tuple(im.modality for im in task.images)
        return EvalSample(np.asarray(ids, dtype=np.int64), final.text, modalities)


def _turn_text(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"
