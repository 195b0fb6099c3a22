"""``umbrella-train --find-micro-batch``: the largest micro-batch that fits, and its throughput.

Users should not guess ``train.micro_batch``: too small wastes the GPU, too large dies after the
job waited in the queue. The finder builds the model as the engine does (same preset, dtype,
per-tower checkpointing, ``train.compile``) in ONE process, then runs a real forward + backward
(``model_forward_loss``, the engine's loss) on synthetic batches of the config's shapes: every
sample carries one image of each configured modality plus ``text_tokens`` text tokens, of which
``answer_tokens`` are supervised. Sizes double from 1 until one does not fit, then bisect.

"Fits" means: no out-of-memory error and a peak below the cap: ``max_memory_gib`` when given,
else (GPU) the device's memory. On a GPU the peak is what training will need, ``cuda_need``:
``torch.cuda.max_memory_reserved`` over the step (what PyTorch's caching allocator took from the
device, fragmentation included; ``max_memory_allocated`` leaves that out) plus a margin for what
the allocator never sees: the CUDA context, NCCL's buffers (the finder runs alone, without NCCL;
training has them) and the allocator's step-to-step variation (see CUDA_* below). On the CPU it is
an estimate of what the step adds on top of the model: the process's resident set, sampled every
few milliseconds by a thread during the step, minus the resident set before it (glibc is told to return large blocks
to the system, so the next trial starts from a clean baseline). A CPU without a cap is only
bounded by ``max_micro_batch``.

Not modelled: DeepSpeed's own buffers (small here: only the patch embedding trains) and ZeRO-3
partitioning of the frozen weights (the finder holds them whole, so under ZeRO-3 it is
conservative).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
import time
from collections.abc import Callable

import torch

from umbrella_ds.config import RunConfig
from umbrella_ds.data.collate import to_device
from umbrella_ds.model import image_token_id, model_forward_loss, num_image_tokens
from umbrella_ds.train import env

GIB = 1024**3
# GPU headroom on top of the reserved peak, read from the sources (no device was available to
# measure them; benchmarks/device_check.sh records reserved and allocated on an H100):
# - the CUDA context with the kernels of torch, cuBLAS and cuDNN loaded: 0.5-1 GiB on CUDA 12
#   with lazy module loading (more without it); not counted by PyTorch's allocator.
# - NCCL: per peer and channel 4 MiB buffers (NCCL_BUFFSIZE) plus, on H100 with NVLink SHARP
#   (NVLS), multicast buffers of up to GBs (docs/ARCHITECTURE.md "Facts the code relies on");
#   allocated by NCCL itself, outside the caching allocator.
# - variation: real batches differ from the synthetic one (sequence lengths, the sampler's
#   modality mix) and the allocator's block rounding differs step to step; 5% of the peak.
CUDA_CONTEXT_GIB = 1.0
CUDA_NCCL_GIB = 2.0
CUDA_VARIATION = 0.05


@dataclasses.dataclass
class Trial:
    micro_batch: int
    fits: bool
    peak_gib: float | None
    samples_per_s: float | None
    reason: str = ""


class _CpuPeak:
    """Peak resident-set growth of this process while the context is open (sampling thread)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> _CpuPeak:
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def cuda_need(reserved_bytes: int) -> int:
    """Bytes a training rank needs on its GPU for a step whose reserved peak was ``reserved_bytes``
    in the finder's process: the peak, its variation margin, the context and NCCL's buffers."""
    margin = (CUDA_CONTEXT_GIB + CUDA_NCCL_GIB) * GIB
    return int(reserved_bytes * (1 + CUDA_VARIATION) + margin)


def memory_cap(max_memory_gib: float | None, device: torch.device) -> int | None:
    """The cap a trial's peak must stay under: the user's, else the GPU's memory, else none."""
    if max_memory_gib is not None:
        return int(max_memory_gib * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def _return_freed_memory_to_os() -> None:
    """Fixed mmap threshold: freed tensors leave the resident set, so trials do not inherit."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (disables the dynamic threshold)
    except OSError:
        pass  # not glibc: measurements stay valid, baselines only creep upwards


def synthetic_batch(
    model, cfg: RunConfig, micro_batch: int, text_tokens: int, answer_tokens: int, seed: int = 0
) -> dict:
    """A collate-shaped training batch: per sample, text, one image block per modality, answer."""
    if answer_tokens >= text_tokens:
        raise ValueError(f"answer_tokens={answer_tokens} must be < text_tokens={text_tokens}")
    g = torch.Generator().manual_seed(seed)
    img = image_token_id(model)
    mods = list(cfg.model.modalities)
    per_image = {m: num_image_tokens(model, m) for m in mods}
    prompt = text_tokens - answer_tokens
    seq = text_tokens + sum(per_image.values())
    ids = torch.randint(10, 500, (micro_batch, seq), generator=g)
    positions: dict[str, list[int]] = {m: [] for m in mods}
    for b in range(micro_batch):
        at = prompt
        for m in mods:
            ids[b, at : at + per_image[m]] = img
            positions[m].extend(range(b * seq + at, b * seq + at + per_image[m]))
            at += per_image[m]
    loss_pos = [
        b * seq + t for b in range(micro_batch) for t in range(seq - answer_tokens - 1, seq - 1)
    ]
    flat = ids.reshape(-1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "images": {
            m: torch.randn(micro_batch, *cfg.model.modalities[m].size, generator=g) for m in mods
        },
        "image_positions": {m: torch.tensor(p) for m, p in positions.items()},
        "loss_positions": torch.tensor(loss_pos),
        "loss_targets": flat[torch.tensor(loss_pos) + 1],
        "num_loss_tokens": len(loss_pos),
    }


def build_like_engine(cfg: RunConfig, device: torch.device):
    """The engine's model on one process: the factory's build, cast as DeepSpeed casts, compiled
    as training compiles it, so the finder measures the model training runs."""
    from umbrella_ds.train.compile import compile_blocks
    from umbrella_ds.train.factory import build_for_run, cast_like_deepspeed

    model = build_for_run(cfg).model
    cast_like_deepspeed(model, cfg.train.bf16)
    model = model.to(device).train()
    if cfg.train.compile == "blocks":
        compile_blocks(model)
    return model


def run_trial(
    model,
    cfg: RunConfig,
    micro_batch: int,
    device: torch.device,
    *,
    text_tokens: int,
    answer_tokens: int,
    steps: int,
    max_memory_gib: float | None,
) -> Trial:
    """One warm-up and ``steps`` timed forward+backward passes at ``micro_batch``."""
    mods = tuple(cfg.model.modalities)
    cuda = device.type == "cuda"
    batch = to_device(synthetic_batch(model, cfg, micro_batch, text_tokens, answer_tokens), device)

    def step() -> None:
        loss, _ = model_forward_loss(model, batch, batch["num_loss_tokens"], all_modalities=mods)
        loss.backward()

    cap = memory_cap(max_memory_gib, device)
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = cuda_need(torch.cuda.max_memory_reserved(device))
        else:
            with _CpuPeak() as meter:
                step()
            peak = meter.growth
        model.zero_grad(set_to_none=True)
        if cap is not None and peak > cap:
            limit = (
                f"{max_memory_gib}" if max_memory_gib is not None else f"the GPU's {cap / GIB:.1f}"
            )
            return Trial(micro_batch, False, peak / GIB, None, f"above {limit} GiB")
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        rate = micro_batch * steps / dt if steps and dt > 0 else None
        return Trial(micro_batch, True, peak / GIB, rate)
    except torch.cuda.OutOfMemoryError as e:
        return Trial(micro_batch, False, None, None, f"out of memory: {str(e).splitlines()[0]}")
    finally:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()


def search(try_size: Callable[[int], Trial], start: int, limit: int) -> list[Trial]:
    """Double from ``start`` until a size fails or passes ``limit``, then bisect the gap."""
    trials: list[Trial] = []
    size, good, bad = start, 0, None
    while size <= limit:
        t = try_size(size)
        trials.append(t)
        if not t.fits:
            bad = size
            break
        good = size
        size *= 2
    if bad is None:
        return trials
    while good and bad - good > 1:
        mid = (good + bad) // 2
        t = try_size(mid)
        trials.append(t)
        good, bad = (mid, bad) if t.fits else (good, mid)
    return trials


def format_table(trials: list[Trial], device: str) -> str:
    lines = [
        f"micro-batch search on {device}",
        f"{'micro_batch':>11} {'fits':>5} {'peak_GiB':>9} {'samples/s':>10}  note",
    ]
    for t in sorted(trials, key=lambda t: t.micro_batch):
        peak = f"{t.peak_gib:.3f}" if t.peak_gib is not None else "-"
        sps = f"{t.samples_per_s:.2f}" if t.samples_per_s is not None else "-"
        lines.append(
            f"{t.micro_batch:>11} {'yes' if t.fits else 'no':>5} {peak:>9} {sps:>10}  {t.reason}"
        )
    return "\n".join(lines)


def find_micro_batch(
    cfg: RunConfig,
    *,
    max_memory_gib: float | None = None,
    max_micro_batch: int = 1024,
    start: int = 1,
    steps: int = 2,
    text_tokens: int = 64,
    answer_tokens: int = 4,
    device: torch.device | None = None,
) -> tuple[Trial | None, list[Trial]]:
    """(largest fitting trial or None, every trial in the order run)."""
    if device is None:
        device = env.apply_device_rule(cfg.train.device)
    if device.type == "cpu":
        _return_freed_memory_to_os()
    torch.manual_seed(cfg.train.seed)
    model = build_like_engine(cfg, device)
    # One unmeasured step first: lazy initialisation and (train.compile=blocks) the first
    # compilation would otherwise count as the smallest size's memory and time.
    run_trial(model, cfg, start, device, text_tokens=text_tokens, answer_tokens=answer_tokens,
              steps=0, max_memory_gib=None)  # fmt: skip
    trials = search(
        lambda mb: run_trial(
            model,
            cfg,
            mb,
            device,
            text_tokens=text_tokens,
            answer_tokens=answer_tokens,
            steps=steps,
            max_memory_gib=max_memory_gib,
        ),
        start,
        max_micro_batch,
    )
    fitting = [t for t in trials if t.fits]
    return (max(fitting, key=lambda t: t.micro_batch) if fitting else None), trials


def device_label() -> str:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "").lower() != "cpu":
        return torch.cuda.get_device_name()
    return "cpu"
