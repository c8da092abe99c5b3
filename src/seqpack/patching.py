"""patch() / unpatch(): what is wrapped, recorded and restored.

``patch(model)`` changes one instance and nothing else:
- its backbone's forward is wrapped: padded inputs are packed into one (1, T) sequence, the
  original forward runs on it with the packing metadata as kwargs (which transformers' modeling
  code hands on to every attention call), and outputs are unpacked back to the padded layout.
  Whoever calls the backbone (a classification head, TRL's fused LM head) gets packing;
- a causal LM's own forward is wrapped as well, so its LM head and loss run on the packed real
  tokens only (a pre-packed call then passes through the backbone's wrapper untouched);
- the model gets config objects of its own, which name the ``"seqpack"`` attention function;
  each attention module gets its ``LayerPlan``; decoder layers are compiled in place.
Everything is recorded on the instance and undone by ``unpatch``. State-dict keys never change.

Whether a model can be packed exactly is decided by looking at it (config, layer types, modules,
forward signatures and call sites); ``_EXCEPTIONS`` holds the few types that pass those checks and
are still wrong, each found by tests/test_sweep.py.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import logging
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import attention
from . import compile as compiling
from .loss import fusable_head, linear_cross_entropy
from .loss import shift_labels as _shift_labels
from .packing import (
    IGNORE_INDEX,
    VarlenMetadata,
    metadata_from_mask,
    metadata_from_packed,
    pack,
    unpack,
)

logger = logging.getLogger("seqpack")

_RECORD = "_seqpack_record"
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
# Class-name parts of layers that carry state along the sequence (case-sensitive CamelCase parts,
# so "GptOssMLP" is not an "SSM").
_SEQUENCE_MIXERS = re.compile(
    r"Mamba|SSM|Ssm(?![a-z])|Rwkv|RWKV|Recurrent|DeltaNet|LinearAttention|ShortConv|Lightning"
)

# Types that look packable to every generic check below and are not; each with the reason.
_EXCEPTIONS: dict[str, str] = {
    "blt": "its byte-level local encoder/decoder call their attention without the packing metadata",
    "doge": "its attention builds a content-dependent dynamic mask, which the varlen kernels do not apply",
}


class UnsupportedModelError(ValueError):
    """Raised by ``patch`` for a model that cannot be packed exactly."""


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


# --------------------------------------------------------------------------- inspection


def _text_config(model: nn.Module):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def _decoder_layers(base: nn.Module, n_layers: int | None) -> nn.ModuleList | None:
    get_decoder = getattr(base, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if isinstance(decoder, nn.Module):
        base = decoder  # a multimodal model: its language model, not its vision tower
    for module in base.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (n_layers is None or len(module) == n_layers)
        ):
            return module
    return None


def _source(fn) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""


def _call_drops_kwargs(fn, is_target) -> bool:
    """Whether ``fn`` calls something matching ``is_target`` without passing ``**kwargs`` on.

    Packing metadata reaches attention only through ``**kwargs``; a call that lists its arguments
    one by one drops it. Unknown (no source, no such call) counts as not dropping; the attention
    function still catches it at the first forward.
    """
    try:
        tree = ast.parse(_source(fn))
    except SyntaxError:
        return False
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and is_target(n.func)]
    return bool(calls) and not any(k.arg is None for c in calls for k in c.keywords)


def _drops_kwargs(base: nn.Module, layers: nn.ModuleList) -> str | None:
    owner, layers_name = base, None
    for module in base.modules():
        layers_name = next((n for n, m in module.named_children() if m is layers), None)
        if layers_name is not None:
            owner = module
            break
    base = owner  # the module whose forward loops over the decoder layers
    loop_vars = set()
    try:
        tree = ast.parse(_source(type(base).forward))
    except SyntaxError:
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and layers_name:
            if f"self.{layers_name}" in ast.unparse(node.iter):
                loop_vars.add(node.target.id)
    if loop_vars and _call_drops_kwargs(
        type(base).forward, lambda f: isinstance(f, ast.Name) and f.id in loop_vars
    ):
        return f"{type(base).__name__}.forward calls its decoder layers without **kwargs"
    layer = layers[0]
    for name, child in layer.named_children():
        if any(_uses_attention_interface(m) for m in child.modules()):

            def is_attn(f, name=name):
                return isinstance(f, ast.Attribute) and f.attr == name and ast.unparse(f.value) == "self"

            if _call_drops_kwargs(type(layer).forward, is_attn):
                return f"{type(layer).__name__}.forward calls self.{name} without **kwargs"
    return None


def _uses_attention_interface(module: nn.Module) -> bool:
    return _calls_attention_interface(type(module))


@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    return "ALL_ATTENTION_FUNCTIONS" in _source(cls.forward)


def _takes_var_kwargs(fn) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return (
        name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        or name.endswith(("ForCausalLM", "LMHeadModel"))
    ) and model.get_output_embeddings() is not None


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be packed exactly, or None if it can."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    if model_type in _EXCEPTIONS:
        return _EXCEPTIONS[model_type]
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; seqpack packs decoder-only (causal) models"
    text_config = _text_config(model)
    if getattr(text_config, "is_causal", True) is False:
        return "its config sets is_causal=False (bidirectional attention)"
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    if layer_types - _ATTENTION_LAYER_TYPES:
        return (
            f"it has {sorted(layer_types - _ATTENTION_LAYER_TYPES)} layers; packing separates sequences "
            "only in full or sliding-window attention"
        )
    if getattr(text_config, "attention_chunk_size", None):
        return "it uses chunked attention, which the varlen kernels do not compute"
    base = _base_model(model)
    layers = _decoder_layers(base, getattr(text_config, "num_hidden_layers", None))
    if layers is None:
        return "no decoder layer stack was found"
    attn_modules = []
    for i, layer in enumerate(layers):
        found = [m for m in layer.modules() if _uses_attention_interface(m)]
        if not found:
            return (
                f"decoder layer {i} ({type(layer).__name__}) has no attention through transformers' "
                "attention interface (its attention is built in, or the layer is recurrent/SSM/convolutional)"
            )
        attn_modules += found
    dropped = _drops_kwargs(base, layers)
    if dropped:
        return f"{dropped}, so the packing metadata cannot reach attention"
    for module in base.modules():
        if "create_position_ids_from_input_ids" in _source(type(module).forward):
            return (
                f"{type(module).__name__} derives absolute positions from the padding "
                "(RoBERTa-style, starting at padding_idx + 1), which packing would shift"
            )
    for module in attn_modules:
        if getattr(module, "is_causal", True) is False:
            return f"{type(module).__name__} is bidirectional (is_causal=False)"
    for name, module in layers.named_modules():
        if isinstance(module, nn.Conv1d) or _SEQUENCE_MIXERS.search(type(module).__name__):
            return (
                f"{type(module).__name__} ({name}) mixes tokens along the sequence outside attention "
                "(a convolution or recurrent state), which would leak across packed sequences"
            )
    forward = type(base).forward
    if "position_ids" not in inspect.signature(forward).parameters:
        return (
            f"{type(base).__name__}.forward takes no position_ids, so positions cannot restart per sequence"
        )
    if not _takes_var_kwargs(forward):
        return (
            f"{type(base).__name__}.forward takes no **kwargs, so the packing metadata cannot reach attention"
        )
    if not _takes_var_kwargs(type(model).forward):
        return f"{type(model).__name__}.forward takes no **kwargs, so the packing metadata cannot reach attention"
    return None


def _private_configs(model: nn.Module) -> list:
    """Give the model config objects of its own before patch() changes them.

    ``from_config`` and friends may hand one config object to several models (a policy and its
    reference, say); naming seqpack's attention in a shared config would reroute the other,
    unpatched model too. Returns (module, previous config) pairs so unpatch can put them back.
    """
    old_top = model.config
    new_top = copy.deepcopy(old_top)
    mapping = {id(old_top): new_top}
    for key in getattr(old_top, "sub_configs", {}) or {}:
        old_sub, new_sub = getattr(old_top, key, None), getattr(new_top, key, None)
        if old_sub is not None and new_sub is not None:
            mapping[id(old_sub)] = new_sub
    swapped = []
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in mapping:
            swapped.append((module, config))
            module.config = mapping[id(config)]
    return swapped


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None and type(model).__module__.startswith("peft"):
        return get_base()
    return model


# --------------------------------------------------------------------------- public API


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch`` has been applied to this model (or to the model inside its PEFT wrapper)."""
    return hasattr(_unwrap(model), _RECORD)


def patch(
    model: nn.Module,
    *,
    backend: str = "auto",
    compile: bool = True,
    keep_logits: bool = False,
    memory_budget: float | None = None,
    strict: bool = True,
) -> nn.Module:
    """Make a transformers model train padding-free on ordinary padded batches.

    Args:
        model: a ``PreTrainedModel`` (any head, or the bare base model), or a PEFT model.
        backend: ``"auto"`` (best available, logged once), ``"fa3"``, ``"flash_attn"``, ``"torch"``
            or ``"reference"``. A named backend that is not available raises ImportError with a hint.
        compile: compile each decoder layer in place (one graph for every batch shape).
        keep_logits: a causal LM in training with labels computes its loss without materialising
            the (tokens x vocab) logits and returns ``logits=None`` (when its head is a plain
            linear layer); pass True when your training code reads the logits anyway, e.g. a
            token-accuracy metric of your own. TRL >= 1.0 computes its metrics without them.
        memory_budget: activation-memory budget in [0, 1] for the compiled layers (recompute
            instead of store below 1.0); None leaves torch's default. Needs ``compile=True``.
        strict: raise ``UnsupportedModelError`` for a model that cannot be packed exactly;
            with ``strict=False`` warn and return the model untouched.

    Returns:
        The same model object, patched in place.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")  # doctest: +SKIP
        >>> patch(model)  # doctest: +SKIP
    """
    target = _unwrap(model)
    if hasattr(target, _RECORD):
        record = getattr(target, _RECORD)
        if backend not in ("auto", record.backend):
            raise ValueError(
                f"model is already patched with backend {record.backend!r}; "
                f"call seqpack.unpatch(model) before patching with {backend!r}"
            )
        return model
    if not hasattr(target, "config"):
        raise TypeError(f"seqpack.patch expects a transformers PreTrainedModel, got {type(model).__name__}")
    if memory_budget is not None and not compile:
        raise ValueError("memory_budget applies to seqpack's compiled layers: pass compile=True with it.")
    model_type = getattr(target.config, "model_type", type(target).__name__)
    reason = unsupported_reason(target)
    if reason is not None:
        message = (
            f"seqpack cannot pack model_type {model_type!r} ({type(target).__name__}) exactly: {reason}."
        )
        if strict:
            raise UnsupportedModelError(message)
        warnings.warn(message + " The model is left unpatched.", stacklevel=2)
        return model
    chosen = attention.resolve_backend(backend)
    attention.register()
    record = _Record(
        backend=chosen,
        fused_loss=not keep_logits and fusable_head(target),
        memory_budget=memory_budget,
    )
    record.config_owners = _private_configs(target)
    base, causal_lm = _base_model(target), _is_causal_lm(target)
    for module in base.modules():
        if _uses_attention_interface(module) and hasattr(module, "config"):
            setattr(module, attention.PLAN_ATTR, attention.plan(chosen, module.config._attn_implementation))
            record.attention_modules.append(module)
    configs = {id(m.config): m.config for m in record.attention_modules}
    base_config = base.config  # mask creation in the base model reads this one
    configs.setdefault(id(base_config), base_config)
    for config in configs.values():
        record.configs.append((config, config._attn_implementation))
        config._attn_implementation_internal = attention.ATTN_NAME
    if compile:
        if not compiling.can_compile():
            raise RuntimeError("compile=True needs torch.compile; pass compile=False.")
        text_config = _text_config(target)
        layers = _decoder_layers(base, getattr(text_config, "num_hidden_layers", None))
        record.compiled = compiling.compile_layers(layers)
    # The backbone is always wrapped, so whoever calls it (a head, TRL's fused LM head) gets
    # packing. A causal LM's own forward is wrapped too, so its LM head and loss run on real tokens
    # only, unless a framework already replaced it on the instance: then that forward is left to
    # call the backbone with the padded batch it expects.
    if base is target:  # no separate backbone module (or the bare base model itself)
        _wrap(target, record, head=causal_lm)
    else:
        _wrap(base, record, head=False)
        if causal_lm and "forward" not in target.__dict__:
            _wrap(target, record, head=True)
    setattr(target, _RECORD, record)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the original forward and attention implementation, exactly."""
    target = _unwrap(model)
    record = target.__dict__.pop(_RECORD, None)
    if record is None:
        return model
    for module in record.wrapped:
        _unwrap_forward(module)
    for config, impl in record.configs:
        config._attn_implementation_internal = impl
    for module, config in record.config_owners:
        module.config = config
    for module in record.attention_modules:
        module.__dict__.pop(attention.PLAN_ATTR, None)
    compiling.uncompile(record.compiled)
    return model


# --------------------------------------------------------------------------- the wrapped forward

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
