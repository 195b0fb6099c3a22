"""Random init that does not depend on how the model was constructed.

Why: a random base drawn by transformers' ordinary path depends on the order and the device of
every draw. Built whole it draws one stream from the seed; built partitioned under ZeRO-3
(modules constructed without init, then initialised module by module) it draws another, and on
CUDA `zero.Init` draws with the CUDA generator, so no one-process rebuild could reproduce a ZeRO-3
run's base (evaluation refused it on another machine). Here every draw into a parameter uses a
CPU generator seeded by (seed, parameter name) alone, in fp32, and the result is copied into the
parameter wherever it lives (whole, gathered ZeRO-3 partition, GPU, bf16). ZeRO-0/1/2/3, one
process or many, CPU or CUDA: the same values.

What stays: each module's own init rule. The rules are transformers' (`_init_weights` of the
nearest `PreTrainedModel`, dispatched as `PreTrainedModel.initialize_weights` does: LayerNorm
weight 1 and bias 0, padding rows 0, SigLIP's xavier and lecun rules, the config's
`initializer_range`), run in transformers' module order, so a parameter that two rules touch (a
child's generic rule, then its parent's) keeps the last rule's value, as before. Only the random
stream changes: each random init function (`normal_`, `xavier_uniform_`, ...) is intercepted
and draws from the parameter's own generator, restarted at each call.

No DeepSpeed here: the caller passes `access`, the context that makes a module's parameters
whole for the init (ZeRO-3 gathers them and says which rank writes).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init

INIT_SCHEME = "name-seeded-v1"  # recorded in the base record; a new stream needs a new name

# (params, index of the module) -> context yielding whether this process writes the values
Access = Callable[[Sequence[nn.Parameter], int], AbstractContextManager[bool]]

# Random init functions (they take `generator=`); the others (zeros_, ones_, constant_, copy_, eye_,
# dirac_) draw nothing and run in place on whatever they are given.
_RANDOM = (
    "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def whole_access(params: Sequence[nn.Parameter], index: int) -> Iterator[bool]:
    """Parameters that are already whole in this process: write them here."""
    yield True


def tensor_seed(seed: int, name: str) -> int:
    """The 63-bit seed of one tensor's stream: (seed, parameter name), nothing else."""
    digest = hashlib.sha256(f"umbrella-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _Draws:
    """Patched init functions: a random draw into a known parameter comes from its own stream."""

    def __init__(
        self, seed: int, names: dict[int, str], last: dict[str, tuple[int, int]] | None = None
    ) -> None:
        self.seed = seed
        self.names = names  # id(parameter) -> canonical name
        self.written: set[int] = set()  # ids of the parameters some rule wrote in this process
        self.guarded = {f: getattr(hf_init, f) for f in hf_init.TORCH_INIT_FUNCTIONS}
        # (module index, write number within that module's rule) of each parameter's last full
        # write: the earlier ones are overwritten, so they are skipped (see _last_writes)
        self.last = last
        self.module = -1
        self.seen: dict[str, int] = {}

    def start_module(self, index: int) -> None:
        self.module, self.seen = index, {}

    def superseded(self, tensor: torch.Tensor) -> bool:
        """Whether this write to a whole parameter is overwritten later (so need not run)."""
        name = self.names.get(id(tensor))
        if name is None:
            return False  # a slice (a padding row) or a buffer: always written
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.last is None:
            return False
        return self.last.get(name) != (self.module, self.seen[name])

    def record(self, fn_name: str) -> Callable:
        """A non-random init function (guarded, as transformers' own), noting what it wrote."""
        guarded = self.guarded[fn_name]

        def write(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.written.add(id(tensor))
            if self.superseded(tensor):
                return tensor
            return guarded(tensor, *args, **kwargs)

        return write

    def wrap(self, fn_name: str) -> Callable:
        original = hf_init.TORCH_INIT_FUNCTIONS[fn_name]

        def draw(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if getattr(tensor, "_is_hf_initialized", False):
                return tensor  # transformers' guard: a loaded or tied tensor stays
            if self.superseded(tensor):
                self.written.add(id(tensor))
                return tensor
            name = self.names.get(id(tensor))
            if name is None:
                raise RuntimeError(
                    f"seeded init: {fn_name} draws into a tensor of shape {tuple(tensor.shape)} "
                    "that is not a parameter of the model, so it has no stream of its own"
                )
            kwargs["generator"] = torch.Generator("cpu").manual_seed(tensor_seed(self.seed, name))
            with torch.no_grad():
                whole_fp32 = tensor.device.type == "cpu" and tensor.dtype == torch.float32
                if whole_fp32 and tensor.is_contiguous():  # the same draw as into a scratch
                    original(tensor, *args, **kwargs)
                    self.written.add(id(tensor))
                    return tensor
                scratch = torch.empty(tensor.shape, dtype=torch.float32)
                original(scratch, *args, **kwargs)
                tensor.copy_(scratch)
            self.written.add(id(tensor))
            return tensor

        return draw

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """transformers' own init functions and torch.nn.init's (MultiheadAttention calls those)."""
        targets = [hf_init] + [
            sys.modules[m] for m in hf_init.TORCH_MODULES_TO_PATCH if m in sys.modules
        ]
        saved: list[tuple[object, str, object]] = []
        try:
            for module in targets:
                for fn_name in hf_init.TORCH_INIT_FUNCTIONS:
                    if not hasattr(module, fn_name):
                        continue
                    saved.append((module, fn_name, getattr(module, fn_name)))
                    wrapped = self.wrap(fn_name) if fn_name in _RANDOM else self.record(fn_name)
                    setattr(module, fn_name, wrapped)
            yield
        finally:
            for module, fn_name, fn in reversed(saved):
                setattr(module, fn_name, fn)


def _rule_order(model: PreTrainedModel) -> list[tuple[nn.Module, Callable]]:
    """(module, init rule) in `PreTrainedModel.initialize_weights`' order: children first, each
    module with the `_initialize_weights` of the nearest enclosing PreTrainedModel."""
    order: list[tuple[nn.Module, Callable]] = []

    def visit(module: nn.Module, rule: Callable) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else rule)
        order.append((module, rule))

    visit(model, model._initialize_weights)
    return order


def _touched(module: nn.Module) -> list[nn.Parameter]:
    """What a module's rule may write: its own parameters and its direct children's (SigLIP's
    attention rule initialises `q_proj.weight`), as transformers' ZeRO-3 init gathers them."""
    params = list(module.parameters(recurse=False))
    for child in module.children():
        if not isinstance(child, PreTrainedModel):
            params.extend(child.parameters(recurse=False))
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def init_by_name(model: PreTrainedModel, seed: int, access: Access = whole_access) -> None:
    """Initialise every parameter of a model constructed without init (`no_init_weights`).

    Every parameter must be drawn or set by some rule: a parameter no rule covers would keep
    whatever its construction left (device- and order-dependent), so that is an error.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    draws = _Draws(seed, names, _last_writes(model))
    elsewhere: set[int] = set()  # written by another rank (ZeRO-3): that rank checks them
    is_remote_code = model.is_remote_code()
    with torch.no_grad(), draws.patched():
        for index, (module, rule) in enumerate(_rule_order(model)):
            draws.start_module(index)
            params = _touched(module)
            if not params:
                rule(module, is_remote_code)
                continue
            with access(params, index) as writes:
                if writes:
                    rule(module, is_remote_code)
                else:
                    elsewhere.update(id(p) for p in params)
    missing = sorted(n for i, n in names.items() if i not in draws.written | elsewhere)
    if missing:
        raise RuntimeError(f"seeded init: no module's init rule covers {missing}")


def _last_writes(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """Where each parameter's last whole write happens: (module index, write number in that
    module's rule), found by running the rules with recording no-ops on a meta-device twin.

    Why: rules overwrite each other (a SigLIP Linear gets the generic `lecun_normal_`, then its
    attention module's `xavier_uniform_`), and each draw restarts the parameter's own stream, so
    only the last write decides the value. Skipping the others skips SigLIP's truncated normals,
    the slowest draws of the build (most of the 0.5B preset's init time). The twin has the
    model's names and rules and no storage; the real model may be partitioned."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        twin = type(model)._from_config(model.config)
    twin.tie_weights()
    names = {id(p): n for n, p in twin.named_parameters()}
    dry = _Draws(0, names)
    last: dict[str, tuple[int, int]] = {}

    def note(fn_name: str) -> Callable:
        def write(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            dry.superseded(tensor)  # counts the write
            name = names.get(id(tensor))
            if name is not None:
                last[name] = (dry.module, dry.seen[name])
            return tensor

        return write

    dry.wrap = note  # type: ignore[method-assign]
    dry.record = note  # type: ignore[method-assign]
    is_remote_code = twin.is_remote_code()
    with torch.no_grad(), dry.patched():
        for index, (module, rule) in enumerate(_rule_order(twin)):
            dry.start_module(index)
            rule(module, is_remote_code)
    return last
