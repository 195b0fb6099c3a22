"""MRI patch embedding: the only trainable part of the model.

T1 volumes (D, H, W) are cut into non-overlapping 3D patches by a Conv3d with
kernel = stride = patch; rsfMRI windows (D, H, W, T) into 4D blocks flattened and mapped by a
Linear. Each modality has its own learned positional embedding (1, L, E). The number of tokens
per image, L = prod(size // patch), is defined here and only here: data code asks
`num_tokens(modality)` instead of recomputing it.

The module replaces a vision tower's `embeddings`, so its forward accepts the tower's call
`embeddings(pixel_values, interpolate_pos_encoding=...)`. Which branch runs is chosen, in order,
by an explicit `modality=` argument, by the modality set with `use_modality(...)` (how
`llava.image_features` drives it through an unmodified tower), or by matching the input shape
against the configured sizes (an ambiguous or unknown shape is an error, never a guess).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from umbrella_ds.modality import grid_problems, is_series_ndim


@dataclass(frozen=True)
class ModalitySpec:
    """Input grid of one modality and its patch: 3 dims = volume (T1), 4 dims = series (rsfMRI)."""

    size: tuple[int, ...]
    patch: tuple[int, ...]

    def __post_init__(self) -> None:
        size, patch = tuple(int(s) for s in self.size), tuple(int(p) for p in self.patch)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "patch", patch)
        problems = grid_problems(size, patch)  # the one home of the size/patch rules
        if "ndim" in problems:
            raise ValueError(
                f"ModalitySpec.size must have 3 (D,H,W) or 4 (D,H,W,T) dims, got {size}"
            )
        if "length" in problems:
            raise ValueError(f"ModalitySpec.patch {patch} must have as many dims as size {size}")
        if "nonpositive" in problems:
            raise ValueError(f"ModalitySpec sizes must be positive: size={size}, patch={patch}")
        if "too_big" in problems:
            big = [(s, p) for s, p in zip(size, patch) if p > s]
            raise ValueError(
                f"ModalitySpec patch {patch} is larger than size {size} (offending size/patch: {big})"
            )

    @property
    def grid(self) -> tuple[int, ...]:
        """Patches along each axis: floor(size / patch), Conv3d's rule (the predecessor's too).

        A patch that does not divide the size leaves each axis's trailing `size % patch` voxels
        unseen (`dropped`); its configs use 10^3 patches on a 96^3 grid (9 per axis, 729 tokens).
        """
        return tuple(s // p for s, p in zip(self.size, self.patch))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Trailing voxels (frames, for the time axis) per axis that no patch covers."""
        return tuple(s % p for s, p in zip(self.size, self.patch))

    def describe(self, name: str) -> str:
        """One summary line, e.g. ``T1 96x96x96 / 10x10x10: 729 image tokens``."""
        x = "x".join
        line = f"{name} {x(map(str, self.size))} / {x(map(str, self.patch))}: {self.num_tokens} image tokens"
        if any(self.dropped):
            line += f" (trailing voxels per axis unseen: {x(map(str, self.dropped))})"
        return line

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def is_series(self) -> bool:
        """4D blocks + Linear (a series) rather than Conv3d patches (a volume): the modality
        table's rule on the number of dims, the one place that decides it."""
        return is_series_ndim(len(self.size))

    def to_dict(self) -> dict[str, list[int]]:
        return {"size": list(self.size), "patch": list(self.patch)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> ModalitySpec:
        unknown = set(d) - {"size", "patch"}
        if unknown:
            raise ValueError(f"ModalitySpec: unknown keys {sorted(unknown)} (expected size, patch)")
        return cls(size=tuple(d["size"]), patch=tuple(d["patch"]))  # type: ignore[arg-type]


def parse_modalities(
    modalities: Mapping[str, ModalitySpec | Mapping[str, object]],
) -> dict[str, ModalitySpec]:
    """Accept specs or their dict form (YAML/JSON), keeping order."""
    out: dict[str, ModalitySpec] = {}
    for name, spec in modalities.items():
        if not name.isidentifier():
            raise ValueError(
                f"modality name {name!r} must be a Python identifier (used as module key)"
            )
        out[name] = spec if isinstance(spec, ModalitySpec) else ModalitySpec.from_dict(spec)
    if not out:
        raise ValueError("at least one modality must be configured")
    return out


class MRIPatchEmbed(nn.Module):
    """Per-modality patchify + linear map + positional embedding -> (N, L, E)."""

    def __init__(
        self, modalities: Mapping[str, ModalitySpec | Mapping[str, object]], embed_dim: int
    ):
        super().__init__()
        self.specs = parse_modalities(modalities)
        self.embed_dim = int(embed_dim)
        self.proj = nn.ModuleDict()
        for name, spec in self.specs.items():
            if spec.is_series:
                self.proj[name] = nn.Linear(math.prod(spec.patch), self.embed_dim)
            else:
                self.proj[name] = nn.Conv3d(
                    1, self.embed_dim, kernel_size=spec.patch, stride=spec.patch
                )
            pos = torch.empty(1, spec.num_tokens, self.embed_dim)
            nn.init.trunc_normal_(pos, std=0.02)
            # A direct attribute, not a ParameterDict entry: deepspeed.zero.Init partitions the
            # parameters a module owns when its own __init__ returns.
            self.register_parameter(f"pos_embed_{name}", nn.Parameter(pos))
        self._active: str | None = None

    def pos_embedding(self, modality: str) -> nn.Parameter:
        """Learned positional embedding (1, L, E) of one modality."""
        self._spec(modality)
        return getattr(self, f"pos_embed_{modality}")

    # --- what data code asks -------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.specs)

    def num_tokens(self, modality: str) -> int:
        return self._spec(modality).num_tokens

    def expected_shapes(self, modality: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Accepted per-batch input shapes (without N): bare grid, or with a channel dim of 1."""
        size = self._spec(modality).size
        return size, (1, *size)

    # --- branch selection ----------------------------------------------------------------
    @contextlib.contextmanager
    def use_modality(self, modality: str) -> Iterator[None]:
        """Route the tower's `embeddings(pixel_values, ...)` call to one branch."""
        self._spec(modality)
        previous, self._active = self._active, modality
        try:
            yield
        finally:
            self._active = previous

    def _spec(self, modality: str) -> ModalitySpec:
        try:
            return self.specs[modality]
        except KeyError:
            raise KeyError(
                f"modality {modality!r} is not configured in the patch embedding "
                f"(configured: {self.modalities})"
            ) from None

    def _describe(self, modality: str) -> str:
        bare, chan = self.expected_shapes(modality)
        return f"{modality}: (N, {', '.join(map(str, bare))}) or (N, {', '.join(map(str, chan))})"

    def _infer(self, shape: tuple[int, ...]) -> str:
        per_item = shape[1:]
        hits = [m for m in self.specs if per_item in self.expected_shapes(m)]
        if len(hits) == 1:
            return hits[0]
        expected = "; ".join(self._describe(m) for m in self.specs)
        if not hits:
            raise ValueError(
                f"MRIPatchEmbed: input of shape {tuple(shape)} matches no configured modality; "
                f"expected {expected}"
            )
        raise ValueError(
            f"MRIPatchEmbed: input of shape {tuple(shape)} matches several modalities {hits}; "
            "pass modality= or use use_modality()"
        )

    # --- forward ---------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        modality: str | None = None,
    ) -> torch.Tensor:
        """(N, *size) or (N, 1, *size) -> (N, L, E) in the weights' dtype.

        `interpolate_pos_encoding` is accepted because the vision tower passes it; the grids
        are fixed per modality, so it is ignored.
        """
        del interpolate_pos_encoding
        modality = modality or self._active or self._infer(tuple(pixel_values.shape))
        spec = self._spec(modality)
        bare, chan = self.expected_shapes(modality)
        item = tuple(pixel_values.shape[1:])
        if pixel_values.dim() < 2 or item not in (bare, chan):
            raise ValueError(
                f"MRIPatchEmbed: wrong input shape for {modality}: got {tuple(pixel_values.shape)}, "
                f"expected {self._describe(modality)}"
            )
        proj = self.proj[modality]
        weight_dtype = next(proj.parameters()).dtype
        n = pixel_values.shape[0]
        x = pixel_values.to(weight_dtype).reshape(n, *spec.size)
        if spec.is_series:
            gd, gh, gw, gt = spec.grid
            pd, ph, pw, pt = spec.patch
            if any(spec.dropped):  # Conv3d's floor for the 4D blocks: trailing voxels unseen
                x = x[:, : gd * pd, : gh * ph, : gw * pw, : gt * pt]
            # (N, gD,pD, gH,pH, gW,pW, gT,pT) -> (N, gD,gH,gW,gT, pD,pH,pW,pT): one row per block
            x = x.reshape(n, gd, pd, gh, ph, gw, pw, gt, pt)
            x = x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(n, spec.num_tokens, -1)
            tokens = proj(x)
        else:
            tokens = (
                proj(x.unsqueeze(1)).flatten(2).transpose(1, 2)
            )  # (N, E, gD,gH,gW) -> (N, L, E)
        return tokens + self.pos_embedding(modality)

    def extra_repr(self) -> str:
        parts = [
            f"{m}: size={s.size} patch={s.patch} tokens={s.num_tokens}"
            for m, s in self.specs.items()
        ]
        return f"embed_dim={self.embed_dim}, " + "; ".join(parts)
