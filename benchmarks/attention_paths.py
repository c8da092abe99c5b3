"""Forward + backward time and peak memory of seqpack's attention paths for one packed batch.

Usage (GPU): PYTHONPATH=src python benchmarks/attention_paths.py [--head-dim 512] [--heads 8]
    [--kv-heads 4] [--lengths 300,517,129,...] [--window 0] [--steps 20]

Paths, each on the same packed q/k/v (bf16): ``rows-sdpa`` (heads over 256: SDPA over the padded
layout, ``attention._rows_sdpa``), ``reference`` (the padded-layout eager attention a layer runs
when no kernel fits, as llama's eager attention computes it), each eager and compiled
(``dynamic=True``, as seqpack compiles its layers), and ``varlen`` (torch's varlen kernel, only
where the head dim is at most 256). Also prints which SDPA backends accept the shape.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.models.llama import modeling_llama

from seqpack import attention


class _Attention(torch.nn.Module):
    """Stands for an attention layer whose eager attention is llama's (looked up by module)."""

    __module__ = modeling_llama.__name__


def _time(fn, steps: int, cuda: bool) -> tuple[float, float]:
    fn()  # warm-up (compile included)
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps * 1e3, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3, (torch.cuda.max_memory_allocated() - start_mem) / 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head-dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--lengths", default="300,1,517,129,64,260,511,7,450,380,200,333,90,410,250,150")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    cuda = torch.cuda.is_available()
    total, dev = sum(lengths), torch.device("cuda" if cuda else "cpu")  # the CPU: a dry run
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = [(args.heads, args.head_dim), (args.kv_heads, args.head_dim), (args.kv_heads, args.head_dim)]
    leaves = [
        torch.randn(1, h, total, d, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
        for h, d in shapes
    ]
    upstream = torch.randn(1, total, args.heads, args.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
    scale, window, longest = args.head_dim**-0.5, args.window or None, max(lengths)
    module = _Attention().eval()
    module.num_key_value_groups = args.heads // args.kv_heads
    print(
        f"T={total} in {len(lengths)} sequences (longest {longest}), heads {args.heads}/{args.kv_heads}, "
        f"head_dim {args.head_dim}, window {window}, bf16, {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}"
    )

    def rows_sdpa(q, k, v):
        return attention._rows_sdpa(q, k, v, cu, longest, scaling=scale, dropout=0.0, sliding_window=window)

    def reference(q, k, v):
        return attention._padded_layout_attention(
            module, q, k, v, cu, longest, scaling=scale, dropout=0.0, sliding_window=window
        )

    paths = {"rows-sdpa": rows_sdpa, "reference": reference}
    if args.head_dim <= 256 and "torch" in attention.available_backends():
        plan = attention.plan("torch")

        def varlen(q, k, v):
            return attention._kernel_attention(
                plan,
                module,
                q,
                k,
                v,
                cu,
                longest,
                scaling=scale,
                dropout=0.0,
                sliding_window=window,
                softcap=None,
            )

        paths["varlen"] = varlen
    for name, fn in list(paths.items()):
        if name != "varlen":
            paths[f"{name} compiled"] = torch.compile(fn, dynamic=True)
    for name, fn in paths.items():

        def step(fn=fn):
            out = fn(*leaves)
            torch.autograd.grad((out * upstream).sum(), leaves)

        try:
            ms, mb = _time(step, args.steps, cuda)
            print(f"  {name:20s} fwd+bwd {ms:8.3f} ms   peak above inputs {mb:9.1f} MB")
        except Exception as e:  # a path that cannot run this shape is a row, not a stop
            print(f"  {name:20s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if not cuda:
        return
    q, k, v = (t.detach()[:, :, :longest] for t in leaves)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                k2, v2 = (t.repeat_interleave(args.heads // args.kv_heads, 1) for t in (k, v))
                torch.nn.functional.scaled_dot_product_attention(q, k2, v2, is_causal=True)
            print(f"  SDPA {backend.name}: takes head_dim {args.head_dim}")
        except RuntimeError as e:
            print(f"  SDPA {backend.name}: refuses ({str(e).splitlines()[0][:100]})")


if __name__ == "__main__":
    main()
