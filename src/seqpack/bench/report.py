"""What the benchmark prints and writes: the table, the JSON records and the optional plot.

The main table keeps the layout of the padding-free results in transformers PR #31629
(Model | Data Process | Time (s) | Throughput (token/s) | Memory (MB)) plus a speed-up column, as a
Markdown table that pastes into BENCHMARKS.md; the card and versions are printed above it. Under
several processes it gains the per-GPU (per-process) throughput and the ranks' imbalance in tokens
and in busy time, each defined below the table; on one process its shape is unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys

import torch

from .run import STALL_FACTOR, LossCheck, Result


@dataclasses.dataclass
class Environment:
    """Where the numbers come from."""

    device: str
    device_name: str
    torch_version: str
    transformers_version: str
    seqpack_version: str
    python_version: str
    date: str


def _cpu_name(processes: int = 1) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    threads = torch.get_num_threads()
    if processes > 1:
        per = "thread" if threads == 1 else "threads"
        return f"{name or platform.processor() or 'CPU'} ({processes} processes x {threads} {per})"
    return f"{name or platform.processor() or 'CPU'} ({threads} threads)"


def _seqpack_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("seqpack")
    except metadata.PackageNotFoundError:
        import seqpack

        return getattr(seqpack, "__version__", "unknown")


def environment(device: torch.device, processes: int = 1) -> Environment:
    """Where this process runs; ``processes``: how many such processes the run has (threads: this one's)."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        name = f"{processes} x {name}" if processes > 1 else name
    else:
        name = _cpu_name(processes)
    return Environment(
        device=str(device),
        device_name=name,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        seqpack_version=_seqpack_version(),
        python_version=platform.python_version(),
        date=datetime.date.today().isoformat(),
    )


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "n/a"


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


SHARD_NAMES = {"ddp": "DDP", "fsdp2": "FSDP2 (fully_shard per decoder layer, then the root)"}


def _batching(run: dict) -> str:
    several = run.get("world_size", 1) > 1
    if run.get("token_budget"):
        per = "per process and step" if several else "a batch"
        return f"token budget {run['token_budget']:,} {per} (TokenBudgetBatchSampler)"
    return f"batch {run['batch_size']}" + (" per process" if several else "")


def _parallel_line(run: dict) -> str:
    world = run["world_size"]
    source = "the sampler's, balanced" if run.get("token_budget") else "rank-strided from one seeded list"
    return (
        f"processes: {world} ({run['backend']}) · {SHARD_NAMES[run['shard']]} · each rank its own batches "
        f"({source}) · loss over every rank's target tokens (num_items_in_batch), x{world} before backward"
    )


def _imbalance_cell(worst: float, mean: float) -> str:
    return f"{_fmt(worst, '.2f')} / {_fmt(mean, '.2f')}"


def _parallel_footer(run: dict, unit: str, steps: int) -> list[str]:
    world = run["world_size"]
    return [
        f"Throughput: every rank's real tokens over the timed stretch (barrier to barrier); per {unit}: "
        f"that / {world}. Memory, held, activations: the largest rank's. Step times: the slowest rank's.",
        "Token imbalance: per step, the largest rank's real tokens / the ranks' mean; shown as the worst "
        f"step / the mean over the {steps} timed steps (1.00: every rank the same tokens).",
        "Busy imbalance: the same ratio of the ranks' busy times, a rank's busy time being the time from the "
        "step's start until its backward has produced the input embeddings' gradient, i.e. its own forward "
        "and backward compute (a step's wall time is the same on every rank: the gradient collectives make "
        "the others wait for the slowest)."
        + (
            " Under FSDP2 the per-layer all-gathers pace every rank to the slowest, so it understates the "
            "imbalance."
            if run["shard"] == "fsdp2"
            else ""
        ),
    ]


def format_report(results: list[Result], check: LossCheck, env: Environment, run: dict) -> str:
    """The text printed on stdout: environment, main table, details table, loss check."""
    several = bool(run.get("shard"))  # several processes (or one started by torchrun)
    lines = [
        f"seqpack-bench · {env.device_name} · torch {env.torch_version} · transformers "
        f"{env.transformers_version} · seqpack {env.seqpack_version} · {env.date}",
        f"data: {run['data']} · {_batching(run)} · {run['steps']} timed steps after "
        f"{run['warmup']} warm-up · {run['dtype']} · optimizer {run['optimizer']} · seed {run['seed']}",
        *([_parallel_line(run)] if several else []),
        f"command: {run['command']}",
        "",
    ]
    unit = "GPU" if env.device.startswith("cuda") else "process"
    header = ["Model", "Data Process", "Time (s)", "Throughput (token/s)", "Memory (MB)", "Speed-up"]
    if several:
        header[4:4] = [f"Per {unit} (token/s)"]
        header += ["Token imbalance", "Busy imbalance"]
    rows = []
    for r in results:
        process = f"{r.mode} ({r.attn_implementation})" if r.attn_implementation else r.mode
        if r.error:
            rows.append([r.model, process, *["-"] * (len(header) - 3), r.error.splitlines()[0][:60]])
            continue
        row = [
            r.model,
            process,
            f"{r.time_s:.2f}",
            f"{r.tokens_per_s:,.0f}",
            _fmt(r.peak_mem_mb, ",.0f"),
            _fmt(r.speedup, ".2f") + "x",
        ]
        if several:
            row[4:4] = [f"{r.tokens_per_s_per_process:,.0f}"]
            row += [
                _imbalance_cell(r.token_imbalance_max, r.token_imbalance_mean),
                _imbalance_cell(r.busy_imbalance_max, r.busy_imbalance_mean),
            ]
        rows.append(row)
    lines.append(_markdown(header, rows, right=set(range(2, len(header)))))

    ran = [r for r in results if not r.error]
    if ran:
        real, padded = ran[0].real_tokens, ran[0].padded_tokens
        lines += [
            "",
            f"Throughput counts real tokens only: {real:,} real of {padded:,} padded "
            f"({100 * real / max(padded, 1):.0f}%) in the timed steps. Memory: {ran[0].mem_method}.",
            *(_parallel_footer(run, unit, ran[0].steps) if several else []),
            "",
        ]
        detail = [
            [
                r.model,
                r.mode,
                f"{r.warmup_time_s:.2f}",
                f"{r.step_time_median_s:.3f}",
                f"{max(r.step_times_s, default=0.0):.3f}",
                str(r.stalled_steps),
                _fmt(r.held_mem_mb, ",.0f"),
                _fmt(r.activation_mem_mb, ",.0f"),
                f"{r.first_loss:.6f}",
                f"{r.loss_rel_diff:.1e}",
            ]
            for r in ran
        ]
        header = [
            "Model",
            "Mode",
            "Warm-up (s)",
            "Step median (s)",
            "Step max (s)",
            f"Stalls (>{STALL_FACTOR:g}x time for its tokens)",
            "Held (MB)",
            "Activations (MB)",
            "First loss",
            "Loss rel. diff",
        ]
        lines.append(_markdown(header, detail, right=set(range(2, len(header)))))
    lines += ["", loss_verdict(check)]
    return "\n".join(lines)


def loss_verdict(check: LossCheck) -> str:
    status = "OK" if check.ok else "MISMATCH"
    return (
        f"First-step loss agreement: largest relative difference {check.max_rel_diff:.2e} "
        f"(tolerance {check.tolerance:.0e}): {status}"
    )


def warn_mismatch(check: LossCheck, stream=None) -> None:
    """The loud warning on stderr when modes disagree on the first step's loss."""
    stream = stream or sys.stderr
    bar = "!" * 78
    which = ", ".join(f"{model}/{mode}" for model, mode in check.mismatched)
    stream.write(
        f"\n{bar}\nWARNING: first-step losses disagree across modes: {which}\n"
        f"largest relative difference {check.max_rel_diff:.2e} > tolerance {check.tolerance:.0e}.\n"
        "Every mode starts from the same weights on the same tokens: a speed-up that changes the\n"
        f"loss is a bug, and these numbers must not be published.\n{bar}\n\n"
    )
    stream.flush()


def records(results: list[Result], env: Environment, run: dict) -> list[dict]:
    """One JSON-ready dict per (model, mode)."""
    out = []
    for r in results:
        record = dataclasses.asdict(r)
        record.update(dataclasses.asdict(env))
        record.update({k: v for k, v in run.items() if k not in ("steps", "warmup")})
        out.append(
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        )
    return out


def write_json(path: str, results: list[Result], env: Environment, run: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records(results, env, run), f, indent=2)
        f.write("\n")


def write_plot(path: str, results: list[Result], env: Environment) -> None:
    """Throughput and peak memory (held + activations) per mode, one group of bars per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'seqpack[bench]' (or matplotlib)") from e

    ran = [r for r in results if not r.error]
    models = list(dict.fromkeys(r.model for r in ran))
    modes = list(dict.fromkeys(r.mode for r in ran))
    width = 0.8 / max(len(modes), 1)
    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(max(8, 3 + 2.5 * len(models)), 4.5))
    for j, mode in enumerate(modes):
        xs, tps, held, act = [], [], [], []
        for i, model in enumerate(models):
            r = next((r for r in ran if r.model == model and r.mode == mode), None)
            if r is None:
                continue
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            tps.append(r.tokens_per_s)
            held.append(r.held_mem_mb)
            act.append(max(r.activation_mem_mb, 0.0))
        bars = ax_tp.bar(xs, tps, width, label=mode)
        ax_tp.bar_label(bars, fmt="{:,.0f}", fontsize=7)
        colour = bars.patches[0].get_facecolor() if bars.patches else None
        ax_mem.bar(xs, held, width, color=colour, alpha=0.45)
        ax_mem.bar(xs, act, width, bottom=held, color=colour, label=mode)
    for ax, title in (
        (ax_tp, "Throughput (real token/s)"),
        (ax_mem, "Peak memory (MB): held (pale) + activations"),
    ):
        ax.set_xticks(range(len(models)), models)
        ax.set_title(title, fontsize=10)
    ax_tp.legend(fontsize=8)
    fig.suptitle(
        f"seqpack-bench · {env.device_name} · torch {env.torch_version} · transformers {env.transformers_version}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
