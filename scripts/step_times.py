"""Every step's time and padded shape for one bench mode over many steps, to find outlier steps.

    python scripts/step_times.py --model llama-3.2-1b --batch-size 16 --mode padding --steps 30
    python scripts/step_times.py ... --sdpa-backends efficient,math   # keep cuDNN attention out

The bench's padding mode shows single steps of 1-3 s among 0.2-0.4 s ones. This prints each
step's time next to its padded length L and whether L is new, so a per-shape cost (a kernel plan
built for each new L) can be told from a one-off, and ``--sdpa-backends`` takes cuDNN attention
out to test whether it is the one paying.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from seqpack.bench import data as data_lib
from seqpack.bench import modes, presets

BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", default="padding", choices=sorted(modes.MODES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sdpa-backends", help="comma-separated subset of " + ",".join(BACKENDS))
    args = parser.parse_args()

    device = torch.device("cuda")
    mode = modes.MODES[args.mode]
    opts = modes.ModeOptions(device=device, hf_attn=None, seqpack_backend="auto")
    model = presets.load_model(
        args.model, attn_implementation=mode.attn_implementation(opts), dtype=torch.bfloat16,
        device=device, seed=0, random_init=False,
    )  # fmt: skip
    model = mode.prepare(model, opts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = data_lib.make_batches(
        data_lib.load_default(), batch_size=args.batch_size, num_batches=args.steps, seed=0
    )
    batches = data_lib.fold_vocab(batches, model.config.vocab_size)
    context = contextlib.nullcontext()
    if args.sdpa_backends:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([getattr(SDPBackend, BACKENDS[b]) for b in args.sdpa_backends.split(",")])
    seen, times = set(), []
    print(
        f"{torch.cuda.get_device_name()}, {args.model} {args.mode} b{args.batch_size}, sdpa {args.sdpa_backends or 'default'}"
    )
    with context:
        for i, batch in enumerate(batches):
            length = max(map(len, batch))
            x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mode.collate(batch, 0).items()}
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**x, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            print(f"  step {i:3d} L={length:4d} {'new' if length not in seen else 'seen'} "
                  f"{times[-1]:7.3f} s  alloc retries {retries}")  # fmt: skip
            seen.add(length)
    print(f"median {statistics.median(times[3:]):.3f} s, max {max(times[3:]):.3f} s over steps 3..")


if __name__ == "__main__":
    main()
