"""The varlen attention that a patched model runs, and its kernel backends.

transformers calls an attention function by name from ``AttentionInterface``; seqpack registers
one, ``"seqpack"``, and a patched model's config names it. Each attention layer then hands us
its query/key/value of the packed (1, T) sequence plus the packing metadata, which transformers'
modeling code forwards untouched as ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs.

Backends, best first:
- ``fa3``: FlashAttention-3 (``flash_attn_interface``), Hopper only.
- ``flash_attn``: the flash-attn package's FlashAttention-2 varlen kernel.
- ``torch``: PyTorch's own varlen FlashAttention-2 (``torch.nn.attention.varlen.varlen_attn``).
- ``reference``: the model's own eager attention, each packed sequence over itself (one by one,
  or laid out as a padded batch under compile). Runs anywhere (CPU included) and honours every
  feature that model's eager code has, so it is both the CPU path and the truth the kernels are
  tested against.

A kernel that lacks a feature a layer needs (a softcap, attention sinks, dropout, fp32) is never
asked to approximate it: that call runs on the reference path, and the switch is logged once.
Heads wider than the kernels take (over 256: Gemma 4's global layers) run torch's SDPA over the
padded layout of the packed sequences instead (``_rows_sdpa``), unless they also need a softcap
or sinks (then the reference path).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .packing import from_rows, row_layout, to_rows

logger = logging.getLogger("seqpack")

ATTN_NAME = "seqpack"
BACKENDS = ("fa3", "flash_attn", "torch", "reference")
_INSTALL_HINTS = {
    "fa3": "FlashAttention-3 needs a Hopper GPU and the `flash_attn_interface` package "
    "(built from flash-attention's hopper/ directory).",
    "flash_attn": "install it with `pip install flash-attn --no-build-isolation` (needs a CUDA GPU).",
    "torch": "PyTorch's varlen kernel needs torch >= 2.10 with CUDA "
    "(`torch.nn.attention.varlen.varlen_attn`) and a CUDA device.",
    "reference": "",
}


# --------------------------------------------------------------------------- availability probes


@functools.cache
def _varlen_fn(backend: str) -> Callable | None:
    """The varlen kernel of a backend, or None when it cannot run here. Cached; tests clear it."""
    if backend == "reference":
        return _reference_attention
    if backend == "torch":
        varlen = importlib.import_module("torch.nn.attention")
        fn = getattr(getattr(varlen, "varlen", None), "varlen_attn", None)
        if fn is None:
            try:
                fn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
            except (ImportError, AttributeError):
                return None
        return fn if torch.cuda.is_available() else None
    module = {"flash_attn": "flash_attn", "fa3": "flash_attn_interface"}[backend]
    if sys.modules.get(module) is None and importlib.util.find_spec(module) is None:
        return None
    fn = getattr(importlib.import_module(module), "flash_attn_varlen_func", None)
    if fn is None:
        return None
    if getattr(fn, "_seqpack_stand_in", False):  # tests plumb arguments through a CPU stand-in
        return fn
    if not torch.cuda.is_available():
        return None
    if backend == "fa3" and torch.cuda.get_device_capability()[0] != 9:
        return None
    return fn


@functools.cache
def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends that can run on this machine, best first."""
    return [b for b in BACKENDS if _varlen_fn(b) is not None]


def resolve_backend(backend: str) -> str:
    """Turn ``"auto"`` into the best available backend; check a named one exists."""
    if backend == "auto":
        chosen = available_backends()[0]
        _log_once(f"seqpack: attention backend 'auto' -> '{chosen}' (available: {available_backends()})")
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"Unknown seqpack backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}.")
    if _varlen_fn(backend) is None:
        raise ImportError(f"seqpack backend {backend!r} is not available here: {_INSTALL_HINTS[backend]}")
    return backend


def _log_once(message: str) -> None:
    # Not from inside a compiled region: dynamo would trace the logging call itself. The eager
    # first call (or patch time) says it.
    if not torch.compiler.is_compiling() and message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


_LOGGED: set[str] = set()


# --------------------------------------------------------------------------- kernels


def _reference_attention(
    module, query, key, value, cu_seqlens, max_seqlen, *, scaling, dropout, sliding_window, **kwargs
):
    """The model's own eager attention, each packed sequence seeing only itself.

    Eager on the CPU it runs sequence by sequence (cost: the sum of n^2). Under torch.compile, or
    on a GPU (where it is only a fallback), it lays the sequences out as a padded (N, max_seqlen)
    batch and runs once over that, which needs no host sync and no data-dependent loop, and costs
    no more than the padded batch the caller started from (N * max_seqlen^2, not T^2).

    Args:
        query: (1, Hq, T, D); key, value: (1, Hkv, T, D), as the attention layer gave them.
        cu_seqlens: (N + 1,) int32.
        max_seqlen: int, the longest sequence.
    Returns:
        (1, T, Hq, D), like every transformers attention function.
    """
    extra = dict(scaling=scaling, dropout=dropout, sliding_window=sliding_window, **kwargs)
    if query.device.type == "cpu" and not torch.compiler.is_compiling():
        bounds = cu_seqlens.tolist()
        outs = [
            _masked_attention(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], **extra)
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
            if e > s
        ]
        if not outs:
            return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        return torch.cat(outs, dim=1)
    return _padded_layout_attention(module, query, key, value, cu_seqlens, max_seqlen, **extra)


_uncompiled_reference = torch.compiler.disable(_reference_attention)


def _on_rows(attend: Callable, query, key, value, cu_seqlens, max_seqlen):
    """Packed (1, H, T, D) -> (N, H, S, D) rows of S = max_seqlen, ``attend`` over them, and back.

    Each sequence starts its row, so a causal mask alone keeps its queries off the padding.

    Args:
        attend: (N, Hq, S, D), (N, Hkv, S, D), (N, Hkv, S, Dv) -> (N, S, Hq, Dv).
    Returns:
        (1, T, Hq, Dv).
    """
    layout = row_layout(cu_seqlens, max_seqlen, query.shape[2])

    def rows(x: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (N, H, S, D), zeros at padding
        return to_rows(x[0].transpose(0, 1), layout).transpose(1, 2)

    return from_rows(attend(rows(query), rows(key), rows(value)), layout).unsqueeze(0)


def _padded_layout_attention(module, query, key, value, cu_seqlens, max_seqlen, **extra):
    """The model's eager attention (``_masked_attention``) on the rows layout. Returns (1, T, Hq, D)."""
    attend = functools.partial(_masked_attention, module, **extra)
    return _on_rows(attend, query, key, value, cu_seqlens, max_seqlen)


def _causal_mask(width: int, sliding_window: int | None, device) -> torch.Tensor:
    """(n, n) bool: a query sees itself and the keys before it (``sliding_window - 1`` of them)."""
    pos = torch.arange(width, device=device)
    offset = pos[:, None] - pos[None, :]
    allowed = offset >= 0
    if sliding_window:
        allowed = allowed & (offset < sliding_window)
    return allowed


def _repeat_kv(query, key, value):
    """K and V with one head per query head; heads on dim 1 (the kernels' (T, H, D), the rows'
    (N, H, S, D)), each KV head repeated for its group, as transformers' repeat_kv does."""
    if key.shape[1] == query.shape[1]:
        return key, value
    groups = query.shape[1] // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _masked_attention(module, query, key, value, *, scaling, dropout, sliding_window, **kwargs):
    """Eager attention over (B, H, n, D) with a causal (and sliding-window) mask.

    Returns:
        (B, n, H, D).
    """
    device = query.device
    allowed = _causal_mask(query.shape[2], sliding_window, device)[None, None]  # (1, 1, n, n)
    eager = _eager_function(module)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError(
                f"{type(module).__name__} has no eager attention to honour its softcap/sinks on the reference path."
            )
        out, _ = sdpa_attention_forward(
            module, query, key, value, allowed, dropout=dropout, scaling=scaling, is_causal=False
        )
        return out
    if key.shape[1] != query.shape[1] and not _REPEATS_KV.get(eager, True):
        # An eager function written for a tower without GQA, which the model's text layers share
        # (unlimited_ocr's): repeat the KV heads as repeat_kv would, so it sees one per query head.
        key, value = _repeat_kv(query, key, value)
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)  # (1, 1, n, n)
    out, _ = eager(
        module,
        query,
        key,
        value,
        mask,
        scaling=scaling,
        dropout=dropout,
        sliding_window=sliding_window,
        **kwargs,
    )
    return out


# eager attention function -> whether it expands grouped KV heads itself (repeat_kv); read from
# its source when a layer is planned (plan_eager), so traced code only looks it up.
_REPEATS_KV: dict = {}


def plan_eager(module) -> None:
    """Read, once per function, whether the module's eager attention repeats KV heads itself."""
    eager = _eager_function(module)
    if eager is None or eager in _REPEATS_KV:
        return
    try:
        source = inspect.getsource(eager)
    except (OSError, TypeError):
        source = "repeat_kv"  # cannot tell: leave the heads as the model gives them
    _REPEATS_KV[eager] = any(word in source for word in ("repeat_kv", "num_key_value_groups", "enable_gqa"))


def _eager_function(module) -> Callable | None:
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


class _VarlenWithSinks(torch.autograd.Function):
    """torch's varlen kernel with attention sinks (gpt-oss), exact in forward and backward.

    A sink is one more key per head with logit ``sink`` and a zero value, so with the kernel's
    log-sum-exp ``lse`` over the real keys the output is ``out * w``, ``w = sigmoid(lse - sink)``.
    The gradient also flows through ``lse``, which torch's varlen backward does not propagate; it
    needs none: run the kernel's own backward with ``grad * w`` as the output gradient and the
    sink-scaled output in place of ``out``. Its ``D = rowsum(dO * out)`` is then
    ``w^2 (grad . out)``, which is exactly the softmax-with-sink-column backward (the ``lse`` term
    included), and its ``dv`` is ``P' grad`` with ``P'`` the probabilities with the sink. The sink's
    own gradient is ``-sum_t (1 - w_t) (grad_t . out_t)`` per head.

    q: (T, Hq, D); k, v: (T, Hkv, D); sinks: (Hq,) -> (T, Hq, D).
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens, max_seqlen, scale, window, gqa):
        left, right = window
        causal = (left, right) == (-1, 0)
        extra = {"enable_gqa": True} if gqa else {}
        forward_op, _ = _varlen_ops()
        out, lse, rng = forward_op(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            is_causal=causal, scale=scale, window_size=[left, right], **extra,
        )  # fmt: skip
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for bf16/fp16 inputs
        keep = torch.sigmoid(lse.to(acc) - sinks.to(acc)[:, None]).t().unsqueeze(-1)  # (T, Hq, 1)
        out = (out.to(acc) * keep).to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, cu_seqlens, out, lse, rng, keep)
        ctx.args = (max_seqlen, causal, scale, [left, right], sinks.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, sinks, cu_seqlens, out, lse, rng, keep = ctx.saved_tensors
        max_seqlen, causal, scale, window, sink_dtype = ctx.args
        grad = grad.contiguous()
        _, backward_op = _varlen_ops()
        dq, dk, dv = backward_op(
            (grad.to(keep.dtype) * keep).to(grad.dtype), q, k, v, out, lse, cu_seqlens, cu_seqlens,
            max_seqlen, max_seqlen, causal, rng, scale=scale, window_size=window,
        )  # fmt: skip
        dot = (grad.to(keep.dtype) * out.to(keep.dtype)).sum(-1)  # (T, Hq)
        # 1 - w, as sigmoid(sink - lse): no cancellation where the sink is far below lse
        drop = torch.sigmoid(sinks.to(keep.dtype)[:, None] - lse.to(keep.dtype)).t()  # (T, Hq)
        dsinks = -(drop * dot).sum(0)  # (Hq,)
        return dq, dk, dv, dsinks.to(sink_dtype), None, None, None, None, None


def _varlen_ops() -> tuple[Callable, Callable]:
    """torch's varlen forward (out, lse, rng state) and backward ops, behind varlen_attn."""
    ops = torch.ops.torch_attn
    return ops._varlen_attn, ops._varlen_attn_backward


@functools.cache
def _torch_sinks() -> bool:
    """Whether the ops _VarlenWithSinks calls exist here (torch >= 2.10)."""
    try:
        importlib.import_module("torch.nn.attention.varlen")
        _varlen_ops()
        return True
    except (ImportError, AttributeError, RuntimeError):
        return False


def _kernel_attention(
    layer_plan,
    module,
    query,
    key,
    value,
    cu_seqlens,
    max_seqlen,
    *,
    scaling,
    dropout,
    sliding_window,
    softcap,
    s_aux=None,
):
    """One varlen kernel call. query, key: (1, H, T, D); value: (1, Hkv, T, Dv) -> (1, T, Hq, Dv).

    The kernels want one head dim for Q, K and V; MLA's V is narrower (DeepSeek: 128 against 192).
    V is zero-padded to D and the output cut back to Dv, which is exact: the padded columns of V
    only produce output columns that are dropped (transformers does the same for FA2).
    """
    backend, fn = layer_plan.backend, layer_plan.kernel
    q = query[0].transpose(0, 1)  # (T, Hq, D)
    k = key[0].transpose(0, 1)  # (T, Hkv, D)
    v = value[0].transpose(0, 1)  # (T, Hkv, Dv)
    value_dim = v.shape[-1]
    if value_dim < q.shape[-1]:
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - value_dim))
    elif value_dim > q.shape[-1]:  # zero columns of Q and K add nothing to the scores
        q = torch.nn.functional.pad(q, (0, value_dim - q.shape[-1]))
        k = torch.nn.functional.pad(k, (0, value_dim - k.shape[-1]))
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    if not layer_plan.gqa:  # torch < 2.13's varlen kernel has no GQA: repeat the K/V heads
        k, v = _repeat_kv(q, k, v)
    if backend == "torch" and s_aux is not None:
        gqa = q.shape[1] != k.shape[1]
        out = _VarlenWithSinks.apply(q, k, v, s_aux, cu_seqlens, max_seqlen, scaling, window, gqa)
    elif backend == "torch":
        extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        out = fn(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            scale=scaling,
            window_size=window,
            **extra,
        )
    else:
        extra = {"softcap": softcap} if softcap else {}
        if s_aux is not None:
            extra["s_aux"] = s_aux
        if backend == "flash_attn":
            extra["dropout_p"] = dropout
        out = fn(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            softmax_scale=scaling, causal=True, window_size=window, **extra,
        )  # fmt: skip
        if isinstance(out, tuple):  # some FA3 builds also return the log-sum-exp
            out = out[0]
    return out[..., :value_dim].unsqueeze(0)


def _unsupported_feature(layer_plan: LayerPlan, query, value, dropout, softcap, s_aux) -> str | None:
    """Why this backend cannot compute this call exactly, or None."""
    backend = layer_plan.backend
    if backend == "reference":
        return None
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"{query.dtype} inputs"
    wide = max(query.shape[-1], value.shape[-1])
    if wide > MAX_HEAD_DIM and (softcap or s_aux is not None):
        return (
            f"head_dim {wide} > {MAX_HEAD_DIM} with {'logit softcapping' if softcap else 'attention sinks'}"
        )
    if s_aux is not None and not layer_plan.sinks:
        return "attention sinks"
    if softcap and backend == "torch":
        return "logit softcapping"
    if dropout and backend != "flash_attn":
        return "attention dropout"
    return None


MAX_HEAD_DIM = 256  # the varlen FlashAttention kernels' widest head (FA2, torch's, FA3)


def _rows_sdpa(query, key, value, cu_seqlens, max_seqlen, *, scaling, dropout, sliding_window):
    """Heads wider than the varlen kernels take (Gemma 4's global layers: 512): torch's SDPA on the
    rows layout (``_on_rows``), which picks its memory-efficient kernel for any head dim (math
    where none fits) instead of materialising the scores as the model's eager attention does.
    Exact as the reference path is.

    query, key: (1, H, T, D); value: (1, Hkv, T, Dv). Returns (1, T, Hq, Dv).
    """
    attend = functools.partial(
        _sdpa_attention, scaling=scaling, dropout=dropout, sliding_window=sliding_window
    )
    return _on_rows(attend, query, key, value, cu_seqlens, max_seqlen)


def _sdpa_attention(query, key, value, *, scaling, dropout, sliding_window):
    """SDPA over (N, H, S, D) rows with a causal (and sliding-window) mask. Returns (N, S, Hq, Dv)."""
    key, value = _repeat_kv(query, key, value)  # SDPA's memory-efficient kernel takes no enable_gqa
    mask = _causal_mask(query.shape[2], sliding_window, query.device) if sliding_window else None
    # Not cuDNN's: it builds a plan per new shape, seconds on some (measured on the H100, see the
    # bench's padding-no-cudnn mode), and the rows' shape changes every batch.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
        )  # (N, Hq, S, Dv)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- the registered function


@dataclass(frozen=True)
class LayerPlan:
    """What one attention module runs, fixed at patch time so compiled code reads only constants."""

    backend: str
    kernel: Callable
    gqa: bool  # the kernel takes K/V with fewer heads than Q
    sinks: bool  # the kernel takes attention sinks (s_aux), or torch's through _VarlenWithSinks
    # The sliding window this layer's own attention mask gives it (None: full causal), read from
    # the model's mask code at patch time; it wins over the ``sliding_window`` the layer passes,
    # which some models leave out. window_from_mask=False: no mask was seen, trust the argument.
    window: int | None = None
    window_from_mask: bool = False


def plan(backend: str, window: int | None = None, window_from_mask: bool = False) -> LayerPlan:
    kernel = _varlen_fn(backend)
    gqa = backend in ("fa3", "flash_attn") or _accepts(kernel, "enable_gqa")
    sinks = _torch_sinks() if backend == "torch" else _accepts(kernel, "s_aux")
    return LayerPlan(backend, kernel, gqa, sinks, window, window_from_mask)


PLAN_ATTR = "_seqpack_plan"


class _Depth(threading.local):
    """How many packed forwards this thread is inside: per thread, so a model running unpacked in
    one thread is not taken for packed while another thread packs (mixers.py keeps its rows so too)."""

    def __init__(self):
        self.value = 0


_packed_depth = _Depth()


def packing() -> bool:
    """Whether a patched model's packed forward is running in this thread."""
    return _packed_depth.value > 0


class PackedForward:
    """Context of one packed forward: lets the attention function catch a model that drops kwargs."""

    def __enter__(self):
        _packed_depth.value += 1

    def __exit__(self, *exc):
        _packed_depth.value -= 1


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over the packed sequence.

    Args:
        query: (1, Hq, T, D); key, value: (1, Hkv, T, D).
        kwargs: must hold ``cu_seq_lens_q`` ((N + 1,) int32) and ``max_length_q`` (int) during a
            packed forward.
    Returns:
        ((1, T, Hq, D), None).
    """
    cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
    max_seqlen = kwargs.pop("max_length_q", None)
    for name in ("cu_seq_lens_k", "max_length_k", "position_ids"):
        kwargs.pop(name, None)
    layer_plan = getattr(module, PLAN_ATTR, None) or plan("reference")
    if cu_seqlens is None:
        if packing():
            raise RuntimeError(
                f"seqpack: {type(module).__name__} was called without the packing metadata "
                "(cu_seq_lens_q): this model does not forward attention kwargs, so it cannot be packed. "
                "Call seqpack.unpatch(model)."
            )
        # Outside a packed forward (e.g. gradient-checkpoint recompute of an unpacked call):
        # behave exactly like the implementation the model had before patch().
        return _delegate(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout,
            scaling,
            sliding_window,
            softcap,
            kwargs,
        )
    if max_seqlen is None:
        raise ValueError("seqpack: cu_seq_lens_q was given without max_length_q.")
    if query.shape[0] != 1:
        raise ValueError(
            f"seqpack: packed attention expects a (1, T) batch, got batch size {query.shape[0]}."
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer_plan.window_from_mask:
        sliding_window = layer_plan.window
    if getattr(module, "is_causal", True) is False or kwargs.get("is_causal") is False:
        raise RuntimeError(
            f"seqpack: {type(module).__name__} is bidirectional; packing supports causal attention only."
        )
    s_aux = kwargs.get("s_aux")
    backend = layer_plan.backend
    why = _unsupported_feature(layer_plan, query, value, dropout, softcap, s_aux)
    if why is not None:
        _log_once(
            f"seqpack: backend '{backend}' cannot do {why} ({type(module).__name__}); using 'reference' there"
        )
        backend = "reference"
    if backend == "reference":
        # With sinks on CUDA the eager attention stays out of the compiled layer (a graph break):
        # inductor (torch 2.11) crashes compiling its backward, the softmax over the scores with
        # the sink column appended (tiling_utils.get_pw_red_splits; found by tests/test_gpu_sweep.py).
        reference = _uncompiled_reference if s_aux is not None and query.is_cuda else _reference_attention
        out = reference(
            module, query, key, value, cu_seqlens, max_seqlen,
            scaling=scaling, dropout=dropout, sliding_window=sliding_window, softcap=softcap, **kwargs,
        )  # fmt: skip
    elif (width := max(query.shape[-1], value.shape[-1])) > MAX_HEAD_DIM:
        _log_once(
            f"seqpack: backend '{backend}' cannot do head_dim {width} > {MAX_HEAD_DIM} "
            f"({type(module).__name__}); using SDPA over the padded layout there"
        )
        out = _rows_sdpa(
            query, key, value, cu_seqlens, max_seqlen,
            scaling=scaling, dropout=dropout, sliding_window=sliding_window,
        )  # fmt: skip
    else:
        out = _kernel_attention(
            layer_plan, module, query, key, value, cu_seqlens, max_seqlen,
            scaling=scaling, dropout=dropout, sliding_window=sliding_window, softcap=softcap, s_aux=s_aux,
        )  # fmt: skip
    return out, None


def _delegate(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, kwargs):
    """The attention implementation the model's config names now (the one it had before patch)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(getattr(module, "config", None), "_attn_implementation_internal", None) or "eager"
    if impl == ATTN_NAME:
        raise RuntimeError(
            f"seqpack: {type(module).__name__} runs attn_implementation={ATTN_NAME!r} but its model is not "
            "patched. Load the model with its usual attention implementation and call seqpack.patch(model)."
        )
    fn = _eager_function(module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
    extra = {"sliding_window": sliding_window} if sliding_window is not None else {}
    if softcap is not None:
        extra["softcap"] = softcap
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)


def register() -> None:
    """Register ``"seqpack"`` with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
