"""Run each (model, mode) on the same batches: real training steps, timed, with peak memory.

For every mode a fresh model is built from the same seed, so the first step of every mode starts
from identical weights on identical tokens and its loss must agree with the other modes': that is
the benchmark's correctness check. The first ``warmup`` steps (kernel selection, flex_attention's
compilation, allocator growth) are timed apart; the rest are timed as one stretch between two
device synchronisations, with per-step device events for the median.

Memory, per mode, from one extra step after the timed stretch (the *memory step*). The timed steps
free the gradients after each optimizer step, as Trainer, Accelerate and ``optimizer.zero_grad()``
do; the memory step first allocates every gradient, so that its peak is the most the mode needs:
- ``held``: weights, gradients and optimizer state, with every gradient allocated.
- ``activation``: the most the memory step's forward and backward allocate on top of weights and
  gradients. The optimizer state takes no part in them, so it is dropped first (and counted in
  ``held``): a padded 7B model's step then fits an 80 GB card.
- ``peak`` = held + activation.
The memory step replays the batch with the most padded tokens, the same batch for every mode; if
it runs out of memory, the mode's timings stand and its memory figures are NaN.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the step.
- CPU: the process's peak resident set (``VmHWM``), reset through ``/proc/self/clear_refs`` after
  ``gc.collect`` and ``malloc_trim`` hand freed memory back to the OS, minus the resident set at
  that moment; ``held`` counts the state tensors' bytes one by one. That is memory the step
  touched, allocator slack included: an honest upper bound, noisier than the CUDA figure. Where
  Linux's ``clear_refs`` is unavailable, ``ru_maxrss`` is used and flagged: it is process-wide,
  so a step can inherit earlier peaks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from .modes import MODES, ModeOptions
from .presets import load_model

LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@dataclass
class BenchConfig:
    """Everything a run needs besides the batches."""

    batch_size: int = 16
    steps: int = 10
    warmup: int = 2
    seed: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-5
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    random_init: bool = False
    hf_attn: str | None = None
    seqpack_backend: str = "auto"
    memory_budget: float | None = None


@dataclass
class Result:
    """One (model, mode): the JSON record, less the run-wide fields that report.py adds."""

    model: str
    mode: str
    attn_implementation: str = ""
    steps: int = 0
    warmup_steps: int = 0
    warmup_time_s: float = 0.0
    time_s: float = 0.0
    step_time_median_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    peak_mem_mb: float = 0.0
    held_mem_mb: float = 0.0
    activation_mem_mb: float = 0.0
    mem_method: str = ""
    first_loss: float = math.nan
    losses: list[float] = field(default_factory=list)
    loss_rel_diff: float = 0.0
    loss_mismatch: bool = False
    speedup: float = math.nan
    error: str | None = None


# --------------------------------------------------------------------------- memory


class _CudaMemory:
    method = "torch.cuda.max_memory_allocated over one forward + backward with every gradient allocated"

    def __init__(self, device: torch.device):
        self.device = device

    def held(self, model, optimizer) -> int:
        """Bytes allocated now: weights, gradients and optimizer state between steps."""
        gc.collect()
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def activation(self, run_step) -> int:
        """Bytes ``run_step`` allocated at its peak over what was allocated before it."""
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        run_step()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - start


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the distinct storages behind parameters, their gradients and optimizer state."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    if optimizer is not None:
        tensors += [
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class _RssMemory:
    method = (
        "peak RSS (VmHWM) over one forward + backward with every gradient allocated, reset via /proc/self/clear_refs; "
        "held = bytes of weights + grads + optimizer state"
    )

    def __init__(self):
        libc_name = ctypes.util.find_library("c")
        self._trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 resets the peak RSS (VmHWM) to the current RSS
            _status_kb("VmHWM")
            self.resettable = True
        except OSError:
            self.resettable = False
            self.method = (
                "ru_maxrss (process-wide peak: can include earlier steps); "
                "held = bytes of weights + grads + optimizer state"
            )

    def _rss(self) -> int:
        if self.resettable:
            return _status_kb("VmRSS") * 1024
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _high_water(self) -> int:
        if self.resettable:
            return _status_kb("VmHWM") * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def held(self, model, optimizer) -> int:
        """Bytes of weights, gradients and optimizer state, counted tensor by tensor."""
        return _state_bytes(model, optimizer)

    def activation(self, run_step) -> int:
        """Bytes the resident set grew by at its peak during ``run_step``."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)  # hand memory that freed tensors left in malloc's arenas back to the OS
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        start = self._rss()
        run_step()
        return max(self._high_water() - start, 0)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def memory_meter(device: torch.device):
    return _CudaMemory(device) if device.type == "cuda" else _RssMemory()


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr (a line per mode when stderr is not a terminal)."""

    def __init__(self, label: str, total: int, warmup: int, stream=None):
        self.label, self.total, self.warmup = label, total, warmup
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._draw()

    def _draw(self) -> None:
        if not self.tty:
            return
        width = 24
        filled = width * self.done // max(self.total, 1)
        phase = "warm-up" if self.done < self.warmup else "timed"
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label:<34} [{bar}] {self.done}/{self.total} {phase} {elapsed:6.1f}s")
        self.stream.flush()

    def step(self) -> None:
        self.done += 1
        self._draw()

    def close(self, note: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.label:<34} {self.done}/{self.total} steps in {elapsed:.1f}s {note}\n")
        self.stream.flush()


# --------------------------------------------------------------------------- one mode


def _make_optimizer(name: str, params, lr: float, device: torch.device):
    if name == "none":
        return None
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        # The fused kernel is what a tuned training loop uses (CUDA, and the CPU since torch 2.4);
        # the per-tensor fallback costs a CPU step more than a tiny model's forward.
        try:
            return torch.optim.AdamW(params, lr=lr, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def _to_device(inputs: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
    }


def _forward_backward(
    model, inputs: dict, device: torch.device, context=contextlib.nullcontext
) -> torch.Tensor:
    with context():
        loss = model(**_to_device(inputs, device), use_cache=False).loss
        loss.backward()
    return loss


def _train_step(
    model, optimizer, inputs: dict, device: torch.device, context=contextlib.nullcontext
) -> torch.Tensor:
    loss = _forward_backward(model, inputs, device, context)
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)  # what Trainer, Accelerate and optimizer.zero_grad() do
    return loss.detach()


def _token_counts(batches: list[list[list[int]]]) -> tuple[int, int]:
    real = sum(len(e) for batch in batches for e in batch)
    padded = sum(len(batch) * max(len(e) for e in batch) for batch in batches)
    return real, padded


def run_mode(model_name: str, mode_name: str, batches: list[list[list[int]]], cfg: BenchConfig) -> Result:
    """Train a fresh model for len(batches) steps in one mode; the first cfg.warmup are warm-up.

    Args:
        batches: lists of token-id lists, the same for every mode.
    Returns:
        the Result; on failure (out of memory included) with ``error`` set, never raising.
    """
    mode = MODES[mode_name]
    options = ModeOptions(cfg.device, cfg.hf_attn, cfg.seqpack_backend, cfg.memory_budget)
    result = Result(model_name, mode_name, steps=len(batches) - cfg.warmup, warmup_steps=cfg.warmup)
    result.real_tokens, result.padded_tokens = _token_counts(batches[cfg.warmup :])
    cuda = cfg.device.type == "cuda"
    meter = memory_meter(cfg.device)
    result.mem_method = meter.method
    progress = Progress(f"{model_name} / {mode_name}", len(batches), cfg.warmup)
    model = optimizer = None
    try:
        _release_memory(cfg.device)
        model = load_model(
            model_name,
            attn_implementation=mode.attn_implementation(options),
            dtype=cfg.dtype,
            device=cfg.device,
            seed=cfg.seed,
            random_init=cfg.random_init,
        )
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        inputs = [mode.collate(batch, pad_id) for batch in batches]
        model = mode.prepare(model, options)
        result.attn_implementation = mode.describe_attention(model, options)
        optimizer = _make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.device)

        losses, events = [], []
        warmup_start = time.perf_counter()
        timed_start = warmup_start
        for i, step_inputs in enumerate(inputs):
            if i == cfg.warmup:
                if cuda:
                    torch.cuda.synchronize(cfg.device)
                timed_start = time.perf_counter()
                result.warmup_time_s = timed_start - warmup_start
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                step_start = time.perf_counter()
            losses.append(_train_step(model, optimizer, step_inputs, cfg.device, mode.step_context))
            if cuda:
                end.record()
                events.append((start, end))
            else:
                events.append(time.perf_counter() - step_start)
            progress.step()
        if cuda:
            torch.cuda.synchronize(cfg.device)
        end_time = time.perf_counter()
        if cfg.warmup >= len(inputs):
            result.warmup_time_s = end_time - warmup_start
        else:
            result.time_s = end_time - timed_start
        step_times = [s.elapsed_time(e) / 1e3 for s, e in events] if cuda else events
        result.step_times_s = step_times[cfg.warmup :]
        result.step_time_median_s = statistics.median(result.step_times_s) if result.step_times_s else 0.0
        result.tokens_per_s = result.real_tokens / result.time_s if result.time_s > 0 else 0.0
        result.losses = [float(loss) for loss in losses]
        result.first_loss = result.losses[0]

        # The memory step: forward and backward with every gradient allocated, so that its peak is
        # the most this mode needs. The optimizer state takes no part in them: its bytes count in
        # `held`, and the state is dropped before the step (it is the mode's last), which lets the
        # padded 7B model's step be measured on an 80 GB card.
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        held = meter.held(model, optimizer)
        if optimizer is not None:
            optimizer.state.clear()
        biggest = max(range(len(batches)), key=lambda i: len(batches[i]) * max(map(len, batches[i])))
        note = ""
        try:
            activation = meter.activation(
                functools.partial(_forward_backward, model, inputs[biggest], cfg.device, mode.step_context)
            )
            result.held_mem_mb, result.peak_mem_mb = held / 2**20, (held + activation) / 2**20
        except torch.cuda.OutOfMemoryError:  # the timed steps fit; report them, with no memory figure
            result.held_mem_mb = result.peak_mem_mb = math.nan
            note = ", memory step out of memory"
        result.activation_mem_mb = result.peak_mem_mb - result.held_mem_mb
        progress.close(f"({result.tokens_per_s:,.0f} token/s{note})")
    except Exception as e:  # one mode failing (OOM, an unsupported model) must not hide the others
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        result.error = "out of memory" if oom else f"{type(e).__name__}: {e}"
        progress.close(f"FAILED: {result.error.splitlines()[0]}")
        if not oom:
            traceback.print_exc()
    finally:
        del model, optimizer  # the next mode's _release_memory collects them
    return result


# --------------------------------------------------------------------------- the checks


@dataclass
class LossCheck:
    """How far each model's first-step losses spread across modes."""

    max_rel_diff: float
    tolerance: float
    mismatched: list[tuple[str, str]]  # (model, mode) past tolerance, or with a non-finite loss

    @property
    def ok(self) -> bool:
        return not self.mismatched


def check_first_losses(results: list[Result], tolerance: float) -> LossCheck:
    """Compare every mode's first loss with its model's reference mode ('padding' if it ran).

    Sets ``loss_rel_diff`` and ``loss_mismatch`` on each result that ran.
    """
    worst, mismatched = 0.0, []
    for model in dict.fromkeys(r.model for r in results):
        ran = [r for r in results if r.model == model and r.error is None]
        if not ran:
            continue
        ref = next((r for r in ran if r.mode == "padding"), ran[0])
        for r in ran:
            diff = abs(r.first_loss - ref.first_loss) / max(abs(ref.first_loss), 1e-12)
            if not math.isfinite(r.first_loss) or not math.isfinite(diff):
                diff = math.inf
            r.loss_rel_diff = diff
            r.loss_mismatch = diff > tolerance
            worst = max(worst, diff)
            if r.loss_mismatch:
                mismatched.append((r.model, r.mode))
    return LossCheck(worst, tolerance, mismatched)


def set_speedups(results: list[Result]) -> None:
    """Throughput of each mode over its model's 'padding' mode (or its first mode that ran)."""
    for model in dict.fromkeys(r.model for r in results):
        ran = [r for r in results if r.model == model and r.error is None and r.tokens_per_s > 0]
        if not ran:
            continue
        ref = next((r for r in ran if r.mode == "padding"), ran[0])
        for r in ran:
            r.speedup = r.tokens_per_s / ref.tokens_per_s
