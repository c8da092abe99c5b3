"""The forward a patched module gets: pack the padded batch, run the original, unpack.

The backbone's wrapper packs the padded inputs into one (1, T) sequence and runs the original
forward with the packing metadata as kwargs (which transformers' modeling code hands on to every
attention call); a causal LM's wrapper also runs its LM head and loss on the packed real tokens.
While a packed forward runs, the model's configs name the ``"seqpack"`` attention function, so
transformers builds no attention mask. Calls that packing cannot serve the way the unpatched model
would (generation with a cache, output_attentions, 4-D masks, ``return_dict=False``, an
all-padding batch) run the original forward unchanged.

The wrapper is excluded from whole-model ``torch.compile`` (``torch.compiler.disable``): packing
reads the batch on the host, and the decoder layers inside it are compiled by seqpack already.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from . import attention, mixers
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
from .support import (
    MEDIA_INPUTS,
    MaskPattern,
    UnsupportedModelError,
    _base_model,
    fused_loss_blocker,
    has_attention,
    logit_cap,
    mask_patterns,
    router_loss_gated,
)


@dataclass
class _Record:
    wrapped: list = field(default_factory=list)  # modules whose forward seqpack wraps
    configs: list = field(default_factory=list)  # the model's own configs: "seqpack" only while packing
    views: list = field(default_factory=list)  # (module, real config) for each module given a view
    attention_modules: list = field(default_factory=list)
    layers: Any = None  # the decoder layers (nn.ModuleList)
    compiled: list = field(default_factory=list)  # decoder layers compiled in place
    mixers: list = field(default_factory=list)  # sequence mixers (and their layers) given a forward
    backend: str = "reference"
    keep_logits: bool = False  # never fuse the loss (the caller reads logits in training)
    memory_budget: float | None = None
    masks_read: bool = False  # the layers' own mask patterns are in the plans (False: read them first)
    mask_key: Any = None  # the configs' values when the masks were read: an edit since reads them again
    mask_inputs: tuple = ()  # inputs that change the model's attention mask (gemma3's token_type_ids)
    language_model: Any = None  # a multimodal model's language model, packed inside media calls
    language_mask_inputs: tuple = ()  # its inputs that change its attention mask

    def __setstate__(self, state):  # torch.load of a patched model, maybe in a fresh process
        self.__dict__.update(state)
        attention.register()


@dataclass
class _Wrap:
    """Stored on each wrapped module; the wrapper reads it through ``self`` (so deepcopy works)."""

    record: _Record
    previous: Any  # the instance forward that was there before patch(), or None
    head: bool  # the causal-LM wrapper: LM head and loss on the packed tokens
    inner: bool = False  # a multimodal model's language model: packs only inside a media call
    active: bool = True


_CACHE_NAMES = ("past_key_values", "cache")
_WRAP = "_seqpack_wrap"
_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# --------------------------------------------------------------------------- attention plans


def mask_reason(patterns, layers: nn.ModuleList, text_config) -> str | None:
    """Why the decoder layers' own masks cannot be packed, from ``support.mask_patterns``."""
    for index, pattern in enumerate(patterns or ()):
        if isinstance(pattern, str):
            return f"decoder layer {index} ({type(layers[index]).__name__}): {pattern}"
        if pattern is None and getattr(text_config, "sliding_window", None) and has_attention(layers[index]):
            return (
                f"seqpack could not read which attention mask decoder layer {index} "
                f"({type(layers[index]).__name__}) gets, and the config sets a sliding window"
            )
    return None


def plan_attention(record: _Record, patterns) -> None:
    """Give every attention module its LayerPlan, with the window its layer's mask describes.

    ``patterns`` is ``support.mask_patterns``'s answer, or None when it could not run yet (a model
    on the meta device): the first packed forward reads them then.
    """
    by_module = {}
    for layer, pattern in zip(record.layers, patterns or [None] * len(record.layers), strict=True):
        for module in layer.modules():
            by_module[id(module)] = pattern
    for module in record.attention_modules:
        pattern = by_module.get(id(module))
        seen = isinstance(pattern, MaskPattern)
        layer_plan = attention.plan(record.backend, pattern.window if seen else None, seen)
        setattr(module, attention.PLAN_ATTR, layer_plan)
        attention.plan_eager(module)
    record.masks_read = patterns is not None


def config_key(configs) -> tuple:
    """The public values of the configs, to notice an edit (``config.sliding_window = ...``)."""
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v)
        for config in configs
        for k, v in config.__dict__.items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))
    )


def _read_masks(model: nn.Module, record: _Record) -> None:
    """The mask probe again: for a model patched on the meta device, or after a config edit."""
    patterns = mask_patterns(_base_model(model), record.layers)
    config = (
        model.config.get_text_config(decoder=True)
        if hasattr(model.config, "get_text_config")
        else model.config
    )
    reason = mask_reason(patterns, record.layers, config)
    if reason is not None:
        raise UnsupportedModelError(
            f"seqpack cannot pack model_type {getattr(model.config, 'model_type', '?')!r} exactly: {reason}. "
            "Call seqpack.unpatch(model)."
        )
    plan_attention(record, patterns if patterns is not None else [None] * len(record.layers))
    record.mask_key = config_key(record.configs)


# --------------------------------------------------------------------------- the wrapper


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


def _wrap(module: nn.Module, record: _Record, *, head: bool, inner: bool = False) -> None:
    previous = module.__dict__.get("forward")
    module.__dict__[_WRAP] = _Wrap(record, previous, head, inner)
    module.forward = _Forward(
        module, previous if previous is not None else type(module).forward.__get__(module)
    )
    module.__dict__[_REPLICATE] = _refuse_data_parallel
    record.wrapped.append(module)


_REPLICATE = "_replicate_for_data_parallel"


def _refuse_data_parallel():
    """nn.DataParallel's replicas share their module's instance attributes (a shallow ``__dict__``
    copy): the packed forward, and each layer compiled in place, would run the original module's
    weights on every replica. Refused when DataParallel first replicates the model."""
    raise RuntimeError(
        "seqpack: a patched model cannot run under torch.nn.DataParallel (its replicas would run the "
        "original module's weights). Use DistributedDataParallel: launch with torchrun (the HF Trainer "
        "then uses DDP), or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
    )


def _unwrap_forward(module: nn.Module) -> None:
    wrap = module.__dict__.pop(_WRAP)
    module.__dict__.pop(_REPLICATE, None)
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


class _Calls(threading.local):
    """Where this thread's calls stand: per thread, so two models running in two threads never
    read each other's (attention.py keeps its packing depth so too)."""

    def __init__(self):
        self.passthrough = 0  # > 0 while an original forward runs for a passed-through call
        self.media: _MediaCall | None = None  # the outermost call with images, video or audio


_calls = _Calls()


class _Passthrough:
    """Inside an unpacked call, the wrappers it reaches (the backbone's) pass through as well."""

    def __enter__(self):
        _calls.passthrough += 1

    def __exit__(self, *exc):
        _calls.passthrough -= 1


class _MediaCall:
    """A call with images, video or audio: the multimodal forward runs on the padded batch, and the
    language model it calls packs what it is handed (its merged embeddings, its positions).

    Nested media calls (the causal LM's, then its backbone's) share the outermost one's state, where
    the language model's wrapper leaves the metadata it packed with (for the fused loss).
    """

    def __enter__(self):
        self.outer = _calls.media
        if _calls.media is None:
            _calls.media = self
            self.meta = None
        return _calls.media

    def __exit__(self, *exc):
        if self.outer is None:
            _calls.media = None


class _NamedSeqpack:
    """While packing, the model's configs name seqpack's attention: transformers makes no mask."""

    def __init__(self, record: _Record):
        self.record = record

    def __enter__(self):
        self.saved = [(c, c._attn_implementation_internal) for c in self.record.configs]
        for config, _ in self.saved:
            config._attn_implementation_internal = attention.ATTN_NAME

    def __exit__(self, *exc):
        for config, impl in self.saved:
            config._attn_implementation_internal = impl


@torch.compiler.disable
def _packed_forward(self, *args, **kwargs):
    """The forward of a patched module: pack, run the original forward, unpack."""
    wrap = self.__dict__.get(_WRAP)
    original = (
        wrap.previous if wrap is not None and wrap.previous is not None else type(self).forward.__get__(self)
    )
    if wrap is None or not wrap.active or _calls.passthrough or attention.packing():
        return original(*args, **kwargs)  # unpatched, or inside a call that is passed through or packed
    if wrap.inner and _calls.media is None:
        return original(*args, **kwargs)  # a language model called on its own, or by a text-only call
    signature = _signature(type(self))
    inputs = signature.bind_partial(self, *args, **kwargs).arguments
    inputs.pop("self", None)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(inputs.pop(name, {}))
    media = [n for n, v in inputs.items() if v is not None and n.startswith(MEDIA_INPUTS)]
    why = _passthrough_reason(self, wrap, inputs, media)
    if why is not None:
        attention._log_once(f"seqpack: running the original forward because {why}")
        with _Passthrough():
            return original(*args, **kwargs)
    if media and not wrap.inner:
        return _media_forward(self, original, wrap, inputs, args, kwargs)
    return _packed_call(self, original, wrap, inputs, args, kwargs)


def _passthrough_reason(owner: nn.Module, wrap: _Wrap, inputs: dict, media: list) -> str | None:
    """Why this call must run the original forward to give what the unpatched model gives."""
    record = wrap.record
    caches = [inputs.get(name) for name in _CACHE_NAMES if inputs.get(name) is not None]
    if wrap.inner:
        # The media call above was read against the caller's own inputs; a fresh cache is what a
        # multimodal forward makes by itself when its config says use_cache (idefics3, in training).
        if any(getattr(c, "get_seq_length", lambda: 1)() for c in caches):
            return "a KV cache with tokens in it reached the language model"
        return (
            _mask_reason(inputs)
            or _unread_inputs(inputs)
            or _mask_input_reason(inputs, record.language_mask_inputs)
        )
    if caches:
        return "a KV cache was passed (generation)"
    if wrap.head and inputs.get("labels") is not None and not _computes_causal_lm_loss(owner):
        return "a loss function of its own is set on the model (it gets the padded batch it expects)"
    if not wrap.head and inputs.get("labels") is not None:
        # A model that takes labels but is no causal LM seqpack knows: where its loss reads them
        # from the logits is its own business, so it gets the padded batch it expects.
        return f"labels were passed to {type(owner).__name__}, whose loss seqpack does not compute"
    config = _text_config(owner)

    def asked(name: str, at_inference_only: bool = False):  # the call's value, or the config's
        value = inputs.get(name)
        if value is None and not (at_inference_only and owner.training):
            value = getattr(config, name, None)
        return value

    if asked("use_cache", at_inference_only=True):
        return "use_cache=True asks for a KV cache (pass use_cache=False to pack)"
    if asked("output_attentions"):
        return "output_attentions=True needs the full attention matrix"
    why = _mask_reason(inputs)
    if why is not None:
        return why
    keep = inputs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor) or (keep and inputs.get("labels") is not None):
        return "logits_to_keep was given as indices, or with labels"
    return_dict = inputs.get("return_dict")
    if return_dict is None:  # as transformers' can_return_tuple reads it
        return_dict = getattr(getattr(owner, "config", None), "return_dict", True)
    if return_dict is False:
        return "return_dict=False (the original forward's tuple layout)"
    if media and record.language_model is None:
        return f"{media[0]} was passed to a model whose language model seqpack cannot tell apart"
    if media:
        return None  # the multimodal forward runs padded; its language model decides (_media_forward)
    return _mask_input_reason(inputs, record.mask_inputs)


def _mask_input_reason(inputs: dict, names: tuple) -> str | None:
    for name in names:
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and bool(value.any()):  # a host sync, for these models only
            return f"{name} changes this model's attention mask (image tokens see each other)"
    return None


def _unread_inputs(inputs: dict) -> str | None:
    """What a multimodal forward handed its language model in a layout seqpack does not read: what
    a caller's input would be refused for (``_check_inputs``), or per-row data that is not per token."""
    try:
        batch, length, _ = _check_inputs(inputs, head=False)
    except ValueError as err:
        return f"the language model was handed inputs seqpack does not read ({err})"
    position_ids = inputs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim > 3:
        return f"the language model was handed position_ids of shape {tuple(position_ids.shape)}"
    for name, value in inputs.items():
        is_row_data = isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch
        if is_row_data and value.shape[1] != length and name != "position_ids":
            return f"the language model was handed {name}, per row but not per token (cross-attention)"
    return None


def _mask_reason(inputs: dict) -> str | None:
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        return "a 4-D custom attention mask was passed"
    if isinstance(mask, dict):
        return "the attention masks were passed ready-made (a mapping per layer type)"
    return None


def _text_config(module: nn.Module):
    config = getattr(module, "config", None)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def _check_inputs(inputs: dict, head: bool) -> tuple[int, int, torch.device]:
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
    if batch == 0 or length == 0:
        raise ValueError(
            f"seqpack: the batch is empty (inputs of shape {tuple(x.shape)}); pass at least one token."
        )
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length)):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"seqpack: attention_mask has shape {shape} but the inputs are ({batch}, {length}); pass a (B, L) "
            "padding mask of 0/1 (or a 4-D custom mask, which runs the original unpacked forward)."
        )
    position_ids = inputs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and (
        position_ids.ndim < 2 or position_ids.shape[-1] != length or position_ids.shape[-2] not in (1, batch)
    ):
        raise ValueError(
            f"seqpack: position_ids have shape {tuple(position_ids.shape)} but the inputs are ({batch}, {length}); "
            "pass (B, L) or (1, L) positions."
        )
    labels = inputs.get("labels")
    if head and isinstance(labels, torch.Tensor) and (labels.is_floating_point() or labels.is_complex()):
        raise ValueError(
            f"seqpack: labels must be integer token ids (-100 for no target), got {labels.dtype}."
        )
    if head and isinstance(labels, torch.Tensor) and tuple(labels.shape) != (batch, length):
        raise ValueError(
            f"seqpack: labels have shape {tuple(labels.shape)} but the inputs are ({batch}, {length}); pass labels "
            "of the inputs' shape, -100 where a token has no target."
        )
    return batch, length, x.device


def _metadata(inputs: dict, batch: int, length: int, device: torch.device) -> VarlenMetadata:
    """What the batch means, read as transformers reads it.

    - flash kwargs (``cu_seq_lens_q``...): one packed row, used as given;
    - no attention_mask and (B, L) position_ids: every token is real, and a document starts
      wherever positions do not step by one, in any row (transformers' packed-sequence rule);
    - otherwise the 0/1 attention_mask: each row's real tokens are one sequence.
    """
    mask, position_ids = inputs.get("attention_mask"), inputs.get("position_ids")
    cu_seqlens = inputs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(
                f"seqpack: cu_seq_lens_q describes one packed row, but the batch has {batch} rows; "
                "pack the batch into one (1, T) row or leave the flash kwargs out."
            )
        return metadata_from_packed(
            batch,
            length,
            device,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=inputs.get("max_length_q"),
        )
    if mask is None and isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
        return metadata_from_packed(batch, length, device, position_ids=position_ids)
    if (
        mask is None
        and isinstance(position_ids, torch.Tensor)
        and position_ids.ndim == 3
        and len(position_ids) == 4
    ):
        # Multi-axis positions with the text positions first: transformers reads documents from those
        docs = metadata_from_packed(batch, length, device, position_ids=position_ids[0])
        return docs._replace(position_ids=position_ids.expand(4, batch, length).reshape(4, 1, -1))
    return metadata_from_mask(mask, batch, length, device, position_ids)


def _packed_call(module: nn.Module, original, wrap: _Wrap, inputs: dict, args, kwargs):
    record = wrap.record
    batch, length, device = _check_inputs(inputs, wrap.head)
    meta = _metadata(inputs, batch, length, device)
    if wrap.inner and _calls.media is not None:
        _calls.media.meta = meta  # for the fused loss of the causal LM above (_media_forward)
    if meta.total == 0:
        # All padding: nothing to pack. The unpatched model's own answer (its loss), zero outputs.
        with _Passthrough():
            return _zero_per_token(original(*args, **kwargs), batch, length)
    if not record.masks_read or record.mask_key != config_key(record.configs):
        _read_masks(module, record)
    mask = inputs.pop("attention_mask", None)
    inputs.pop("return_dict", None)
    labels = inputs.pop("labels", None)
    ignore = inputs.pop("ignore_index", None) if wrap.head else None
    labels = _no_target(labels, ignore)
    call = {}
    for name, value in inputs.items():
        if name == "position_ids" or name in _FLASH_KWARGS or name in _CACHE_NAMES:
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
            # (1, T): the caller's own shift_labels (packed like every (B, L) input), or from labels
            given = _no_target(call.get("shift_labels"), ignore)
            targets = given if isinstance(given, torch.Tensor) else _shift_labels(labels, mask, meta)
            # Labels whose plain one-step shift gives the same targets, for models that ignore
            # shift_labels; models that honour it use the targets directly.
            call["labels"] = torch.nn.functional.pad(targets[:, :-1], (1, 0), value=IGNORE_INDEX)
            call["shift_labels"] = targets
    keep = min(call.pop("logits_to_keep", 0) or 0, length) if wrap.head else 0
    head = None
    if (targets is not None and module.training and not record.keep_logits) or keep:
        head = _fusable_head(module, call.get("output_router_logits"))
    mixers.wrap_replays(record.mixers)  # before any layer runs (gradient checkpointing)
    with (
        attention.PackedForward(),
        mixers.PackedRows(meta.cu_seqlens, meta.max_seqlen),
        _NamedSeqpack(record),
        _NeftuneScale(module, meta),
        compiling.memory_budget(record.memory_budget),
        compiling.graph_room(),
    ):
        if keep and head is not None:
            return _kept_logits_call(module, head, call, meta, keep)
        output = _fused_loss_call(module, head, call, targets) if head is not None else original(**call)
    output = _unpack_output(output, meta)
    if keep:  # a head of its own: all logits were computed, keep the last ``keep`` of each row
        output["logits"] = output["logits"][:, -keep:]
    return output


def _no_target(labels, ignore: int | None):
    """Labels (or targets) with a caller's ``ignore_index`` as IGNORE_INDEX: one spelling of "no target"."""
    if isinstance(labels, torch.Tensor) and ignore is not None and ignore != IGNORE_INDEX:
        return labels.masked_fill(labels == ignore, IGNORE_INDEX)
    return labels


def _media_forward(module: nn.Module, original, wrap: _Wrap, inputs: dict, args, kwargs):
    """A call with images, video or audio, to a multimodal model or its causal LM.

    The multimodal forward runs on the padded batch as the unpatched model does: each tower with
    its own attention and batching, the image features merged at their placeholder tokens, the
    multi-axis positions (mRoPE) computed from the padded rows and their mask. The language model
    it calls packs what it is handed (the inner wrapper): merged embeddings, positions and every
    (B, L) input are gathered to the real tokens, and its outputs come back padded. A causal LM in
    training with labels then runs its LM head and loss fused, on the real tokens only.
    """
    record = wrap.record
    labels = inputs.get("labels")
    head = None
    if wrap.head and module.training and not record.keep_logits and isinstance(labels, torch.Tensor):
        head = _fusable_head(module, inputs.get("output_router_logits"))
    unfused = any(inputs.get(name) is not None for name in ("shift_labels", "logits_to_keep"))
    with _MediaCall() as media:
        if head is None or unfused:
            return original(*args, **kwargs)
        batch, length, device = _check_inputs(inputs, head=True)
        call = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "ignore_index")}
        call.update(use_cache=False, return_dict=True)
        out = _base_model(module)(**call)
    hidden = out.last_hidden_state  # (B, L, H): the language model packed, and unpacked for its caller
    if tuple(hidden.shape[:2]) != (batch, length):  # a multimodal forward that changed the length
        with _MediaCall():
            return original(*args, **kwargs)
    mask = inputs.get("attention_mask")
    meta = media.meta
    if meta is None or (meta.batch_size, meta.seq_len) != (batch, length):
        meta = metadata_from_mask(mask, batch, length, device)  # the language model ran unpacked
    targets = _shift_labels(_no_target(labels, inputs.get("ignore_index")), mask, meta)  # (1, T)
    loss = head.loss(pack(hidden, meta)[0], targets[0], inputs.get("num_items_in_batch"))
    return _fused_output(loss, out)


def _fused_output(loss: torch.Tensor, out):
    """The causal-LM output of a fused loss: logits=None, and the backbone's own further fields
    (a VLM's ``image_outputs``, ``rope_deltas`` ...) as the model's output would carry them."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    result = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states)
    for key, value in out.items():
        if key not in ("last_hidden_state", "hidden_states", *_CACHE_NAMES) and value is not None:
            result[key] = value
    return result


class _Head(NamedTuple):
    """The LM head as the fused loss computes it: ``cap * tanh(linear(h) / cap)`` when ``cap``."""

    linear: nn.Linear
    cap: float | None = None
    upcast: bool = False  # the model caps fp32 logits (Beam's ``logits.float() / cap``)
    sharded: bool = False  # an FSDP2 module (_is_sharded)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, V) logits of (N, H) hidden states, with the model's own ops."""
        logits = self.linear(hidden)
        if self.cap is not None:
            logits = logits.float() if self.upcast else logits
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, num_items) -> torch.Tensor:
        """() fp32 fused loss of (N, H) hidden states and (N,) targets."""
        head = self.linear

        def fused(h):  # head.weight read at the call: inside FSDP's, the gathered one
            return linear_cross_entropy(h, head.weight, targets, head.bias, num_items, softcap=self.cap)

        if not self.sharded:
            return fused(hidden)
        # FSDP2 gathers the weight only inside the head's call, and its hooks there set up the
        # gradient's reduction: the fused loss runs as the head's forward for this call. It
        # returns an empty tensor made from the loss, so FSDP's cast to its output_dtype (bf16
        # under accelerate) leaves the fp32 loss alone while its backward hook is in the graph.
        losses = []

        def as_forward(h):
            losses.append(fused(h))
            return losses[0].repeat(0)  # (0,), a copy (FSDP warns of a view)

        head.forward = as_forward
        try:
            anchor = head(hidden)
        finally:
            del head.forward
        return losses[0] + anchor.sum()  # + 0, through FSDP's output


def _fusable_head(model: nn.Module, router_logits: bool | None = None) -> _Head | None:
    """The LM head, if the fused loss computes exactly what the model's forward would, now.
    ``router_logits``: the call's ``output_router_logits`` (None: the config's).

    Decided at every call from the head that is there now: a PEFT adapter or trainable-token
    wrapper added after patch(), a hook or a forward replaced on the head, all keep the model's
    own loss. support.fused_loss_blocker reads the forward itself (cached per class), and
    support.logit_cap the logit cap it applies (Gemma 2's), read from the config now.
    """
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_children() if m is head), None)
    sharded = _is_sharded(head) and not torch.compiler.is_compiling()  # compiled: FSDP's own call
    if (
        name is None
        or (type(head) is not nn.Linear and not sharded)
        or (not sharded and (head._forward_hooks or head._forward_pre_hooks))
        or head._backward_hooks  # a user's: FSDP2's hooks are on tensors
        or head._backward_pre_hooks
        or "forward" in head.__dict__
    ):
        return None
    if not _computes_causal_lm_loss(model):
        return None  # a loss function set on the model (label smoothing, say), or another loss_type
    # A multimodal model's forward reads its text config's flags: both configs are asked.
    configs = (getattr(model, "config", None), _text_config(model))
    if router_logits is None:  # the config's
        router_logits = any(getattr(c, "output_router_logits", False) for c in configs)
    if router_logits and router_loss_gated(type(model)):
        return None  # the model adds its load-balancing loss: its own loss, unfused
    uncapped = all(getattr(c, "final_logit_softcapping", None) is None for c in configs)
    if fused_loss_blocker(type(model), name, uncapped) is not None:
        return None
    cap = None if uncapped else logit_cap(type(model), name)
    value = None if cap is None else _read_config(model, cap.read)  # None: no cap set, or none applied
    if value is None:
        return _Head(head, sharded=sharded)
    return _Head(head, float(value), cap.upcast, sharded)


def _is_sharded(head: nn.Module) -> bool:
    """An nn.Linear that FSDP2's ``fully_shard`` made an FSDPModule, with no hooks but FSDP's own."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    if fsdp is None or type(head).__bases__ != (getattr(fsdp, "FSDPModule", None), nn.Linear):
        return False
    hooks = [*head._forward_pre_hooks.values(), *head._forward_hooks.values()]
    return all(getattr(h, "__module__", "").startswith("torch.distributed.fsdp.") for h in hooks)


def _read_config(model: nn.Module, read: str):
    """``self.config.get_text_config().final_logit_softcapping`` and the like, as the forward reads it."""
    value = model
    for part in read.split(".")[1:]:  # after "self"
        value = getattr(value, part.removesuffix("()"))
        value = value() if part.endswith("()") else value
    return value


def _computes_causal_lm_loss(model: nn.Module) -> bool:
    """Whether the model's loss is transformers' own causal-LM loss (which packing computes exactly)."""
    if getattr(model, "_loss_function", None) is not None:
        return False
    try:
        return _is_causal_lm_loss(model.loss_function)
    except (AttributeError, KeyError):
        return False


def _is_causal_lm_loss(fn) -> bool:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return fn is ForCausalLMLoss


class _NeftuneScale:
    """NEFTune's noise (Trainer/TRL ``neftune_noise_alpha``) scales as alpha / sqrt(L * H) of the
    embedding output; packed, that output is (1, T, H). The alpha is scaled by sqrt(T / L) for the
    call, so each real token gets the noise distribution it gets unpatched."""

    def __init__(self, model: nn.Module, meta: VarlenMetadata):
        self.embeddings = model.get_input_embeddings()
        self.alpha = getattr(self.embeddings, "neftune_noise_alpha", None)
        self.scale = (meta.total / meta.seq_len) ** 0.5

    def __enter__(self):
        if self.alpha:
            self.embeddings.neftune_noise_alpha = self.alpha * self.scale

    def __exit__(self, *exc):
        if self.alpha:
            self.embeddings.neftune_noise_alpha = self.alpha


def _fused_loss_call(model: nn.Module, head: _Head, call: dict, targets: torch.Tensor):
    """The causal-LM forward with the loss fused into the LM head: no (T, V) logits, logits=None."""

    num_items = call.pop("num_items_in_batch", None)
    for name in ("labels", "shift_labels", "logits_to_keep"):
        call.pop(name, None)
    out = _base_model(model)(**call)
    hidden = out.last_hidden_state[0]  # (T, H)
    loss = head.loss(hidden, targets[0], num_items)
    return _fused_output(loss, out)


def _kept_logits_call(model: nn.Module, head: _Head, call: dict, meta: VarlenMetadata, keep: int):
    """``logits_to_keep=k`` (TRL's GRPO/RLOO log-probs): logits of the last k columns of each row.

    Only the packed tokens that sit in those columns go through the head; the (B, k, V) logits
    are zero where the padded batch has padding there, as every padded output of seqpack is.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = _base_model(model)(**call)
    batch, length, total = meta.batch_size, meta.seq_len, meta.total
    flat = meta.indices if meta.indices is not None else torch.arange(total, device=meta.cu_seqlens.device)
    row, col = flat // length, flat % length  # (T,) where each packed token sat
    kept = col >= length - keep  # (T,)
    slot = (row * keep + col - (length - keep))[kept]  # (K,) its place in the (B * k) layout
    logits = head.logits(out.last_hidden_state[0][kept])  # (K, V)
    padded = logits.new_zeros(batch * keep, logits.shape[-1]).index_copy(0, slot, logits)
    result = CausalLMOutputWithPast(logits=padded.view(batch, keep, -1))
    # the hidden states and the backbone's further fields (router logits ...), back padded; the
    # logits set first, as the model orders its output
    for key, value in _unpack_output(_fused_output(None, out), meta).items():
        result[key] = value
    return result


def _unpack_output(output, meta: VarlenMetadata):
    """Per-token outputs back in the padded layout: (1, T, ...) -> (B, L, ...); per-layer (T, ...)
    tensors such as router logits -> (B * L, ...), as the unpatched model flattens them."""
    total = meta.total
    flat = meta.batch_size * meta.seq_len

    def back(value, in_tuple: bool):
        if value.ndim >= 2 and value.shape[0] == 1 and value.shape[1] == total:
            return unpack(value, meta)
        if in_tuple and value.ndim == 2 and value.shape[0] == total and flat != total:
            return unpack(value.unsqueeze(0), meta).reshape(flat, value.shape[1])
        return value

    for key in list(output.keys()):
        value = output[key]
        if isinstance(value, torch.Tensor):
            output[key] = back(value, in_tuple=False)
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            output[key] = tuple(back(v, in_tuple=True) for v in value)
    for name in _CACHE_NAMES:
        if name in output.keys():
            output[name] = None
    return output


def _zero_per_token(output, batch: int, length: int):
    """Zeros for every (B, L, ...) output of an all-padding batch (padding positions are zero)."""

    def zero(value):
        is_token = (
            isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (batch, length)
        )
        return torch.zeros_like(value) if is_token and value.is_floating_point() else value

    if isinstance(output, tuple):
        return type(output)(zero(v) for v in output)
    for key in list(output.keys()):
        value = output[key]
        output[key] = tuple(zero(v) for v in value) if isinstance(value, tuple) else zero(value)
    return output
