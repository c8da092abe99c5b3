"""Where a seqpack training step spends its GPU time: a torch.profiler table by kernel family.

    python scripts/profile_step.py --model llama-3.2-1b --batch-size 16 [--no-compile] [--trace out.json]

Same model, data and step as ``seqpack-bench`` (bf16, AdamW). Prints the top kernels and the
share of GPU time per family (GEMM, attention, loss, optimizer, copies/gathers, other).
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from seqpack import patch
from seqpack.bench import data as data_lib
from seqpack.bench import modes, presets

# First match wins. Attention comes before GEMMs because FlashAttention's kernel names contain
# "cutlass"; compiled (Triton) kernels come before the eager families because their names spell
# the fused aten ops ("to_copy", "cat", ...).
FAMILIES = [
    ("attention", r"flash|fmha|attention|varlen"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|addmm|cublas"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("compiled (triton): norms, elementwise, loss", r"^triton"),
    ("eager gather/scatter/copy", r"index|gather|scatter|copy|cat|elementwise_kernel_with_index|nonzero"),
    ("eager softmax/loss", r"softmax|logsumexp|cross_entropy|nll|log_softmax"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--mode", default="seqpack", choices=["seqpack", "padding", "hf-packing"])
    parser.add_argument("--trace")
    parser.add_argument("--dynamic", choices=["all", "auto"], default="all", help="seqpack.compile.DYNAMIC")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()

    device = torch.device("cuda")
    mode = modes.MODES[args.mode]
    opts = modes.ModeOptions(device=device, hf_attn=None, seqpack_backend="auto")
    model = presets.load_model(
        args.model, attn_implementation=mode.attn_implementation(opts), dtype=torch.bfloat16,
        device=device, seed=0, random_init=False,
    )  # fmt: skip
    if args.mode == "seqpack":
        from seqpack import compile as compiling

        compiling.DYNAMIC = True if args.dynamic == "all" else None
        patch(model, compile=not args.no_compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    data = data_lib.load_default()
    batches = data_lib.make_batches(data, batch_size=args.batch_size, num_batches=3 + args.steps, seed=0)
    batches = data_lib.fold_vocab(batches, model.config.vocab_size)
    inputs = [mode.collate(b, 0) for b in batches]

    def step(x):
        x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}
        model(**x, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for x in inputs[:3]:  # warm-up: differently sized batches, so automatic dynamic shapes settle
        step(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for x in inputs[3:]:
            step(x)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    families = {name: 0.0 for name, _ in FAMILIES} | {"other": 0.0}
    for e in events:
        name = e.key.lower()
        family = next((f for f, pattern in FAMILIES if re.search(pattern, name)), "other")
        families[family] += e.self_device_time_total
    print(f"{args.model} {args.mode} compile={not args.no_compile} dynamic={args.dynamic} batch {args.batch_size}: "
          f"{wall * 1e3:.1f} ms/step wall, {total / 1e3 / args.steps:.1f} ms/step GPU busy")  # fmt: skip
    for family, t in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {family:45s} {t / 1e3 / args.steps:8.2f} ms/step  {100 * t / total:5.1f}%")
    print("top kernels (ms/step):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(
            f"  {e.self_device_time_total / 1e3 / args.steps:8.2f}  x{e.count // args.steps:<5d} {e.key[:110]}"
        )
    from torch._dynamo.utils import counters

    print(f"compiled graphs in this process: {counters['stats'].get('unique_graphs', 0)}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
