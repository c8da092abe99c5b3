"""patch() / unpatch(): what is changed, recorded and restored.

``patch(model)`` changes one instance and nothing else:
- its backbone's forward is wrapped (forward.py): padded inputs are packed into one (1, T)
  sequence, the original forward runs on it, and outputs are unpacked back to the padded layout.
  Whoever calls the backbone (a classification head, TRL's fused LM head) gets packing;
- a causal LM's own forward is wrapped as well, so its LM head and loss run on the packed real
  tokens only (a pre-packed call then passes through the backbone's wrapper untouched);
- the model gets config objects of its own, which name the ``"seqpack"`` attention function;
  each attention module gets its ``LayerPlan``; decoder layers are compiled in place.
Everything is recorded on the instance and undone by ``unpatch``. State-dict keys never change.
Which models can be packed at all is support.py's question.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from . import attention
from . import compile as compiling
from .forward import _Record, _unwrap_forward, _wrap
from .loss import fusable_head
from .support import (
    UnsupportedModelError,
    _base_model,
    _decoder_layers,
    _is_causal_lm,
    _text_config,
    _uses_attention_interface,
    unsupported_reason,
)

__all__ = ["UnsupportedModelError", "is_patched", "patch", "unpatch"]

_RECORD = "_seqpack_record"


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
