"""What the benchmark prints and writes: the table, the JSON records and the optional plot.

The main table keeps the layout of the padding-free results in transformers PR #31629
(Model | Data Process | Time (s) | Throughput (token/s) | Memory (MB)) plus a speed-up column, as a
Markdown table that pastes into BENCHMARKS.md; the card and versions are printed above it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys

import torch

from .run import LossCheck, Result


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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def _seqpack_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("seqpack")
    except metadata.PackageNotFoundError:
        import seqpack

        return getattr(seqpack, "__version__", "unknown")


def environment(device: torch.device) -> Environment:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
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


def format_report(results: list[Result], check: LossCheck, env: Environment, run: dict) -> str:
    """The text printed on stdout: environment, main table, details table, loss check."""
    lines = [
        f"seqpack-bench · {env.device_name} · torch {env.torch_version} · transformers "
        f"{env.transformers_version} · seqpack {env.seqpack_version} · {env.date}",
        f"data: {run['data']} · batch {run['batch_size']} · {run['steps']} timed steps after "
        f"{run['warmup']} warm-up · {run['dtype']} · optimizer {run['optimizer']} · seed {run['seed']}",
        f"command: {run['command']}",
        "",
    ]
    rows = []
    for r in results:
        process = f"{r.mode} ({r.attn_implementation})" if r.attn_implementation else r.mode
        if r.error:
            rows.append([r.model, process, "-", "-", "-", r.error.splitlines()[0][:60]])
            continue
        rows.append(
            [
                r.model,
                process,
                f"{r.time_s:.2f}",
                f"{r.tokens_per_s:,.0f}",
                _fmt(r.peak_mem_mb, ",.0f"),
                _fmt(r.speedup, ".2f") + "x",
            ]
        )
    header = ["Model", "Data Process", "Time (s)", "Throughput (token/s)", "Memory (MB)", "Speed-up"]
    lines.append(_markdown(header, rows, right={2, 3, 4, 5}))

    ran = [r for r in results if not r.error]
    if ran:
        real, padded = ran[0].real_tokens, ran[0].padded_tokens
        lines += [
            "",
            f"Throughput counts real tokens only: {real:,} real of {padded:,} padded "
            f"({100 * real / max(padded, 1):.0f}%) in the timed steps. Memory: {ran[0].mem_method}.",
            "",
        ]
        detail = [
            [
                r.model,
                r.mode,
                f"{r.warmup_time_s:.2f}",
                f"{r.step_time_median_s:.3f}",
                f"{max(r.step_times_s, default=0.0):.3f}",
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
            "Held (MB)",
            "Activations (MB)",
            "First loss",
            "Loss rel. diff",
        ]
        lines.append(_markdown(header, detail, right={2, 3, 4, 5, 6, 7, 8}))
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
