"""Which models seqpack can pack exactly, and why not.

Decided by looking at the model: its config, layer types, modules, forward signatures and call
sites. ``_EXCEPTIONS`` holds the few types that pass those checks and are still wrong, each found
by tests/test_sweep.py. Imports nothing of seqpack.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap

from torch import nn

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
