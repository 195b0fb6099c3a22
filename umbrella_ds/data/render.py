"""Rendering of tasks into token ids and labels, in the base model's conversation template.

The template (`data/template.py`: ChatML or llava-1.5's) writes each turn's text and says which
characters are the answer; this module tokenizes each turn on its own, so the renderer knows
exactly which tokens are an assistant reply. For ChatML, special tokens split the text at turn
boundaries, so concatenating the turns gives the same ids as tokenizing the whole conversation
(tested against `apply_chat_template`). Within a turn, character offsets separate the role header
from the content; a token that crosses that boundary (a BPE merge of header and answer) is refused,
because the labels would then not be exactly the answer.

Supervision, for every template: only assistant reply tokens and that turn's end token (the
template's turn end); role headers, separators, what follows the turn end (ChatML's newline), a
leading bos, system and user turns, and image tokens are -100.

Images: an image stands where it stands in the content, as the template's image token, and
becomes `tokens_per_image[modality]` copies of its id (the count comes from the model's patch
embedding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .instructions import ImageRef, Task, Turn
from .template import ChatTemplate, TurnText, select_template

IGNORE_INDEX = -100


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
    prompt_ids: np.ndarray  # int64 (P,), ends with the template's generation prompt
    target_text: str
    image_modalities: tuple[str, ...]


@dataclass
class _TurnTokens:
    ids: list[int]
    supervised: list[bool]


class Renderer:
    """Tokenizer + conversation template + image token counts + length policy -> samples.

    template: the base model's (`template_of(model)`); None derives it from the tokenizer
    (`select_template`), for callers holding only a tokenizer (tests, benchmarks).
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
        template: ChatTemplate | None = None,
    ) -> None:
        if overflow not in ("reject", "truncate"):
            raise ValueError(f"overflow must be 'reject' or 'truncate', got {overflow!r}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        for mod, n in tokens_per_image.items():
            if int(n) <= 0:
                raise ValueError(f"tokens_per_image[{mod!r}] must be positive, got {n}")
        self.tokenizer = tokenizer
        self.template = template if template is not None else select_template(tokenizer=tokenizer)
        self.tokens_per_image = {m: int(n) for m, n in tokens_per_image.items()}
        self.max_length = int(max_length)
        self.overflow = overflow
        self.template.check_tokenizer(tokenizer)  # TemplateError (a ValueError) names the token
        self.image_token_id = self.template.token_id(tokenizer, self.template.image_token)
        self.turn_end_id = self.template.token_id(tokenizer, self.template.turn_end)
        self.bos_ids = self.template.bos_ids(tokenizer)

    # -- rendering ------------------------------------------------------------------------------

    def _n_tokens(self, modality: str, task: Task) -> int:
        if modality not in self.tokens_per_image:
            raise RenderError(
                f"task {task.task_id!r}: modality {modality!r} has no image token count "
                f"(configured: {sorted(self.tokens_per_image)})"
            )
        return self.tokens_per_image[modality]

    def _turns(self, task: Task, turns: tuple[Turn, ...]) -> list[tuple[Turn, str | None]]:
        """The turns with the role before each; the template's default system turn goes first
        when the task has none (llava-1.5's system prompt; ChatML has no default)."""
        out: list[tuple[Turn, str | None]] = []
        previous: str | None = None
        if self.template.default_system is not None and (not turns or turns[0].role != "system"):
            out.append((Turn("system", (self.template.default_system,)), None))
            previous = "system"
        for turn in turns:
            out.append((turn, previous))
            previous = turn.role
        return out

    def _render_turn(self, turn: Turn, previous: str | None, task: Task) -> _TurnTokens:
        image = self.template.image_token
        for p in turn.parts:
            if isinstance(p, str) and image in p:
                raise RenderError(f"task {task.task_id!r}: text part contains a literal {image}")
        content = "".join(image if isinstance(p, ImageRef) else p for p in turn.parts)
        tt: TurnText = self.template.turn(turn.role, content, previous)
        enc = self.tokenizer(tt.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        modalities = [p.modality for p in turn.parts if isinstance(p, ImageRef)]
        # Supervised: tokens overlapping the content or the closing turn end of an assistant turn.
        sup_lo, sup_hi = tt.header_len, tt.supervised_end
        assistant = turn.role == "assistant"
        if assistant and any(s < sup_lo < e for s, e in enc["offset_mapping"]):
            raise RenderError(
                f"task {task.task_id!r}: a token spans the assistant header and the answer in "
                f"{tt.text!r}; the labels could not be exactly the answer"
            )
        supervised = [
            assistant and tid != self.image_token_id and e > sup_lo and s < sup_hi
            for tid, (s, e) in zip(ids, enc["offset_mapping"])
        ]
        # Expand images, carrying the (unsupervised) flags along.
        out_ids: list[int] = []
        out_sup: list[bool] = []
        k = 0
        for tid, sup in zip(ids, supervised):
            if tid == self.image_token_id:
                if k >= len(modalities):
                    raise RenderError(f"task {task.task_id!r}: text contains a literal {image}")
                n = self._n_tokens(modalities[k], task)
                out_ids.extend([tid] * n)
                out_sup.extend([False] * n)
                k += 1
            else:
                out_ids.append(tid)
                out_sup.append(sup)
        if k != len(modalities):
            raise RenderError(
                f"task {task.task_id!r}: {len(modalities)} images in a turn but {k} {image} tokens"
            )
        return _TurnTokens(out_ids, out_sup)

    def render_train(self, task: Task) -> RenderedSample:
        """Full conversation -> ids and labels; applies the overflow policy."""
        if not any(t.role == "assistant" for t in task.turns):
            raise RenderError(
                f"task {task.task_id!r} ({task.source}): no assistant turn to supervise"
            )
        ids: list[int] = list(self.bos_ids)
        sup: list[bool] = [False] * len(ids)
        for turn, previous in self._turns(task, task.turns):
            tt = self._render_turn(turn, previous, task)
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
        ids: list[int] = list(self.bos_ids)
        last: str | None = None  # role of the turn the generation prompt follows
        for turn, before in self._turns(task, task.turns[:-1]):
            ids.extend(self._render_turn(turn, before, task).ids)
            last = turn.role
        prompt = self.template.generation_prompt(last)
        ids.extend(self.tokenizer.encode(prompt, add_special_tokens=False))
        if len(ids) > self.max_length:
            raise SampleTooLongError(
                f"task {task.task_id!r} ({task.source}): prompt of {len(ids)} tokens > "
                f"max_length {self.max_length}"
            )
        modalities = tuple(im.modality for im in task.images)
        return EvalSample(np.asarray(ids, dtype=np.int64), final.text, modalities)
