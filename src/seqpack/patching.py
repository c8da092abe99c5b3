"""patch() / unpatch(): what is changed, recorded and restored.

``patch(model)`` changes one instance and nothing else:
- its backbone's forward is wrapped (forward.py): padded inputs are packed into one (1, T)
  sequence, the original forward runs on it, and outputs are unpacked back to the padded layout.
  Whoever calls the backbone (a classification head, TRL's fused LM head) gets packing;
- a causal LM's own forward is wrapped as well, so its LM head and loss run on the packed real
  tokens only (a pre-packed call then passes through the backbone's wrapper untouched);
- each attention module, and each module inside the decoder layers, sees its config through a
  *view* (``_config_view``): the same attributes, shared, except that the attention
  implementation reads ``"seqpack"``. The model's own config objects are never changed at rest,
  so ``model.config._attn_implementation`` still names the original implementation, and a
  reference model that TRL builds from it, or any ``from_config`` copy, computes exactly as
  the unpatched model. Only while a packed forward runs do the configs name ``"seqpack"`` (so
  transformers builds no mask: forward.py);
- each attention module gets its ``LayerPlan`` (kernel, and the window its own mask gives it,
  read by support.mask_patterns); decoder layers are compiled in place.
Everything is recorded on the instance and undone by ``unpatch``, which keeps whatever the user
changed in the configs since. State-dict keys never change.
Which models can be packed at all is support.py's question.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

from torch import nn

from . import attention, mixers
from . import compile as compiling
from .forward import _Record, _unwrap_forward, _wrap, config_key, mask_reason, plan_attention
from .support import (
    UnsupportedModelError,
    _base_model,
    _decoder_layers,
    _is_causal_lm,
    _is_config,
    _text_config,
    _uses_attention_interface,
    language_model,
    mask_patterns,
    sequence_mixers,
    takes_media,
    unsupported_reason,
)

__all__ = ["UnsupportedModelError", "is_patched", "patch", "unpatch"]

_RECORD = "_seqpack_record"


# --------------------------------------------------------------------------- config views


@functools.cache
def _view_class(cls: type) -> type:
    """A subclass of a config class whose ``_attn_implementation`` reads ``"seqpack"``."""

    def read(self):
        return attention.ATTN_NAME

    def write(self, value):  # goes to the shared attributes, i.e. to the real config
        if value == attention.ATTN_NAME:
            return  # what the view reads already (transformers writing back what it read): the
            # real config keeps naming the original implementation
        cls._attn_implementation.fset(self, value)

    def read_internal(self):
        return self.__dict__.get("_attn_implementation_internal")

    def write_internal(self, value):  # transformers storing what it read through the view
        if value != attention.ATTN_NAME:
            self.__dict__["_attn_implementation_internal"] = value

    def reduce(self, protocol):  # deepcopy / pickle: a view of the copied real config
        return _config_view, (self._seqpack_real,)

    def shallow_copy(self):  # copy.copy: a config of its own, as a copy of the real one would be
        return copy.copy(self._seqpack_real)

    namespace = {
        "__slots__": ("_seqpack_real",),  # not in __dict__, which is the real config's
        "_attn_implementation": property(read, write),
        "_attn_implementation_internal": property(read_internal, write_internal),
        "__reduce_ex__": reduce,
        "__copy__": shallow_copy,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    return type(cls.__name__, (cls,), namespace)


def _config_view(config):
    """``config`` seen through a view: its very ``__dict__`` (edits on either side are shared)."""
    view = object.__new__(_view_class(type(config)))
    object.__setattr__(view, "__dict__", config.__dict__)
    object.__setattr__(view, "_seqpack_real", config)
    return view


def _real_config(config):
    return getattr(config, "_seqpack_real", config)


# --------------------------------------------------------------------------- what patch() changes


def _install_views(record: _Record, target: nn.Module, base: nn.Module, text_config) -> None:
    """Views for the modules inside the decoder layers; the configs the packed forward renames.

    Only the language model's configs are renamed while packing: a vision or audio tower keeps
    its own config and attention (its patches are not the text's padding).
    """
    configs = {id(c): c for c in (target.config, base.config, text_config)}
    for module in record.layers.modules():
        config = module.__dict__.get("config")
        if _is_config(config):
            configs[id(config)] = config
            module.__dict__["config"] = _config_view(config)
            record.views.append((module, config))
    record.configs = list(configs.values())


def _mask_inputs(base: nn.Module, layers: nn.ModuleList, patterns) -> tuple[str, ...]:
    """The backbone's inputs that change its attention mask: a call with them is not packed."""
    takes = inspect.signature(type(base).forward).parameters
    names = [n for n in ("token_type_ids", "mm_token_type_ids") if n in takes]
    return tuple(n for n in names if mask_patterns(base, layers, ones=(n,)) != patterns)


# --------------------------------------------------------------------------- public API


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a torch.compile and/or PEFT wrapper (or the model itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps it in an OptimizedModule
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
            the (tokens x vocab) logits and returns ``logits=None`` (when its logits are exactly
            its linear head applied to the last hidden state); pass True when your training code
            reads the logits anyway, e.g. a token-accuracy metric of your own. TRL >= 1.0
            computes its metrics without them.
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
        # Options asked for explicitly (not left at their default) that the first patch did not use.
        asked = {"keep_logits": keep_logits, "memory_budget": memory_budget, "compile": compile}
        default = {"keep_logits": False, "memory_budget": None, "compile": True}
        had = {
            "keep_logits": record.keep_logits,
            "memory_budget": record.memory_budget,
            "compile": bool(record.compiled),
        }
        changed = [k for k in asked if asked[k] != default[k] and asked[k] != had[k]]
        if backend not in ("auto", record.backend):
            changed.insert(0, "backend")
        if changed:
            raise ValueError(
                f"model is already patched (with {', '.join(f'{k}={had.get(k, record.backend)!r}' for k in changed)}); "
                "call seqpack.unpatch(model) before patching it with other options"
            )
        return model
    if not hasattr(target, "config"):
        raise TypeError(f"seqpack.patch expects a transformers PreTrainedModel, got {type(model).__name__}")
    if memory_budget is not None and not compile:
        raise ValueError("memory_budget applies to seqpack's compiled layers: pass compile=True with it.")
    model_type = getattr(target.config, "model_type", type(target).__name__)
    reason = unsupported_reason(target)
    base, text_config = _base_model(target), _text_config(target)
    layers = _decoder_layers(base, getattr(text_config, "num_hidden_layers", None))
    patterns = mask_patterns(base, layers) if reason is None else None
    reason = reason or mask_reason(patterns, layers, text_config)
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
    record = _Record(backend=chosen, keep_logits=keep_logits, memory_budget=memory_budget, layers=layers)
    record.attention_modules = [
        m for m in layers.modules() if _uses_attention_interface(m) and hasattr(m, "config")
    ]
    plan_attention(record, patterns)
    _install_views(record, target, base, text_config)
    record.mask_key = config_key(record.configs)
    if patterns is not None:
        record.mask_inputs = _mask_inputs(base, layers, patterns)
    # A model of mixers only gets the metadata to them by handover, whatever its kwargs do.
    record.mixers = mixers.wrap_mixers(sequence_mixers(layers), handover_all=not record.attention_modules)
    if compile:
        if not compiling.can_compile():
            raise RuntimeError("compile=True needs torch.compile; pass compile=False.")
        eager = mixers.eager_layers(record.mixers)  # their mixers get the metadata by handover
        record.compiled = compiling.compile_layers([layer for layer in layers if id(layer) not in eager])
    # The backbone is always wrapped, so whoever calls it (a head, TRL's fused LM head) gets
    # packing. A causal LM's own forward is wrapped too, so its LM head and loss run on real tokens
    # only, unless a framework already replaced it on the instance: then that forward is left to
    # call the backbone with the padded batch it expects.
    causal_lm = _is_causal_lm(target)
    if base is target:  # no separate backbone module (or the bare base model itself)
        _wrap(target, record, head=causal_lm)
    else:
        _wrap(base, record, head=False)
        if causal_lm and "forward" not in target.__dict__:
            _wrap(target, record, head=True)
    # A multimodal backbone takes images on the padded batch; its language model packs them.
    lm = language_model(base) if takes_media(base) else None
    if lm is not None and "forward" not in lm.__dict__:
        _wrap(lm, record, head=False, inner=True)
        record.language_model = lm
        if patterns is not None:
            record.language_mask_inputs = _mask_inputs(lm, layers, mask_patterns(lm, layers))
    setattr(target, _RECORD, record)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the original forwards, configs and layers, exactly.

    Nothing of the configs is restored from a copy: the views share their attributes with the
    real configs, so what was changed while patched (``resize_token_embeddings``, ``use_cache``)
    stays changed.
    """
    target = _unwrap(model)
    record = target.__dict__.pop(_RECORD, None)
    if record is None:
        return model
    for module in record.wrapped:
        _unwrap_forward(module)
    for module, config in record.views:
        module.__dict__["config"] = config
    for module in record.attention_modules:
        module.__dict__.pop(attention.PLAN_ATTR, None)
    mixers.unwrap(record.mixers)
    compiling.uncompile(record.compiled)
    return model
