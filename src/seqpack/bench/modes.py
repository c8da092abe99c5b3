"""The ways of feeding a batch to a model that the benchmark compares: a small registry.

A mode says three things: which attention implementation the fresh model is loaded with, what is
done to the model before training (nothing, or ``seqpack.patch``), and how a batch of token-id
lists becomes model inputs (padded, or flattened by transformers' ``DataCollatorWithFlattening``).
Everything else (model, weights, batches, order, optimizer, timing) is shared, so differences in
the table come from the mode alone. Later modes (compiled layers, fused loss, several GPUs) are one
``register_mode(Mode(...))`` each.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .data import prompt_length

IGNORE_INDEX = -100


class ModeOptions(NamedTuple):
    """What a mode may look at: the device and the user's attention choices."""

    device: torch.device
    hf_attn: str | None = None
    seqpack_backend: str = "auto"
    memory_budget: float | None = None  # seqpack.patch(memory_budget=...) for the compiled modes


Batch = list[list[int]]
Inputs = dict[str, "torch.Tensor | int"]


@dataclass(frozen=True)
class Mode:
    """One row of the table for each model.

    Attributes:
        name: the key users pass to ``--modes``.
        summary: one line for ``--help``.
        attn_implementation: options -> the ``attn_implementation`` the model is loaded with.
        collate: (examples, pad_id) -> keyword inputs of ``model(...)``, labels included. Runs
            on the host before timing starts, as a data loader would.
        prepare: (model, options) -> the model to train (may be the same object).
        describe_attention: (model, options) -> what the table names as the attention used.
        step_context: () -> a context manager every training step runs in.
    """

    name: str
    summary: str
    attn_implementation: Callable[[ModeOptions], str]
    collate: Callable[[Batch, int], Inputs]
    prepare: Callable[[torch.nn.Module, ModeOptions], torch.nn.Module] = lambda model, options: model
    describe_attention: Callable[[torch.nn.Module, ModeOptions], str] = lambda model, options: (
        model.config._attn_implementation
    )
    step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Add a mode to the registry (replacing one of the same name)."""
    MODES[mode.name] = mode
    return mode


# --------------------------------------------------------------------------- collation


def pad_batch(examples: Batch, pad_id: int) -> Inputs:
    """Right-pad to the longest example.

    Returns:
        input_ids: (B, L) int64; attention_mask: (B, L) int64, 1 on real tokens;
        labels: (B, L) int64, the input ids with IGNORE_INDEX on padding and on a
        ``data.Prompted`` example's prompt.
    """
    longest = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, L)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example, dtype=torch.long)
        attention_mask[row, : len(example)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, L)
    for row, example in enumerate(examples):
        labels[row, : prompt_length(example)] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def flatten_batch(examples: Batch, pad_id: int) -> Inputs:
    """transformers' own padding-free collation: one (1, T) row of the T real tokens.

    Returns:
        input_ids, labels, position_ids: (1, T) int64 (labels hold IGNORE_INDEX at each example's
        first token, so no target crosses an example boundary, and on a ``data.Prompted``
        example's prompt); cu_seq_lens_q/k: (B + 1,) int32; max_length_q/k: int.
    """
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)
    # Per-example labels, as the collator takes them; for a plain example (no prompt) they are its
    # ids, which is what the collator would use without them.
    features = [
        {"input_ids": list(e), "labels": [IGNORE_INDEX] * prompt_length(e) + e[prompt_length(e) :]}
        for e in examples
    ]
    return dict(collator(features, return_tensors="pt"))


# --------------------------------------------------------------------------- attention choice


@functools.cache
def _transformers_has(probe: str) -> bool:
    """Call a transformers availability probe by name; False where this version lacks it."""
    from transformers.utils import import_utils

    fn = getattr(import_utils, probe, None)
    return bool(fn is not None and fn())


def best_hf_attention(options: ModeOptions) -> str:
    """The fastest attention transformers itself can run packed sequences with, here.

    flash_attention_3 / flash_attention_2 when installed (CUDA), else flex_attention on CUDA, else
    sdpa, which packs through a block-diagonal mask built from ``position_ids``.
    """
    if options.hf_attn:
        return options.hf_attn
    if options.device.type == "cuda":
        if _transformers_has("is_flash_attn_3_available"):
            return "flash_attention_3"
        if _transformers_has("is_flash_attn_2_available"):
            return "flash_attention_2"
        if _transformers_has("is_torch_flex_attn_available"):
            return "flex_attention"
    return "sdpa"


def _describe_hf_packing(model: torch.nn.Module, options: ModeOptions) -> str:
    """The attention, and "NOT EXACT" for a hybrid whose mixers' PyTorch fallbacks ignore the
    packing (transformers issues #46093, #46851): its sequences leak into each other there."""
    name = model.config._attn_implementation
    from seqpack import support

    depth = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    layers = support._decoder_layers(support._base_model(model), depth)
    mixers = support.sequence_mixers(layers) if layers is not None else []
    if not (isinstance(mixers, list) and mixers):
        return name
    # The short convolutions of every family read the packing only in causal-conv1d's kernel; the
    # scans, only in flash-linear-attention's (Gated DeltaNet) or mamba-ssm's (Mamba). Any one
    # of them missing leaves a PyTorch fallback that runs across the sequences' boundaries.
    has = {m: importlib.util.find_spec(m) is not None for m in ("fla", "causal_conv1d", "mamba_ssm")}
    missing = [] if has["causal_conv1d"] else ["causal-conv1d"]
    if not (has["fla"] or has["mamba_ssm"]):
        missing.append("flash-linear-attention / mamba-ssm")
    if missing:
        return f"{name}; NOT EXACT: {type(mixers[0][1]).__name__} leaks across sequences (no {', '.join(missing)})"
    return name


# --------------------------------------------------------------------------- seqpack


def _patcher(**patch_kwargs) -> Callable[[torch.nn.Module, ModeOptions], torch.nn.Module]:
    """A ``prepare`` that calls ``seqpack.patch(model, backend=..., **patch_kwargs)``."""

    def prepare(model: torch.nn.Module, options: ModeOptions) -> torch.nn.Module:
        from seqpack import patch

        kwargs = dict(patch_kwargs)
        if kwargs.get("compile", True) and options.memory_budget is not None:
            kwargs["memory_budget"] = options.memory_budget
        patched = patch(model, backend=options.seqpack_backend, **kwargs)
        return patched if isinstance(patched, torch.nn.Module) else model

    return prepare


def _describe_seqpack(model: torch.nn.Module, options: ModeOptions) -> str:
    backend = options.seqpack_backend
    try:  # name the kernel 'auto' resolved to, where the core can say
        from seqpack.attention import resolve_backend

        backend = resolve_backend(backend)
    except (ImportError, AttributeError, ValueError):
        pass
    return f"{model.config._attn_implementation}:{backend}"


# --------------------------------------------------------------------------- the modes

register_mode(
    Mode(
        name="padding",
        summary="the unpatched model on padded batches, sdpa attention (what users get by default)",
        attn_implementation=lambda options: "sdpa",
        collate=pad_batch,
    )
)


def _sdpa_without_cudnn() -> contextlib.AbstractContextManager:
    # On Hopper, torch (2.11) picks cuDNN attention for a padded batch's mask: measured on an H100,
    # it stalled 1.4-2.4 s building a plan for some new lengths, and its steady-state step was 1.7x
    # the memory-efficient kernel's (llama-3.2-1b, batch 16). This mode is the padded path a user
    # who knows that would run.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


register_mode(
    Mode(
        name="padding-no-cudnn",
        summary="'padding' with sdpa's cuDNN kernel excluded (flash / memory-efficient / math only): "
        "the tuned padded path (run by default on CUDA only)",
        attn_implementation=lambda options: "sdpa",
        collate=pad_batch,
        describe_attention=lambda model, options: f"{model.config._attn_implementation}, no cuDNN",
        step_context=_sdpa_without_cudnn,
    )
)
register_mode(
    Mode(
        name="hf-packing",
        summary="transformers' DataCollatorWithFlattening (position_ids + flash kwargs), best attention "
        "transformers has here (flash_attention_3/2 > flex_attention on GPU > sdpa); --hf-attn overrides",
        attn_implementation=best_hf_attention,
        collate=flatten_batch,
        describe_attention=_describe_hf_packing,
    )
)
register_mode(
    Mode(
        name="seqpack",
        summary="seqpack.patch(model) on the same padded batches as 'padding'",
        attn_implementation=lambda options: "sdpa",
        collate=pad_batch,
        prepare=_patcher(),
        describe_attention=_describe_seqpack,
    )
)
register_mode(
    Mode(
        name="seqpack-eager",
        summary="seqpack.patch(model, compile=False): no compiled layers (not run by default)",
        attn_implementation=lambda options: "sdpa",
        collate=pad_batch,
        prepare=_patcher(compile=False),
        describe_attention=_describe_seqpack,
    )
)

DEFAULT_MODES = ("padding", "hf-packing", "seqpack")
# On CUDA the tuned padded path runs too: there the default sdpa choice can be cuDNN's (see above).
CUDA_DEFAULT_MODES = ("padding", "padding-no-cudnn", "hf-packing", "seqpack")
