"""A distributed sampler whose position is one global count, so resume survives a new world size.

Per epoch there is one global order: a permutation of range(num_samples) drawn from (seed, epoch)
(or the identity without shuffling). `consumed` counts the samples of that order that the whole
job has consumed; rank r reads global positions consumed + r, consumed + r + world, ... and
yields (epoch, index) pairs, so the dataset can derive each item's randomness from them.

The position moves only through `advance(n_global)`, which the engine calls after each optimizer
step with the global batch size; iterating does not move it (DataLoader workers prefetch ahead).
A checkpoint therefore holds the exact boundary, and resuming with another number of ranks reads
exactly the remaining global sequence, only dealt out differently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


class ResumableSampler:
    """Yields (epoch, index) for this rank from the current global position onwards.

    drop_last=True ends the epoch at the largest multiple of `global_batch_size` (default: the
    world size), so every rank gets the same number of samples and micro-batches.
    drop_last=False yields every remaining sample exactly once; ranks may then differ by one.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        global_batch_size: int | None = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        gbs = world_size if global_batch_size is None else int(global_batch_size)
        if gbs < 1 or gbs % world_size:
            raise ValueError(
                f"global_batch_size {gbs} must be a positive multiple of world_size {world_size}"
            )
        self.num_samples = int(num_samples)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.global_batch_size = gbs
        self.epoch = 0
        self.consumed = 0

    # -- order and bounds ------------------------------------------------------------------------

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global order of dataset indices (same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_samples).astype(np.int64)

    @property
    def epoch_end(self) -> int:
        """Global positions [consumed, epoch_end) are still served this epoch.

        With drop_last the remainder is cut to whole global batches counted from the current
        position, so ranks stay equal even after a resume on another world size (with the
        engine's global batch size, the cut is the same for every world size).
        """
        if self.drop_last:
            remaining = max(self.num_samples - self.consumed, 0)
            return self.consumed + remaining - remaining % self.global_batch_size
        return self.num_samples

    def _positions(self) -> range:
        return range(self.consumed + self.rank, self.epoch_end, self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.global_order()
        epoch = self.epoch
        for pos in self._positions():
            yield epoch, int(order[pos])

    def __len__(self) -> int:
        """Samples this rank still reads in the current epoch."""
        return len(self._positions())

    # -- position --------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch`; a new epoch starts at position 0, the same epoch keeps its position."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.consumed = 0

    def advance(self, n_global: int) -> None:
        """Record that the whole job consumed `n_global` more samples of this epoch."""
        if n_global < 0:
            raise ValueError(f"advance needs n_global >= 0, got {n_global}")
        if self.consumed + n_global > self.num_samples:
            raise ValueError(
                f"advance({n_global}) past the end of epoch {self.epoch}: consumed "
                f"{self.consumed} of {self.num_samples}"
            )
        self.consumed += int(n_global)

    @property
    def exhausted(self) -> bool:
        """True when no rank has anything left this epoch."""
        return self.consumed >= self.epoch_end

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global position; a different saved world_size is fine, a different seed not."""
        missing = {"epoch", "consumed", "seed"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}")
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}: "
                "the remaining order would differ"
            )
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(
                f"sampler state consumed={consumed} does not fit a dataset of {self.num_samples}"
            )
        self.epoch = int(state["epoch"])
        self.consumed = consumed
