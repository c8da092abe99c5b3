"""The floor under a training step: its GEMMs and its optimizer step, each timed alone on the card.

    python scripts/step_floor.py --model mistral-7b --tokens 1650 [--tokens 1664 ...]

Every ``nn.Linear`` of the model shape (read from a meta-device build, so nothing is allocated)
costs three GEMMs per step over T packed tokens: forward ``x @ W.T``, input gradient ``dy @ W``
and weight gradient ``dy.T @ x``. Their times, summed over the layers, plus one fused AdamW step
over every parameter (bf16 weights, gradients and moments), are what any padding-free path pays
per step; the rest of a measured step is attention, elementwise work, the loss and idle time.
Also prints the card's large-GEMM rate and copy bandwidth, the two ceilings.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics

import torch
from transformers import AutoModelForCausalLM

from seqpack.bench import presets


def _time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _repeat(fn, n: int) -> None:
    for _ in range(n):
        fn()


def _linear_shapes(name: str) -> tuple[collections.Counter, list[torch.Size]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(presets.build_config(name))
    linears = collections.Counter(
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    return linears, [p.shape for p in model.parameters()]


def gemm_ms(linears: collections.Counter, tokens: int) -> dict[str, float]:
    """Milliseconds of forward, input-gradient and weight-gradient GEMMs over all linears.

    Each GEMM runs back to back as many times as the model has that linear, under one pair of
    events, on values of a trained model's scale (weights ~0.02, activations ~1): a profile's
    per-kernel sum, without a launch gap per call.
    """
    out = collections.Counter()
    for (n_in, n_out), count in linears.items():
        x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
        dy = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16) * 1e-3
        for part, gemm in [
            ("forward", lambda: x @ w.T),  # noqa: B023
            ("input grad", lambda: dy @ w),  # noqa: B023
            ("weight grad", lambda: dy.T @ x),  # noqa: B023
        ]:
            out[part] += _time_ms(functools.partial(_repeat, gemm, count), reps=5)
    return dict(out)


def adamw_ms(shapes: list[torch.Size]) -> float:
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ms = _time_ms(optimizer.step, reps=5)
    del params, optimizer
    torch.cuda.empty_cache()
    return ms


def ceilings(n: int = 8192) -> tuple[float, float]:
    """(bf16 TFLOP/s of an n^3 GEMM, GB/s of a 2 GiB device copy counting read + write)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * n**3 / _time_ms(lambda: a @ b) / 1e9
    src = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    gbps = 2 * src.nbytes / _time_ms(lambda: dst.copy_(src)) / 1e6
    return tflops, gbps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mistral-7b")
    parser.add_argument("--tokens", type=int, action="append", help="packed tokens per step")
    args = parser.parse_args()
    tokens = args.tokens or [1650]

    peak, bandwidth = ceilings()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"ceilings: bf16 GEMM {peak:.0f} TFLOP/s (8192^3), copy {bandwidth:.0f} GB/s (read + write)")

    linears, shapes = _linear_shapes(args.model)
    n_linear = sum(i * o * c for (i, o), c in linears.items())
    n_param = sum(s.numel() for s in shapes)
    print(f"{args.model}: {n_param / 1e9:.2f}B parameters, {n_linear / 1e9:.2f}B in linears")
    optimizer = adamw_ms(shapes)
    print(f"fused AdamW step (bf16 weights, grads, moments): {optimizer:.1f} ms")
    for t in tokens:
        parts = gemm_ms(linears, t)
        total = sum(parts.values())
        rate = 6 * n_linear * t / total / 1e9
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        print(
            f"T={t}: GEMMs {total:.1f} ms ({detail}) at {rate:.0f} TFLOP/s; "
            f"GEMMs + AdamW {total + optimizer:.1f} ms = {t / (total + optimizer) * 1e3:,.0f} tok/s ceiling"
        )


if __name__ == "__main__":
    main()
