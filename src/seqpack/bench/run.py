"""Run each (model, mode) on the same batches: real training steps, timed, with peak memory.

For every mode a fresh model is built from the same seed, so the first step of every mode starts
from identical weights on identical tokens and its loss must agree with the other modes': that is
the benchmark's correctness check. The first ``warmup`` steps (kernel selection, flex_attention's
compilation, allocator growth) are timed apart; the rest are timed as one stretch between two
device synchronisations, with per-step device events for the median; a timed step over 1.5x
(``STALL_FACTOR``) the time its real tokens predict (``count_stalls``) counts as a stall.

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

Several processes (``cfg.parallel``, see parallel.py): every rank trains its own batches of each
step (``plan[step][rank]``) through DDP or FSDP2, the model patched before it is wrapped. The loss
is normalised as the HF Trainer does by default: ``num_items_in_batch`` is the number of target
tokens (``labels[..., 1:] != -100``) of every rank's batch of the step, summed over the ranks (one
all-reduce for all steps, before the first), and each rank backpropagates ``loss * world_size``
because the wrappers average gradients; a step's loss is the sum of the ranks' losses, the loss of
the global batch, so the first-loss check compares modes as it does on one process. The timed
stretch starts and ends at a barrier; a step takes as long as its slowest rank. A rank's wall time
per step cannot show imbalance (the gradient collectives make the others wait for the slowest),
so each rank also records its *busy* time: from the step's start until its backward has produced
the gradient of the input embeddings' output, i.e. all its forward and backward compute; DDP
all-reduces the full buckets alongside it, and the wait for the slowest rank comes after. (FSDP2
all-gathers every layer's weights in the forward and again in the backward, which makes every rank
keep pace with the slowest layer by layer, so there the busy times understate the imbalance; the
token ratio does not.) Memory is the largest rank's.
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

from . import media, parallel
from .modes import IGNORE_INDEX, MODES, ModeOptions, pad_batch
from .parallel import Parallel
from .presets import depth_label, load_model, model_config

LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# A timed step slower than this many times the median step is a stall (a kernel planned or
# compiled for a new length, an allocator growing): long and uneven sequences show them.
STALL_FACTOR = 1.5


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
    parallel: Parallel | None = None  # None: one process, no wrapper
    layers: int | None = None  # build the model at this depth (--layers)


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
    stalled_steps: int = 0  # timed steps over STALL_FACTOR x the time their tokens predict
    # graphs dynamo compiled during the timed steps (a recompile there is a stall; dynamo's own
    # "recompiles" counter missed inductor's guards on the packed length)
    graphs_in_timed_steps: int = 0
    tokens_per_s: float = 0.0
    real_tokens: int = 0  # every rank's, in the timed steps
    padded_tokens: int = 0
    world_size: int = 1
    shard: str = ""  # "ddp" or "fsdp2" under several processes
    tokens_per_s_per_process: float = 0.0
    # Per timed step, the largest rank's value over the ranks' mean; the worst step and the mean.
    token_imbalance_max: float = 1.0
    token_imbalance_mean: float = 1.0
    busy_imbalance_max: float = 1.0
    busy_imbalance_mean: float = 1.0
    rank_real_tokens: list[list[int]] = field(default_factory=list)  # (timed steps, ranks)
    rank_step_times_s: list[list[float]] = field(default_factory=list)  # (timed steps, ranks)
    rank_busy_s: list[list[float]] = field(default_factory=list)  # (timed steps, ranks); [] on one
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard (DTensor): this rank's part


def _state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the distinct storages behind parameters, their gradients and optimizer state."""
    tensors = [_local(t) for p in model.parameters() for t in (p, p.grad) if t is not None]
    if optimizer is not None:
        tensors += [
            _local(t)
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
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

    def __init__(self, label: str, total: int, warmup: int, stream=None, quiet: bool = False):
        self.label, self.total, self.warmup, self.quiet = label, total, warmup, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._draw()

    def _draw(self) -> None:
        if not self.tty or self.quiet:
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
        if self.quiet:
            return
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
    model, inputs: dict, device: torch.device, context=contextlib.nullcontext, scale: int = 1
) -> torch.Tensor:
    with context():
        loss = model(**_to_device(inputs, device), use_cache=False).loss
        # scale = world size: DDP and FSDP2 average the gradients over the ranks, and each rank's
        # loss is already its share of the global batch's (num_items_in_batch counts every rank's).
        (loss * scale if scale != 1 else loss).backward()
    return loss


def _train_step(
    model, optimizer, inputs: dict, device: torch.device, context=contextlib.nullcontext, scale: int = 1
) -> torch.Tensor:
    loss = _forward_backward(model, inputs, device, context, scale)
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)  # what Trainer, Accelerate and optimizer.zero_grad() do
    return loss.detach()


def _token_counts(batches: list[list[list[int]]]) -> tuple[int, int]:
    real = sum(len(e) for batch in batches for e in batch)
    padded = sum(len(batch) * max(len(e) for e in batch) for batch in batches)
    return real, padded


def _imbalance(per_step: list[list[float]]) -> tuple[float, float]:
    """(worst, mean) over the steps of (largest rank's value / the ranks' mean); NaN if one is unknown."""
    ratios = []
    for values in per_step:
        mean = sum(values) / len(values)
        if not (mean > 0 and all(math.isfinite(v) for v in values)):
            return math.nan, math.nan
        ratios.append(max(values) / mean)
    if not ratios:
        return math.nan, math.nan
    return max(ratios), sum(ratios) / len(ratios)


def _largest(values: list[float]) -> float:
    return math.nan if any(not math.isfinite(v) for v in values) else max(values)


class _BusyClock:
    """When each step's backward has produced the gradient of the input embeddings' output.

    That is the end of this rank's own forward and backward compute (the embedding's weight
    gradient, left after it, is a scatter-add): the time from the step's start to it is the rank's
    busy time, the waits for the other ranks excluded where the wrapper lets them run alongside
    (DDP's bucket all-reduces). CUDA: an event recorded in the hook, on the backward's stream.
    """

    def __init__(self, embeddings: torch.nn.Module, cuda: bool):
        self.cuda = cuda
        self.step = 0
        self.marks: dict[int, object] = {}
        self._handle = embeddings.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            step = self.step
            output.register_hook(lambda grad: self._mark(step))

    def _mark(self, step: int) -> None:
        # A later mark of the same step wins: an embedding called twice gets its first call's
        # gradient last.
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[step] = event
        else:
            self.marks[step] = time.perf_counter()

    def busy(self, step: int, start) -> float:
        """Seconds from ``start`` (perf_counter, or a CUDA event) to the step's mark; NaN without one."""
        mark = self.marks.get(step)
        if mark is None:
            return math.nan
        return start.elapsed_time(mark) / 1e3 if self.cuda else mark - start

    def remove(self) -> None:
        self._handle.remove()


def _setup(model_name: str, mode, options: ModeOptions, batches, cfg: BenchConfig):
    """The mode's model, this rank's inputs, and FSDP2's layers: no collectives in here."""
    _release_memory(cfg.device)
    # Each mode compiles as a new process would. Every model's decoder layers are called through
    # one function (transformers' GradientCheckpointingLayer.__call__), whose compiled-code cache
    # would otherwise fill dynamo's recompile limit (8) after a few models of a --model list,
    # leaving the later models' layers silently uncompiled.
    torch._dynamo.reset()
    model = load_model(
        model_name,
        attn_implementation=mode.attn_implementation(options),
        dtype=cfg.dtype,
        device=cfg.device,
        seed=cfg.seed,
        random_init=cfg.random_init,
        layers=cfg.layers,
    )
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    inputs = [mode.collate(batch, pad_id) for batch in batches]
    spec = media.image_spec(model.config)
    if spec is not None:
        if mode.collate is not pad_batch:
            raise ValueError(
                f"mode {mode.name!r} collates no images: transformers' flattening collator takes text "
                "only (and TRL refuses padding-free for vision-language models)"
            )
        inputs = [media.attach(x, spec, cfg.seed) for x in inputs]
    model = mode.prepare(model, options)  # patch before any wrapper: the layers it compiles are sharded
    fsdp2 = cfg.parallel is not None and cfg.parallel.shard == "fsdp2"
    layers = parallel.decoder_layers(model) if fsdp2 else []
    return model, inputs, layers


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _without_grad_sync(ddp_model, inner):
    """A step context: DDP's ``no_sync()`` together with the mode's own."""

    @contextlib.contextmanager
    def context():
        with ddp_model.no_sync(), inner():
            yield

    return context


def _count_targets(inputs: list[dict]) -> None:
    """Add transformers' ``num_items_in_batch`` to each step's inputs: every rank's target tokens.

    The Trainer's count (``labels[..., 1:] != -100``, gathered over the ranks), for all steps in
    one all-reduce before the first instead of one per step.
    """
    local = [int((x["labels"][..., 1:] != IGNORE_INDEX).sum()) for x in inputs]
    for x, count in zip(inputs, parallel.sum_over_ranks(local), strict=True):
        x["num_items_in_batch"] = torch.tensor(count)  # a tensor, as the Trainer's: no recompile per value


@functools.cache
def _takes_images(model_name: str) -> bool:
    return media.image_spec(model_config(model_name)) is not None


def run_mode(model_name: str, mode_name: str, plan: list[list[list[list[int]]]], cfg: BenchConfig) -> Result:
    """Train a fresh model for len(plan) steps in one mode; the first cfg.warmup are warm-up.

    Args:
        plan: ``plan[step][rank]``, a list of token-id lists: each rank's batch of each step, the
            same for every mode and in every process (one process: one batch a step).
    Returns:
        the Result (the same on every rank); on failure (out of memory included) with ``error``
        set, never raising, except under several processes after the mode's setup: a failure in
        the steps, where the ranks wait on each other, raises (see parallel.py).
    """
    mode = MODES[mode_name]
    par = cfg.parallel
    rank, world = (par.rank, par.world_size) if par else (0, 1)
    options = ModeOptions(cfg.device, cfg.hf_attn, cfg.seqpack_backend, cfg.memory_budget)
    result = Result(
        depth_label(model_name, cfg.layers) + (" + images" if _takes_images(model_name) else ""),
        mode_name,
        steps=len(plan) - cfg.warmup,
        warmup_steps=cfg.warmup,
        world_size=world,
        shard=par.shard if par else "",
    )
    timed = plan[cfg.warmup :]
    result.real_tokens, result.padded_tokens = _token_counts([batch for step in timed for batch in step])
    result.rank_real_tokens = [[sum(map(len, batch)) for batch in step] for step in timed]
    result.token_imbalance_max, result.token_imbalance_mean = _imbalance(result.rank_real_tokens)
    batches = [step[rank] for step in plan]  # this rank's
    cuda = cfg.device.type == "cuda"
    meter = memory_meter(cfg.device)
    result.mem_method = meter.method
    progress = Progress(f"{model_name} / {mode_name}", len(plan), cfg.warmup, quiet=rank != 0)
    model = optimizer = clock = None
    in_steps = False  # under several processes: past the point where a failure can be agreed on
    try:
        error = None
        try:
            model, inputs, layers = _setup(model_name, mode, options, batches, cfg)
            result.attn_implementation = mode.describe_attention(model, options)
        except Exception as e:
            error = e
        if par is not None:
            error = parallel.agree(error)
        if error is not None:
            raise error
        scale = 1
        if par is not None:
            in_steps = True
            _count_targets(inputs)
            embeddings = model.get_input_embeddings()
            model = parallel.wrap(model, par, cfg.device, layers)
            clock = _BusyClock(embeddings, cuda)
            scale = world
        optimizer = _make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.device)

        losses, events, starts = [], [], []
        warmup_start = time.perf_counter()
        timed_start = warmup_start
        for i, step_inputs in enumerate(inputs):
            if i == cfg.warmup:
                if cuda:
                    torch.cuda.synchronize(cfg.device)
                if par is not None:
                    parallel.barrier(cfg.device)  # every rank starts the timed stretch together
                timed_start = time.perf_counter()
                result.warmup_time_s = timed_start - warmup_start
                graphs_before = _graphs()
            if clock is not None:
                clock.step = i
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                start = time.perf_counter()
            starts.append(start)
            losses.append(_train_step(model, optimizer, step_inputs, cfg.device, mode.step_context, scale))
            if cuda:
                end.record()
                events.append((start, end))
            else:
                events.append(time.perf_counter() - start)
            progress.step()
        if cuda:
            torch.cuda.synchronize(cfg.device)
        if par is not None:
            parallel.barrier(cfg.device)  # ... and it ends when the slowest is done
        end_time = time.perf_counter()
        if cfg.warmup >= len(inputs):
            result.warmup_time_s = end_time - warmup_start
        else:
            result.time_s = end_time - timed_start
            result.graphs_in_timed_steps = _graphs() - graphs_before
        step_times = [s.elapsed_time(e) / 1e3 for s, e in events] if cuda else events
        busy = []
        if clock is not None:
            busy = [clock.busy(i, starts[i]) for i in range(cfg.warmup, len(inputs))]
            clock.remove()
        local_losses = [float(loss) for loss in losses]

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
        context = mode.step_context
        if par is not None and par.shard == "ddp":
            # No gradient all-reduce: a rank out of memory here leaves no other rank waiting in one
            # (the forward's buffer broadcast comes before any compute).
            context = _without_grad_sync(model, mode.step_context)
        note = ""
        try:
            activation = meter.activation(
                functools.partial(_forward_backward, model, inputs[biggest], cfg.device, context, scale)
            )
            held_mb, peak_mb = held / 2**20, (held + activation) / 2**20
        except torch.cuda.OutOfMemoryError:  # the timed steps fit; report them, with no memory figure
            if par is not None and par.shard == "fsdp2":
                raise  # the other ranks wait in this step's all-gathers
            held_mb = peak_mb = math.nan
            note = ", memory step out of memory"

        if par is None:
            result.step_times_s = step_times[cfg.warmup :]
            result.rank_step_times_s = [[t] for t in result.step_times_s]
            result.losses = local_losses
        else:
            mine = {
                "steps": step_times,
                "busy": busy,
                "warmup": result.warmup_time_s,
                "time": result.time_s,
                "losses": local_losses,
                "held": held_mb,
                "peak": peak_mb,
                "note": note,
            }
            ranks = parallel.gather(mine)
            per_step = [list(column) for column in zip(*(r["steps"] for r in ranks), strict=True)]
            result.rank_step_times_s = per_step[cfg.warmup :]
            result.step_times_s = [max(column) for column in result.rank_step_times_s]
            result.rank_busy_s = [list(column) for column in zip(*(r["busy"] for r in ranks), strict=True)]
            result.busy_imbalance_max, result.busy_imbalance_mean = _imbalance(result.rank_busy_s)
            result.warmup_time_s = max(r["warmup"] for r in ranks)
            result.time_s = max(r["time"] for r in ranks)
            # Each rank's loss is its tokens' share of the global mean: their sum is the step's loss.
            result.losses = [sum(column) for column in zip(*(r["losses"] for r in ranks), strict=True)]
            held_mb, peak_mb = _largest([r["held"] for r in ranks]), _largest([r["peak"] for r in ranks])
            note = next((r["note"] for r in ranks if r["note"]), "")
        result.step_time_median_s = statistics.median(result.step_times_s) if result.step_times_s else 0.0
        result.stalled_steps = count_stalls(result)
        result.tokens_per_s = result.real_tokens / result.time_s if result.time_s > 0 else 0.0
        result.tokens_per_s_per_process = result.tokens_per_s / world
        result.first_loss = result.losses[0]
        result.held_mem_mb, result.peak_mem_mb = held_mb, peak_mb
        result.activation_mem_mb = result.peak_mem_mb - result.held_mem_mb
        progress.close(
            f"(warm-up {result.warmup_time_s:.1f}s, compile included; the table's timed steps "
            f"{result.time_s:.2f}s, {result.tokens_per_s:,.0f} token/s{note})"
        )
    except Exception as e:  # one mode failing (OOM, an unsupported model) must not hide the others
        if in_steps:  # under several processes: end this process; the launcher stops the others
            progress.close(f"FAILED: {type(e).__name__}")
            raise
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        if oom:
            result.error = "out of memory"
        elif isinstance(e, parallel.RankFailed):  # the failing rank prints the traceback
            result.error = str(e)
        else:
            result.error = f"{type(e).__name__}: {e}"
        progress.close(f"FAILED: {result.error.splitlines()[0]}")
        if not oom and not isinstance(e, parallel.RankFailed):
            traceback.print_exc()
    finally:
        if clock is not None:
            clock.remove()
        del model, optimizer, clock  # the next mode's _release_memory collects them
    return result


# --------------------------------------------------------------------------- the checks


def count_stalls(result: Result) -> int:
    """Timed steps that took over STALL_FACTOR x the time their real tokens predict.

    The prediction is a line, time = fixed + per_token * tokens, fitted robustly (Theil-Sen: the
    median of the pairwise slopes, then the median intercept) to the timed steps themselves, so a
    stall does not move it. Batches of uneven lengths carry uneven work, and every step also pays
    a fixed cost (the optimizer step: about 45 ms for a 7B model): measured on long data,
    mistral-7b steps of 866-7,430 tokens took 0.14-0.65 s, on one line. A plain median per token
    would call the smallest batch a stall; a plain median per step, the largest. A step's tokens
    are every rank's (``rank_real_tokens``); without them (a record built by hand), or when every
    step has as many, the line is flat at the median step time.

    Example:
        >>> count_stalls(Result("m", "padding", step_times_s=[1.0, 1.0, 1.6, 1.0], step_time_median_s=1.0))
        1
    """
    times = result.step_times_s
    if not times:
        return 0
    tokens = [sum(step) for step in result.rank_real_tokens]
    if len(tokens) != len(times):
        tokens = [1] * len(times)
    pairs = [(i, j) for i in range(len(times)) for j in range(i + 1, len(times)) if tokens[i] != tokens[j]]
    slope = 0.0
    if pairs:
        slope = max(0.0, statistics.median((times[j] - times[i]) / (tokens[j] - tokens[i]) for i, j in pairs))
    fixed = statistics.median(t - slope * n for t, n in zip(times, tokens, strict=True))
    return sum(t > STALL_FACTOR * (fixed + slope * n) for t, n in zip(times, tokens, strict=True))


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
