"""How long the host stalls the first time a GEMM meets a new row count (the packed length T).

    python scripts/shape_stall.py [--n 14336 --k 4096]
    CUDA_MODULE_LOADING=EAGER python scripts/shape_stall.py

A packed batch has a new T almost every step. A profile of a mistral-7b step showed 3-5 ms of GPU
idle before the first GEMM of each new shape. This times one ``x @ w.T`` (host wall clock around
a synchronised call) the first and the second time each T is seen, for T on a 1-token grid and on
a 128-token grid, to tell a per-shape cost (cuBLAS heuristics: every new T pays) from a
per-kernel cost (lazy module loading: only the first use of each kernel variant pays).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _call_ms(x: torch.Tensor, w: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    x @ w.T
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=14336)
    parser.add_argument("--k", type=int, default=4096)
    args = parser.parse_args()
    w = torch.randn(args.n, args.k, device="cuda", dtype=torch.bfloat16)
    _call_ms(torch.randn(1000, args.k, device="cuda", dtype=torch.bfloat16), w)  # handle creation
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(default)')}")  # fmt: skip
    for label, rows in [
        ("new T, 1-token grid", range(1601, 1701, 5)),
        ("new T, 128 grid", range(2048, 4609, 128)),
    ]:
        first, second = [], []
        for t in rows:
            x = torch.randn(t, args.k, device="cuda", dtype=torch.bfloat16)
            first.append(_call_ms(x, w))
            second.append(_call_ms(x, w))
        print(
            f"{label:22s} ({len(first)} shapes): first call median {statistics.median(first):6.2f} ms "
            f"(max {max(first):6.2f}), second call median {statistics.median(second):6.2f} ms"
        )


if __name__ == "__main__":
    main()
