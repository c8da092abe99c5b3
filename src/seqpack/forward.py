"""The forward a patched module gets: pack the padded batch, run the original, unpack.

The backbone's wrapper packs the padded inputs into one (1, T) sequence and runs the original
forward with the packing metadata as kwargs (which transformers' modeling code hands on to every
attention call); a causal LM's wrapper also runs its LM head and loss on the packed real tokens.
Calls that packing cannot serve (generation with a cache, output_attentions, 4-D masks) run the
original forward unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import attention
from . import compile as compiling
from .loss import linear_cross_entropy
from .loss import shift_labels as _shift_labels
from .packing import (
    IGNORE_INDEX,
    VarlenMetadata,
    metadata_from_mask,
    metadata_from_packed,
    pack,
    unpack,
)
from .support import _base_model


@dataclass
class _Record:
    wrapped: list = field(default_factory=list)  # modules whose forward seqpack wraps
    configs: list = field(default_factory=list)  # (config, original attention implementation)
    attention_modules: list = field(default_factory=list)
    compiled: list = field(default_factory=list)  # decoder layers compiled in place
    config_owners: list = field(default_factory=list)  # (module, the config object it had)
    backend: str = "reference"
    fused_loss: bool = False  # training with labels skips the logits (see loss.fusable_head)
    memory_budget: float | None = None


@dataclass
class _Wrap:
    """Stored on each wrapped module; the wrapper reads it through ``self`` (so deepcopy works)."""

    record: _Record
    previous: Any  # the instance forward that was there before patch(), or None
    head: bool  # the causal-LM wrapper: LM head and loss on the packed tokens
    active: bool = True


_CACHE_NAMES = ("past_key_values", "cache")


_WRAP = "_seqpack_wrap"


class _Forward:
    """The forward a patched module gets, as an instance attribute.

    An object rather than a closure: ``copy.deepcopy`` of the model copies it along with the module
    it points to (a closure would keep computing with the original's weights), and ``__wrapped__``
    gives ``inspect.signature`` the original's parameters, which Trainer reads to pick columns.
    """

    def __init__(self, module: nn.Module, original):
        self.module = module
        self.__wrapped__ = original
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return _packed_forward(self.module, *args, **kwargs)


def _wrap(module: nn.Module, record: _Record, *, head: bool) -> None:
    previous = module.__dict__.get("forward")
    module.__dict__[_WRAP] = _Wrap(record, previous, head)
    module.forward = _Forward(
        module, previous if previous is not None else type(module).forward.__get__(module)
    )
    record.wrapped.append(module)


def _unwrap_forward(module: nn.Module) -> None:
    wrap = module.__dict__.pop(_WRAP)
    wrap.active = False  # a forward installed over ours keeps calling it: it now passes through
    current = module.__dict__.get("forward")
    if isinstance(current, _Forward):
        if wrap.previous is None:
            del module.forward
        else:
            module.forward = wrap.previous


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _packed_forward(self, *args, **kwargs):
    """The forward of a patched module: pack, run the original forward, unpack."""
    wrap = self.__dict__.get(_WRAP)
    original = (
        wrap.previous if wrap is not None and wrap.previous is not None else type(self).forward.__get__(self)
    )
    if wrap is None or not wrap.active:
        return original(*args, **kwargs)
    signature = _signature(type(self))
    inputs = signature.bind_partial(self, *args, **kwargs).arguments
    inputs.pop("self", None)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(inputs.pop(name, {}))
    why = _passthrough_reason(self, inputs)
    if why is not None:
        _log_passthrough(why)
        with _original_attention(wrap.record):
            return original(*args, **kwargs)
    return _packed_call(self, original, wrap, inputs)


def _passthrough_reason(owner: nn.Module, inputs: dict) -> str | None:
    if any(inputs.get(name) is not None for name in _CACHE_NAMES):
        return "a KV cache was passed (generation)"
    if inputs.get("use_cache") and not owner.training:
        return "use_cache=True at inference (generation)"
    if inputs.get("output_attentions"):
        return "output_attentions=True needs the full attention matrix"
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        return "a 4-D custom attention mask was passed"
    keep = inputs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor) or (isinstance(keep, int) and keep != 0):
        return "logits_to_keep was set (generation)"
    return None


def _log_passthrough(why: str) -> None:
    attention._log_once(f"seqpack: running the original forward because {why}")


class _original_attention:
    """Give the decoder back its original attention implementation for one unpacked call."""

    def __init__(self, record: _Record):
        self.record = record

    def __enter__(self):
        for config, impl in self.record.configs:
            config._attn_implementation_internal = impl

    def __exit__(self, *exc):
        for config, _ in self.record.configs:
            config._attn_implementation_internal = attention.ATTN_NAME


def _check_inputs(inputs: dict) -> tuple[int, int, torch.device]:
    input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    if (input_ids is None) == (embeds is None):
        raise ValueError("seqpack: pass exactly one of input_ids (B, L) or inputs_embeds (B, L, H).")
    x = input_ids if input_ids is not None else embeds
    if x.ndim != (2 if input_ids is not None else 3):
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(
            f"seqpack: {name} must be {'(B, L)' if name == 'input_ids' else '(B, L, H)'}, got {tuple(x.shape)}."
        )
    batch, length = x.shape[:2]
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length)):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"seqpack: attention_mask has shape {shape} but the inputs are ({batch}, {length}); pass a (B, L) "
            "padding mask of 0/1 (or a 4-D custom mask, which runs the original unpacked forward)."
        )
    for name in ("position_ids", "labels"):
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] != length:
            raise ValueError(
                f"seqpack: {name} has shape {tuple(value.shape)} but the inputs are ({batch}, {length})."
            )
    return batch, length, x.device


def _metadata(inputs: dict, batch: int, length: int, device: torch.device) -> VarlenMetadata:
    """Packing metadata: from the caller's varlen kwargs, a pre-packed batch, or the padding mask."""
    mask, position_ids = inputs.get("attention_mask"), inputs.get("position_ids")
    cu_seqlens = inputs.get("cu_seq_lens_q")
    prepacked = batch == 1 and position_ids is not None and (mask is None or bool(mask.all()))
    if cu_seqlens is not None or prepacked:
        return metadata_from_packed(
            length,
            device,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=inputs.get("max_length_q"),
        )
    return metadata_from_mask(mask, batch, length, device, position_ids)


def _packed_call(module: nn.Module, original, wrap: _Wrap, inputs: dict):
    record = wrap.record
    batch, length, device = _check_inputs(inputs)
    meta = _metadata(inputs, batch, length, device)
    mask = inputs.pop("attention_mask", None)
    return_dict = inputs.pop("return_dict", None)
    labels = inputs.pop("labels", None)
    call = {}
    for name, value in inputs.items():
        if name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            continue
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (batch, length):
            value = pack(value, meta)  # input_ids, inputs_embeds, token_type_ids, ...
        call[name] = value
    call.update(
        position_ids=meta.position_ids,
        cu_seq_lens_q=meta.cu_seqlens,
        cu_seq_lens_k=meta.cu_seqlens,
        max_length_q=meta.max_seqlen,
        max_length_k=meta.max_seqlen,
        use_cache=False,
        return_dict=True,
    )
    targets = None
    if labels is not None:
        if not wrap.head:
            call["labels"] = labels
        else:
            targets = _shift_labels(labels, mask, meta)  # (1, T)
            # Labels whose plain one-step shift gives the same targets, for models that ignore
            # shift_labels; models that honour it use the targets directly.
            call["labels"] = torch.nn.functional.pad(targets[:, :-1], (1, 0), value=IGNORE_INDEX)
            call["shift_labels"] = targets
    fused = targets is not None and record.fused_loss and module.training
    with attention.PackedForward(), compiling.memory_budget(record.memory_budget):
        output = _fused_loss_call(module, call, targets) if fused else original(**call)
    output = _unpack_output(output, meta)
    if return_dict is False:
        return output.to_tuple()
    return output


def _fused_loss_call(model: nn.Module, call: dict, targets: torch.Tensor):
    """The causal-LM forward with the loss fused into the LM head: no (T, V) logits, logits=None."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = call.pop("num_items_in_batch", None)
    for name in ("labels", "shift_labels", "logits_to_keep"):
        call.pop(name, None)
    out = _base_model(model)(**call)
    head = model.get_output_embeddings()
    hidden = out.last_hidden_state[0]  # (T, H)
    loss = linear_cross_entropy(hidden, head.weight, targets[0], head.bias, num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states)


def _unpack_output(output, meta: VarlenMetadata):
    if meta.indices is None:
        return output
    total = meta.total
    for key in list(output.keys()):
        value = output[key]
        if (
            isinstance(value, torch.Tensor)
            and value.ndim >= 2
            and value.shape[0] == 1
            and value.shape[1] == total
        ):
            output[key] = unpack(value, meta)
        elif key == "hidden_states" and isinstance(value, tuple):
            output[key] = tuple(unpack(h, meta) for h in value)
    for name in _CACHE_NAMES:
        if name in output.keys():
            output[name] = None
    return output
