"""How seqpack's training memory grows with sequence length, and the longest sequence that fits.

Usage: PYTHONPATH=src python benchmarks/memory_slope.py --models llama-3.2-1b,mistral-7b \
    [--lengths 2048,8192,32768] [--device cuda] [--budget-gb 80] [--json PATH] [--time-limit S]

Each preset (seqpack.bench.presets: a published config, random bf16 weights drawn on the device)
is built at two reduced depths and ``patch(model)``-ed with its defaults (compiled layers, fused
loss). Every gradient is allocated first and kept, as in the bench's memory step, and one warm-up
step at a small length compiles the layers. Then for each length T one forward + backward of ONE
sequence of T random ids (labels = ids) is measured as the bench measures activations
(``run.memory_meter``: CUDA ``max_memory_allocated`` above what was allocated before the step; on
a CPU the peak RSS, a noisy bound). A step that compiled a new graph is measured again.

The peaks are read as peak(L, T) = fixed(L) + T * (rest + L * per_layer): at each depth a line
through the two longest lengths (the fused loss's logit chunk, 2^28 / vocab tokens, grows with T
until T passes it, so the slope is taken where it no longer does), then both lines extrapolated
linearly in depth to the full model. Held memory at full depth is counted, not measured: the full
model's parameters (built on the meta device) x 8 bytes, i.e. bf16 weights, bf16 grads and
AdamW's exp_avg and exp_avg_sq in the weights' dtype (the bench's fused AdamW). Longest T =
(budget - held - fixed) / slope. Linearity: the slope over the two shortest lengths over the
slope over the two longest, at the deeper depth (1.0: memory per token flat in T).

Depths: 2 and 4 when the layers are all of one kind (sliding and full attention count as one: the
varlen kernels keep no T x T state). A hybrid whose layer kinds repeat with period p (Qwen3.5: 3
Gated DeltaNet, 1 attention) gets 2 and 2 + p, so that the difference is one period's average
layer; one with no period (Nemotron-H) gets 2 and 4 and is flagged approximate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import sys
import time

import torch
from torch._dynamo.utils import counters

from seqpack import patch
from seqpack.bench.presets import PRESETS, load_model, model_config
from seqpack.bench.report import environment
from seqpack.bench.run import memory_meter

HELD_BYTES_PER_PARAM = 8  # bf16 weight + bf16 grad + AdamW exp_avg + exp_avg_sq, in the weights' dtype
WARMUP_LENGTH = 300  # not a power of two: no size the graphs could take for a model dimension
MAX_ID = 32000  # ids every preset reads as text: a VLM's image and video placeholders sit above
ATTENTION = {"full_attention", "sliding_attention", "chunked_attention"}
# as the bench's seqpack mode builds its model
BUILD = dict(attn_implementation="sdpa", dtype=torch.bfloat16, seed=0, random_init=True)


@dataclasses.dataclass
class Slope:
    """One preset: peaks in bytes above held, and what follows from them (bytes, bytes per token)."""

    name: str
    layers: int = 0  # full depth
    params: int = 0
    depths: tuple[int, int] = (2, 4)
    approximate: bool = False  # a hybrid whose measured layers are not the full model's mix
    max_position_embeddings: int | None = None
    peaks: dict[int, dict[int, int | None]] = dataclasses.field(default_factory=dict)  # depth -> T -> peak
    per_layer: float = math.nan  # per token, each decoder layer
    rest: float = math.nan  # per token, not growing with depth (embeddings, head, loss, ...)
    slope: float = math.nan  # per token at full depth
    fixed: float = math.nan  # at full depth, not growing with T
    held: float = math.nan  # at full depth: params x HELD_BYTES_PER_PARAM
    longest: int | None = None  # tokens in the budget; None: held does not fit, or no slope
    linearity: dict[int, float] = dataclasses.field(default_factory=dict)  # depth -> ratio
    time_s: float = 0.0
    error: str | None = None


def _layer_kinds(config) -> list[str]:
    """Each decoder layer's kind, attention of any window as one kind."""
    text = config.get_text_config()
    kinds = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None)
    kinds = list(kinds or getattr(text, "hybrid_override_pattern", None) or [])
    if len(kinds) != text.num_hidden_layers:
        return ["layer"] * text.num_hidden_layers
    return ["attention" if k in ATTENTION else k for k in kinds]


def _depths(kinds: list[str]) -> tuple[tuple[int, int], bool]:
    """Two depths that differ by whole periods of the layer kinds; True where there is no period."""
    n = len(kinds)
    periods = (p for p in range(1, n // 2 + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))
    period = next(periods, None)
    step = 2 if period is None else period * math.ceil(2 / period)
    if 1 + step > n:  # a shallow model: the tiny preset has 2 layers
        step = period or 1
    first = 2 if 2 + step <= n else 1
    return (first, first + step), period is None


def _build(name: str, device: torch.device, layers: int | None = None) -> torch.nn.Module:
    return load_model(name, device=device, layers=layers, **BUILD)


def _step(model, ids: torch.Tensor) -> None:
    mask = torch.ones_like(ids)  # (1, T): one sequence
    model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_depth(name: str, depth: int, lengths: list[int], device: torch.device, meter) -> dict:
    """Peak bytes above held at each length; None at the first out of memory and after it."""
    model = _build(name, device, depth)
    patch(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # every gradient allocated: the backward adds into them
    vocab = min(model.config.get_text_config().vocab_size, MAX_ID)
    _step(model, torch.randint(0, vocab, (1, WARMUP_LENGTH), device=device))
    peaks, start = dict.fromkeys(lengths), time.perf_counter()
    for length in lengths:
        step = functools.partial(_step, model, torch.randint(0, vocab, (1, length), device=device))
        try:
            graphs = counters["stats"]["unique_graphs"]
            peak = meter.activation(step)
            if counters["stats"]["unique_graphs"] != graphs:  # a guard on T recompiled: again without it
                peak = meter.activation(step)
        except torch.cuda.OutOfMemoryError:
            peak = None
        peaks[length] = peak
        shown = "out of memory" if peak is None else f"{peak / 1e6:,.0f} MB"
        elapsed = time.perf_counter() - start
        print(f"  {name} at {depth} layers, T={length:,}: {shown} ({elapsed:.1f}s)", file=sys.stderr)
        if peak is None:
            break  # the longer ones would run out too
    del model
    _release(device)
    return peaks


def _line(peaks: dict, lo: int, hi: int) -> tuple[float, float]:
    """(bytes per token, bytes at T = 0) of the line through two lengths' peaks."""
    slope = (peaks[hi] - peaks[lo]) / (hi - lo)
    return slope, peaks[hi] - slope * hi


def measure(name: str, lengths: list[int], device: torch.device, meter, budget: float) -> Slope:
    """Measure one preset at its two depths and extrapolate to its full depth (module docstring)."""
    # A fresh dynamo per preset: every decoder layer is called through one shared transformers
    # function, whose cache gains entries per model; past recompile_limit (8, about 7 presets in
    # one process, checked on the CPU) later models' layers would run eagerly, silently.
    torch._dynamo.reset()
    config = model_config(name)
    kinds = _layer_kinds(config)
    depths, approximate = _depths(kinds)
    params = sum(p.numel() for p in _build(name, torch.device("meta")).parameters())  # no memory
    s = Slope(name, len(kinds), params, depths, approximate, held=params * HELD_BYTES_PER_PARAM)
    s.max_position_embeddings = getattr(config.get_text_config(), "max_position_embeddings", None)
    s.peaks = {d: _measure_depth(name, d, lengths, device, meter) for d in depths}
    ran = [t for t in lengths if all(s.peaks[d][t] is not None for d in depths)]
    if len(ran) < 2:
        s.error = "fewer than two lengths ran at both depths"
        return s
    (d1, d2), lo, hi = depths, ran[-2], ran[-1]
    (s1, c1), (s2, c2) = _line(s.peaks[d1], lo, hi), _line(s.peaks[d2], lo, hi)
    s.per_layer = (s2 - s1) / (d2 - d1)
    s.rest = s1 - d1 * s.per_layer
    s.slope = s.rest + s.layers * s.per_layer
    s.fixed = c1 + (s.layers - d1) * (c2 - c1) / (d2 - d1)
    if s.held < budget and s.slope > 0:
        s.longest = max(int((budget - s.held - s.fixed) / s.slope), 0)
    for d in depths if len(ran) >= 3 else ():
        lower, upper = _line(s.peaks[d], ran[0], ran[1])[0], _line(s.peaks[d], lo, hi)[0]
        s.linearity[d] = lower / upper if upper > 0 else math.nan
    return s


# --------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Markdown, the first column (names) to the left, the figures to the right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *rows]
    cells = [
        [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        for r in lines
    ]
    return "\n".join("| " + " | ".join(r) + " |" for r in cells)


def _mb(x: float | None) -> str:
    if x is None:
        return "OOM"
    return f"{x / 1e6:,.0f}" if math.isfinite(x) else "n/a"


def _per_1k(bytes_per_token: float) -> str:
    """MB per 1k tokens."""
    return f"{bytes_per_token / 1e3:,.1f}" if math.isfinite(bytes_per_token) else "n/a"


def _longest(s: Slope, budget: float) -> str:
    if s.held >= budget:
        return "does not fit"
    if s.longest is None:
        return "n/a"
    return f"{s.longest:,}" + ("*" if s.longest > (s.max_position_embeddings or math.inf) else "")


def report(results: list[Slope], lengths: list[int], budget: float, meter, env) -> str:
    out = [
        f"memory_slope · {env.device_name} · torch {env.torch_version} · transformers "
        f"{env.transformers_version} · seqpack {env.seqpack_version} · {env.date}"
    ]
    header = ["model", "layers", "held (GB)", "per layer", "rest", "full depth", "fixed (MB)"]
    header += [f"longest T in {budget / 1e9:.0f} GB", "linearity"]
    summary = []
    for s in results:
        if s.peaks:
            note = ", no period in its layer kinds: approximate" if s.approximate else ""
            out.append(
                f"\n{s.name}: {s.layers} layers, {s.params / 1e9:.2f}B parameters; peak above held (MB) "
                f"at {s.depths[0]} and {s.depths[1]} layers{note} ({s.time_s:.0f}s)"
            )
            rows = [[str(d), *(_mb(s.peaks[d][t]) for t in lengths)] for d in s.depths]
            out.append(_table(["layers", *(f"T={t:,}" for t in lengths)], rows))
        if s.error is not None:
            out.append(f"\n{s.name}: FAILED: {s.error}")
            summary.append([s.name, "FAILED", *[""] * (len(header) - 2)])
            continue
        linearity = s.linearity.get(s.depths[1], math.nan)
        summary.append(
            [s.name, str(s.layers), f"{s.held / 1e9:,.1f}", _per_1k(s.per_layer), _per_1k(s.rest)]
            + [_per_1k(s.slope) + ("~" if s.approximate else ""), _mb(s.fixed), _longest(s, budget)]
            + [f"{linearity:.2f}" if math.isfinite(linearity) else "n/a"]
        )
    out += ["", _table(header, summary), ""]
    out.append(
        "per layer, rest, full depth: MB per 1k tokens (MB = 1e6 bytes, GB = 1e9). Full depth, fixed and "
        "longest T are EXTRAPOLATED linearly in depth from the two measured depths (~: a hybrid measured "
        "on a mix of layers not the full model's) and in length from the two longest lengths. Held = "
        f"parameters x {HELD_BYTES_PER_PARAM} bytes (bf16 weights, grads and AdamW's two states), counted; "
        "the CUDA context and allocator slack are not in it. Longest T = (budget - held - fixed) / full "
        "depth; * past max_position_embeddings. Linearity: slope over the two shortest lengths / over the "
        "two longest, deeper depth (above 1 where a length is below the fused loss's 2^28 / vocab token "
        f"chunk). Measured: {meter.method}."
    )
    return "\n".join(out)


def _json_value(v):
    """NaN and inf as null, as in the bench's JSON."""
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated preset names (seqpack-bench --list)")
    p.add_argument("--lengths", default="2048,8192,32768", help="comma-separated T, at least two")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-gb", type=float, default=80.0, help="the card's memory, GB = 1e9 bytes")
    p.add_argument("--json", help="write the results here (rewritten after every preset)")
    p.add_argument("--time-limit", type=float, help="seconds: presets not started by then are skipped")
    args = p.parse_args()
    lengths = sorted({int(t) for t in args.lengths.split(",")})
    if len(lengths) < 2:
        p.error("--lengths needs at least two lengths")
    device, budget = torch.device(args.device), args.budget_gb * 1e9
    meter, env, start = memory_meter(device), environment(device), time.perf_counter()
    results = []
    for name in args.models.split(","):
        began = time.perf_counter()
        if name not in PRESETS:  # a hub id would be looked up online
            s = Slope(name, error="not a preset (seqpack-bench --list)")
        elif args.time_limit is not None and began - start > args.time_limit:
            s = Slope(name, error=f"skipped: --time-limit {args.time_limit:.0f}s reached")
        else:
            print(f"{name} ...", file=sys.stderr)
            try:
                s = measure(name, lengths, device, meter, budget)
            except Exception as e:  # one preset failing (unsupported, out of memory) must not hide the others
                s = Slope(name, error=f"{type(e).__name__}: {e}".splitlines()[0])
            _release(device)
            s.time_s = time.perf_counter() - began
            if s.error is not None:
                print(f"  {name}: FAILED: {s.error}", file=sys.stderr)
        results.append(s)
        if args.json:  # after every preset: a run cut short keeps what it measured
            presets = [{k: _json_value(v) for k, v in dataclasses.asdict(r).items()} for r in results]
            run = {"lengths": lengths, "budget_bytes": budget, "method": meter.method, "presets": presets}
            with open(args.json, "w") as f:
                json.dump({"environment": dataclasses.asdict(env)} | run, f, indent=1)
                f.write("\n")
    print(report(results, lengths, budget, meter, env))


if __name__ == "__main__":
    main()
