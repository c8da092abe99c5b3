"""Where a training step's time goes: torch.profiler over a few steps of one bench mode.

Usage (GPU): PYTHONPATH=src python benchmarks/profile_step.py --model qwen3.5-4b --layers 4 \
    --batch-size 8 --modes padding-no-cudnn,seqpack [--rows 25] [--steps 3] [--data long]

For each mode: the bench's own model, batches and collate (seqpack.bench), warm-up steps first
(compile included), then ``--steps`` profiled steps. Prints the step wall time, the GPU-busy time
(sum of kernel times) and two tables: operators by self CUDA time and by self CPU time. A step
whose wall time is far above its GPU-busy time is bound by the host (kernel launches, Python).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from seqpack.bench import modes as bench_modes
from seqpack.bench.data import load_default, make_batches, with_ids
from seqpack.bench.presets import load_model, vocab_size
from seqpack.bench.run import _make_optimizer


def _batches(args):
    if args.data in ("long", "rl"):
        from seqpack.bench.synthetic import SHAPES

        data = SHAPES[args.data](seed=0)
    else:
        data = load_default()
    batches = make_batches(
        data,
        batch_size=args.batch_size,
        num_batches=args.warmup + args.steps,
        seed=0,
        max_length=args.max_length,
    )
    vocab = vocab_size(args.model)
    return [[with_ids(e, [t % vocab for t in e]) for e in b] for b in batches]  # keeps --data rl's prompts


SYNCS = (
    "cudaMemcpyAsync",
    "cudaStreamSynchronize",
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::item",
)


def _print_syncs(prof, steps: int) -> None:
    """Where the host waits on the device (or copies to it), by the Python frames above, per step."""
    import collections

    count, spent = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.name not in SYNCS:
            continue
        frames, parent = [], e.cpu_parent
        while parent is not None and len(frames) < 10:
            if ".py(" in parent.name:  # a Python frame (with_stack): "file.py(line): function"
                frames.append(parent.name)
            parent = parent.cpu_parent
        key = (e.name, tuple(frames))
        count[key] += 1
        spent[key] += e.cpu_time_total
    print("host syncs and copies per step, by Python stack:")
    for key, n in count.most_common(15):
        print(f"  {n / steps:6.1f} x {key[0]}  ({spent[key] / 1e3 / steps:.2f} ms)")
        for frame in key[1]:
            print(f"        {frame}")


def _profile_mode(args, mode, batches, device, sync) -> None:
    name = mode.name
    options = bench_modes.ModeOptions(device=device)
    model = load_model(
        args.model,
        attn_implementation=mode.attn_implementation(options),
        dtype=torch.bfloat16,
        device=device,
        seed=0,
        random_init=True,
        layers=args.layers,
    )
    model = mode.prepare(model, options)
    optimizer = _make_optimizer("adamw", model.parameters(), lr=1e-5, device=device)  # the bench's: fused
    inputs = [
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in mode.collate(b, 0).items()} for b in batches
    ]

    def step(x):
        with mode.step_context():
            model(**x, use_cache=False).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for x in inputs[: args.warmup]:
        step(x)
    sync()
    warm = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=args.stacks) as prof:
        t0 = time.perf_counter()
        for x in inputs[args.warmup :]:
            step(x)
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    # kernels only: an operator's self device time repeats its kernels' time, and a user annotation
    # on the device's timeline (the optimizer's "Optimizer.step#AdamW.step") spans its kernels
    kernels = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("Optimizer.")
    ]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 / args.steps
    real = sum(len(e) for b in batches[args.warmup :] for e in b) / args.steps
    print(
        f"\n===== {args.model} layers={args.layers} b{args.batch_size} {name}: warm-up {warm:.1f}s, "
        f"step wall {wall * 1e3:.1f} ms, GPU busy {busy * 1e3:.1f} ms, {real / wall:,.0f} real tok/s"
    )
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.stacks:
        _print_syncs(prof, args.steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--modes", default="padding-no-cudnn,seqpack")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--data", default="gsm8k", choices=["gsm8k", "long", "rl"])
    p.add_argument("--max-length", type=int)
    p.add_argument("--device", default="cuda")
    p.add_argument("--stacks", action="store_true", help="print the Python stacks of host syncs")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    batches = _batches(args)
    for name in args.modes.split(","):
        _profile_mode(args, bench_modes.MODES[name], batches, device, sync)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
