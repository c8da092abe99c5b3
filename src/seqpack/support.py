"""Which models seqpack can pack exactly, and why not.

Decided by looking at the model: its config, layer types, modules, forward signatures and call
sites; ``_EXCEPTIONS`` holds the few types that pass those checks and are still wrong, each found
by tests/test_sweep.py. Two questions are answered by reading what the model really computes:
- ``mask_patterns``: which causal pattern (full, or a sliding window of W tokens) each decoder
  layer's attention mask describes, read from the model's own mask code in a probe forward. Some
  models apply their window only through the mask and never tell the attention function;
- ``fused_loss_blocker``: whether a causal LM's logits are exactly its output embedding applied to
  the last hidden state, so that the fused loss computes the same function.
Imports nothing of seqpack.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# Layer types whose attention packing cannot separate: it picks or pools keys by content, or in
# fixed chunks, across whatever is in the sequence.
_UNPACKABLE_LAYER_TYPES = {
    "chunked_attention": "chunked attention, which the varlen kernels do not compute",
    "indexed_attention": "indexed sparse attention (its indexer picks keys across the whole sequence)",
    "compressed_sparse_attention": "compressed sparse attention (keys pooled across the sequence)",
    "heavily_compressed_attention": "compressed sparse attention (keys pooled across the sequence)",
    "qwen_sparse_attention": "sparse attention with an indexer that picks keys across the sequence",
    "deepseek_sparse_attention": "indexed sparse attention (its indexer picks keys across the whole sequence)",
}
# Class-name parts of modules that pick or pool keys by content across the sequence (DeepSeek's
# sparse-attention indexer, compressed attention): whatever the layer type is called.
_KEY_SELECTORS = re.compile(r"Indexer|Compressor")
# Class-name parts of modules that carry state along the sequence outside attention: the sequence
# mixers (mixers.py). Case-sensitive CamelCase parts, so "GptOssMLP" is not an "SSM".
_SEQUENCE_MIXERS = re.compile(
    r"Mamba|SSM|Ssm(?![a-z])|Rwkv|RWKV|Recurrent|DeltaNet|DeltaAttention|LinearAttention|ShortConv|"
    r"ShortConvolution|Lightning|LSTM"
)
# Class-name parts of attention written into the layer, not through transformers' interface.
_BUILT_IN_ATTENTION = re.compile(r"Attention|Attn")

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


def language_model(base: nn.Module) -> nn.Module | None:
    """The language model inside a multimodal backbone (``get_decoder()``), or None for a text model."""
    get_decoder = getattr(base, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return decoder if any(m is decoder for m in base.modules()) else None


# Inputs of vision, video and audio towers, or their precomputed features and grids (by prefix): a
# call with any of them computes its multimodal positions and merge from the padded rows.
MEDIA_INPUTS = (
    "pixel_values", "input_features", "audio_values", "video_values", "images", "videos",
    "mm_encoder_outputs", "image_embeds", "image_features", "video_embeds", "audio_embeds",
    "image_grid_thw", "video_grid_thw",
)  # fmt: skip


def takes_media(module: nn.Module) -> bool:
    """Whether the module's forward takes image, video or audio inputs."""
    return any(name.startswith(MEDIA_INPUTS) for name in inspect.signature(type(module).forward).parameters)


def _decoder_layers(base: nn.Module, n_layers: int | None) -> nn.ModuleList | None:
    decoder = language_model(base)
    if decoder is not None:
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
        if isinstance(node, ast.For) and layers_name and f"self.{layers_name}" in ast.unparse(node.iter):
            # for layer in self.layers / for i, layer in enumerate(self.layers)
            loop_vars.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
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


def has_attention(layer: nn.Module) -> bool:
    """Whether a decoder layer attends through transformers' attention interface."""
    return any(_uses_attention_interface(m) for m in layer.modules())


def _uses_attention_interface(module: nn.Module) -> bool:
    return _calls_attention_interface(type(module))


@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    return "ALL_ATTENTION_FUNCTIONS" in _source(cls.forward)


def _takes_var_kwargs(fn) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# --------------------------------------------------------------------------- mixer kernels


def _kernel_choice(fn) -> dict | None:
    """For a function transformers wrapped with ``use_kernel_func_from_hub_with_fallback``, what it
    resolved to when its model file was imported: ``{"kernel": bool, "params": (name, ...)}``,
    whether it runs the package's kernel (flash-linear-attention, causal-conv1d, mamba-ssm) or the
    PyTorch fallback, and the parameters the call is filtered to. None for any other object."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None or "is_new_implementation" not in code.co_freevars:
        return None
    cells = dict(zip(code.co_freevars, closure, strict=True))
    try:
        return {
            "kernel": bool(cells["is_new_implementation"].cell_contents),
            "params": tuple(cells["applicable_params"].cell_contents),
        }
    except (KeyError, ValueError):  # an empty cell: a wrapper of another shape
        return None


def _is_none(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


@functools.cache
def mixer_reads_packing(cls: type) -> bool:
    """Whether a sequence mixer keeps packed sequences apart by itself, given the packing metadata.

    True where its forward takes ``**kwargs`` (or ``seq_idx``) and every kernel it calls resolved to the package's
    kernel (not the PyTorch fallback, which ignores the metadata), and each one it calls outside
    a cached decode step (``*update*``) accepts the metadata (``cu_seqlens`` or ``seq_idx``) and is
    handed it at the call site (``cu_seqlens=`` / ``seq_idx=``, or ``**kwargs``). Qwen3.5's Gated
    DeltaNet with flash-linear-attention and causal-conv1d installed is such a mixer; with either
    missing it is not, and runs on the rows layout instead (mixers.py).
    """
    forward = inspect.unwrap(cls.forward)
    if not (_takes_var_kwargs(forward) or "seq_idx" in inspect.signature(forward).parameters):
        return False  # no way in for the metadata
    try:
        tree = ast.parse(_source(forward))
    except SyntaxError:
        return False
    names = getattr(forward, "__globals__", {})
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            choice = _kernel_choice(names.get(node.func.id))
            if choice is not None:
                calls.append((node, choice))
    if not calls or not all(choice["kernel"] for _, choice in calls):
        return False
    for node, choice in calls:
        if "update" in node.func.id:  # the one-token step of cached generation, never in training
            continue
        given = {k.arg for k in node.keywords if not _is_none(k.value)}  # seq_idx=None hands nothing
        handed = ("cu_seqlens" in given and "cu_seqlens" in choice["params"]) or (
            ("seq_idx" in given or None in given) and "seq_idx" in choice["params"]
        )
        if not handed:
            return False
    return True


def _is_causal_lm(model: nn.Module) -> bool:
    """A causal LM, text-only or one that reads images too (image-text-to-text)."""
    from transformers.models.auto import modeling_auto

    names = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    names |= set(getattr(modeling_auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}).values())
    name = type(model).__name__
    return (name in names or name.endswith(("ForCausalLM", "LMHeadModel"))) and (
        model.get_output_embeddings() is not None
    )


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _own_name(cls: type) -> str:
    """A class name without its model's prefix: RecurrentGemmaMlp -> Mlp, Qwen3_5GatedDeltaNet ->
    GatedDeltaNet (read from the modeling module's name), so a model called "Recurrent..." does not
    make every one of its modules look like a recurrence."""
    module = cls.__module__.rsplit(".", 1)[-1]
    if not module.startswith("modeling_"):
        return cls.__name__
    parts = module.removeprefix("modeling_").split("_")
    prefix = "_?".join(re.escape(part) for part in parts)
    return re.sub(f"^{prefix}", "", cls.__name__, flags=re.IGNORECASE) or cls.__name__


def _mixes_tokens(module: nn.Module) -> bool:
    """A sequence mixer: named like one, or holding a convolution along the sequence itself."""
    if _SEQUENCE_MIXERS.search(_own_name(type(module))):
        return True
    return any(isinstance(child, nn.Conv1d) for child in module.children())


def sequence_mixers(layers: nn.ModuleList) -> list | str:
    """The sequence mixers of the decoder layers, or why a layer cannot be packed.

    Returns:
        (decoder layer, mixer module, whether its caller passes ``**kwargs`` to it) triples: the
        outermost mixing module under each layer that is not an attention-interface module. Or a
        reason (str): a convolution or recurrence inside an attention module, or attention built
        into a layer instead of going through transformers' interface.
    """
    found = []
    for index, layer in enumerate(layers):
        attention = [m for m in layer.modules() if _uses_attention_interface(m)]
        inside_attention = {id(m) for a in attention for m in a.modules()}
        layer_mixers = []

        def visit(
            parent: nn.Module, layer=layer, attention=attention, inside=inside_attention, found=layer_mixers
        ):
            for name, child in parent.named_children():
                if id(child) in inside:  # an attention module: a convolution inside it is not packed
                    mixing = [m for m in child.modules() if isinstance(m, nn.Conv1d)]
                    if mixing:
                        return (
                            f"a convolution mixes tokens inside the attention module {type(child).__name__}, "
                            "where packing cannot separate sequences"
                        )
                    continue
                if _mixes_tokens(child) and child is not layer:
                    forward = type(parent).forward
                    passes = not _call_drops_kwargs(forward, lambda f, n=name: _is_self_attr(f, n))
                    found.append((layer, child, passes and _takes_var_kwargs(type(child).forward)))
                    continue
                why = visit(child)
                if why:
                    return why
            return None

        why = visit(layer)
        if why:
            return f"decoder layer {index} ({type(layer).__name__}): {why}"
        if not attention and not layer_mixers:
            built_in = [m for m in layer.modules() if _BUILT_IN_ATTENTION.search(type(m).__name__)]
            if built_in:
                return (
                    f"decoder layer {index} ({type(layer).__name__}) has no attention through transformers' "
                    f"attention interface ({type(built_in[0]).__name__} is built in)"
                )
        found += layer_mixers
    return found


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be packed exactly, or None if it can."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    if model_type in _EXCEPTIONS:
        return _EXCEPTIONS[model_type]
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; seqpack packs decoder-only (causal) models"
    if type(model).__name__.endswith("ForQuestionAnswering"):
        # Its span loss is a softmax over every column, padding included: the padding positions'
        # own logits take part, and a packed backbone has no hidden states there.
        return "a question-answering head's span loss reads the padding positions too"
    text_config = _text_config(model)
    if getattr(text_config, "is_causal", True) is False:
        return "its config sets is_causal=False (bidirectional attention)"
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    for layer_type in sorted(layer_types & set(_UNPACKABLE_LAYER_TYPES)):
        return f"it has {layer_type} layers: {_UNPACKABLE_LAYER_TYPES[layer_type]}"
    if getattr(text_config, "attention_chunk_size", None):
        return "it uses chunked attention, which the varlen kernels do not compute"
    base = _base_model(model)
    layers = _decoder_layers(base, getattr(text_config, "num_hidden_layers", None))
    if layers is None:
        return "no decoder layer stack was found"
    attn_modules = [m for m in layers.modules() if _uses_attention_interface(m)]
    selector = next((m for m in layers.modules() if _KEY_SELECTORS.search(type(m).__name__)), None)
    if selector is not None:
        return f"{type(selector).__name__} picks or pools attention keys by content across the whole sequence"
    mixers = sequence_mixers(layers)
    if isinstance(mixers, str):
        return mixers
    # No attention, only sequence mixers (Mamba, Mamba-2): the metadata reaches the mixers by
    # handover from the packed forward (mixers.PackedRows), so dropped kwargs do not matter.
    handover = not attn_modules and bool(mixers)
    dropped = None if handover else _drops_kwargs(base, layers)
    if dropped:
        return f"{dropped}, so the packing metadata cannot reach attention or the sequence mixers"
    for module in base.modules():
        if "create_position_ids_from_input_ids" in _source(type(module).forward):
            return (
                f"{type(module).__name__} derives absolute positions from the padding "
                "(RoBERTa-style, starting at padding_idx + 1), which packing would shift"
            )
    for module in attn_modules:
        if getattr(module, "is_causal", True) is False:
            return f"{type(module).__name__} is bidirectional (is_causal=False)"
    forward = type(base).forward
    if attn_modules and "position_ids" not in inspect.signature(forward).parameters:
        return (
            f"{type(base).__name__}.forward takes no position_ids, so positions cannot restart per sequence"
        )
    if handover:
        return None
    if not _takes_var_kwargs(forward):
        return (
            f"{type(base).__name__}.forward takes no **kwargs, so the packing metadata cannot reach attention"
        )
    if not _takes_var_kwargs(type(model).forward):
        return f"{type(model).__name__}.forward takes no **kwargs, so the packing metadata cannot reach attention"
    name = next((n for n, m in model.named_children() if m is base), None)
    if name is not None and _call_drops_kwargs(type(model).forward, lambda f: _is_self_attr(f, name)):
        return (
            f"{type(model).__name__}.forward calls self.{name} without **kwargs, so the packing metadata "
            "cannot reach attention or the sequence mixers"
        )
    return None


# --------------------------------------------------------------------------- the mask each layer gets

_PROBE = "seqpack_probe"  # the mask-interface name the probe forward runs under
_FAR = 1 << 20  # a query position far beyond any window, to read a mask function's pattern at


@dataclass(frozen=True)
class MaskPattern:
    """A causal attention pattern: each query sees itself and the ``window - 1`` tokens before it
    (``window=None``: every earlier token), as transformers' ``sliding_window`` means it."""

    window: int | None


def _decode(mask_function, length: int) -> MaskPattern | str:
    """Read a transformers mask function (batch, head, q, kv) -> bool as a pattern, or say why not.

    Evaluated at a few far-apart query positions: a causal sliding window is the same at every
    one; a chunked, prefix or bidirectional pattern is not. A mask function that indexes per-token
    tensors of the probe (its token types, say) is read on the probe's own ``length`` tokens instead.
    """
    zero = torch.tensor(0)

    def sees(q: int, kv: int) -> bool:
        return bool(mask_function(zero, zero, torch.tensor(q), torch.tensor(kv)))

    def window_at(q: int) -> int | None:
        if sees(q, 0):
            return None
        lo, hi = 1, q  # sees(q, q - lo) holds, sees(q, q - hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if sees(q, q - mid) else (lo, mid)
        return hi

    try:
        queries = (_FAR, _FAR // 3 + 7)
        if any(not sees(q, q) or sees(q, q + 1) for q in queries):
            return _NOT_CAUSAL
        windows = {window_at(q) for q in queries}
        window = windows.pop() if len(windows) == 1 else -1
        if window is not None and (
            window == -1 or any(not sees(q, q - window + 1) for q in (window, 3 * window))
        ):
            return _NOT_ONE_WINDOW
        return MaskPattern(window)
    except IndexError:
        pass
    try:
        pos = torch.arange(length)
        seen = mask_function(zero, zero, pos[:, None], pos[None, :]).expand(length, length).cpu()
    except Exception as err:  # noqa: BLE001 -- a mask function seqpack cannot evaluate
        return f"its attention mask could not be read ({type(err).__name__}: {err})"
    distance = pos[:, None] - pos[None, :]  # (length, length) q - kv
    for window in (None, *range(1, length)):
        if torch.equal(seen, (distance >= 0) & (distance < (window or length))):
            return MaskPattern(window)
    return _NOT_CAUSAL if (seen & (distance < 0)).any() else _NOT_ONE_WINDOW


_NOT_CAUSAL = "its attention mask is not causal (a token sees later tokens, or not itself)"
_NOT_ONE_WINDOW = (
    "its attention mask is neither full causal nor one sliding window (chunked or prefix attention)"
)


def _probe_mask(*, mask_function, kv_length: int, **_):
    """The mask interface the probe forward runs under: reads the pattern, returns a marker."""
    marker = torch.zeros(1, 1, 1, 1, dtype=torch.bool)  # a tensor, for model code that looks at it
    _probe_markers[marker.data_ptr()] = (marker, _decode(mask_function, kv_length))
    return marker


_probe_markers: dict = {}


def _found_pattern(values) -> MaskPattern | str | None:
    for value in values:
        if isinstance(value, dict):
            value = next(iter(value.values()), None)
        if isinstance(value, torch.Tensor) and value.data_ptr() in _probe_markers:
            return _probe_markers[value.data_ptr()][1]
    return None


def mask_patterns(
    base: nn.Module, layers: nn.ModuleList, ones: tuple[str, ...] = ()
) -> list[MaskPattern | str | None] | None:
    """The pattern of the attention mask each decoder layer receives, from the model's own code.

    One probe forward of the backbone on a few tokens (twice the configured sliding window, so a
    mask read on the probe's own tokens shows its window), with every decoder layer replaced by the
    identity: the mask code runs exactly as the model wrote it (which creator, which window, for
    which layer type), under a mask interface that reads each mask function instead of building
    a mask. Costs microseconds of model time; nothing of the model is changed after it.

    Args:
        ones: inputs of the backbone to pass as all ones (``token_type_ids``: does marking every
            token an image token change the mask?).

    Returns:
        One entry per layer: a ``MaskPattern``, a reason (str) when the mask is no causal pattern,
        or None when no mask reached that layer (the model makes none, or passes it on changed).
        None as a whole when the model cannot run here yet (meta tensors) or the probe failed.
    """
    from transformers import AttentionMaskInterface

    embeddings = base.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        return None
    AttentionMaskInterface.register(_PROBE, _probe_mask)
    configs = {id(c): c for m in base.modules() if _is_config(c := m.__dict__.get("config"))}
    saved_impl = {key: c._attn_implementation_internal for key, c in configs.items()}
    saved_modes = [(m, m.training) for m in base.modules()]
    unset = object()
    found: list = [unset] * len(layers)

    def stub(index):
        def forward(*args, **kwargs):
            found[index] = _found_pattern([*args, *kwargs.values()])
            return args[0] if args else kwargs["hidden_states"]

        return forward

    saved_calls = [(layer, layer.__dict__.get("forward"), layer._compiled_call_impl) for layer in layers]
    try:
        for config in configs.values():
            config._attn_implementation_internal = _PROBE
        for index, layer in enumerate(layers):
            layer.forward = stub(index)
            layer._compiled_call_impl = None
        base.eval()
        window = getattr(_config_of(base), "sliding_window", None)
        length = 2 * window + 8 if isinstance(window, int) else 8
        tokens = torch.full((1, length), min(3, embeddings.num_embeddings - 1), device=weight.device)
        extra = {name: torch.ones_like(tokens) for name in ones}
        with torch.no_grad():
            type(base).forward(base, input_ids=tokens, use_cache=False, **extra)
    except Exception:  # noqa: BLE001 -- a backbone that needs more inputs: fall back to the kwargs
        return None
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved_impl[key]
        for layer, forward, compiled in saved_calls:
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
            layer._compiled_call_impl = compiled
        for module, mode in saved_modes:
            module.training = mode
        _probe_markers.clear()
    # A layer past config.num_hidden_layers (lowered below the stack: transformers runs
    # layers[:num_hidden_layers]) computes nothing; any plan serves it, and a config edit that
    # brings it back reads the masks again. Any other layer the probe did not reach stays unknown.
    depth = getattr(_config_of(base), "num_hidden_layers", None)
    depth = depth if isinstance(depth, int) else len(layers)
    return [
        (MaskPattern(None) if index >= depth else None) if pattern is unset else pattern
        for index, pattern in enumerate(found)
    ]


def _config_of(base: nn.Module):
    config = base.config
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def _is_config(value) -> bool:
    return hasattr(value, "_attn_implementation_internal") and hasattr(value, "to_dict")


# --------------------------------------------------------------------------- the fused loss

# Words in a causal LM's forward that mean its logits are not the plain head output, or that
# another loss joins the cross-entropy.
_UNFUSABLE_WORDS = ("softcap", "logit_scale", "logits_scaling", "aux_loss", "router", "temperature", "mtp")


def _is_self_attr(node, name: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == name and ast.unparse(node.value) == "self"


def _is_keep_slice(node) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) == "slice_logits_to_keep" and bool(node.args)


def _is_last_hidden(node) -> bool:
    """``outputs.last_hidden_state``, ``outputs[0]`` (either, by ``return_dict``), or a logits_to_keep slice."""
    if isinstance(node, ast.Attribute):
        return node.attr == "last_hidden_state" and isinstance(node.value, ast.Name)
    if isinstance(node, ast.Subscript):
        index = node.slice
        return isinstance(node.value, ast.Name) and isinstance(index, ast.Constant) and index.value == 0
    if isinstance(node, ast.IfExp):
        return _is_last_hidden(node.body) and _is_last_hidden(node.orelse)
    return _is_keep_slice(node) and _is_last_hidden(node.args[0])


def _is_slice_of(node, name: str) -> bool:
    """``name`` itself, or a logits_to_keep slice of it (``h[:, slice_indices, :]``)."""
    if isinstance(node, ast.Name):
        return node.id == name
    if isinstance(node, ast.Subscript):
        return isinstance(node.value, ast.Name) and node.value.id == name
    return _is_keep_slice(node) and _is_slice_of(node.args[0], name)


def _is_router_gate(node) -> bool:
    """``if output_router_logits: ...`` with no else: a mixture-of-experts model's aux loss."""
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "output_router_logits" and not node.orelse


class _WithoutRouterLoss(ast.NodeTransformer):
    """The forward as it runs when no router logits are asked for: the gated aux-loss block gone,
    and the output's ``aux_loss=`` / ``router_logits=`` fields (None, or the backbone's) with it."""

    def visit_If(self, node):
        return None if _is_router_gate(node) else self.generic_visit(node)

    def visit_Assign(self, node):  # ``aux_loss = None`` before the gate
        names = [ast.unparse(t) for t in node.targets]
        is_none = isinstance(node.value, ast.Constant) and node.value.value is None
        return None if names == ["aux_loss"] and is_none else self.generic_visit(node)

    def visit_Call(self, node):
        node.keywords = [k for k in node.keywords if k.arg not in ("aux_loss", "router_logits")]
        return self.generic_visit(node)


# Where a forward reads its logit cap: the model's config or its text config (forward.py checks
# both are None before such a gate is read as absent). A cap read from anything else stays.
_CAP_READS = {
    "self.config.final_logit_softcapping",
    "self.config.get_text_config().final_logit_softcapping",
    "self.config.text_config.final_logit_softcapping",
}


def _is_softcap_gate(node) -> bool:
    """``if self.config.final_logit_softcapping is not None: ...`` with no else (Gemma's capped
    logits; gemma3n reads it through a walrus): a block that never runs when that value is None."""
    test = node.test if isinstance(node, ast.If) else None
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.IsNot)
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value is None
        and not node.orelse
    ):
        return False
    read = test.left.value if isinstance(test.left, ast.NamedExpr) else test.left
    return ast.unparse(read) in _CAP_READS


class LogitCap(NamedTuple):
    """A forward's logit cap in transformers' form, which the fused loss computes itself:

        if <read> is not None:
            logits = logits / cap      # or logits.float() / cap (``upcast``: Beam's)
            logits = torch.tanh(logits)
            logits = logits * cap

    ``read``: where the cap comes from, one of ``_CAP_READS`` (forward.py reads it per call).
    """

    read: str
    upcast: bool


def _standard_cap(node) -> LogitCap | None:
    """The LogitCap of a softcap gate whose body is exactly the three lines above, else None."""
    if not _is_softcap_gate(node) or len(node.body) != 3:
        return None
    if not all(isinstance(n, ast.Assign) and len(n.targets) == 1 for n in node.body):
        return None
    left = node.test.left
    read = ast.unparse(left.value if isinstance(left, ast.NamedExpr) else left)
    caps = {read, left.target.id} if isinstance(left, ast.NamedExpr) else {read}  # a walrus: its name too
    names = {ast.unparse(n.targets[0]) for n in node.body}
    divide, tanh, scale = (n.value for n in node.body)
    if len(names) != 1 or not all(isinstance(v, ast.BinOp) for v in (divide, scale)):
        return None
    (name,) = names
    numerator = ast.unparse(divide.left)
    if (
        isinstance(divide.op, ast.Div)
        and numerator in (name, f"{name}.float()")
        and ast.unparse(divide.right) in caps
        and ast.unparse(tanh) == f"torch.tanh({name})"
        and isinstance(scale.op, ast.Mult)
        and ast.unparse(scale.left) == name
        and ast.unparse(scale.right) in caps
    ):
        return LogitCap(read, upcast=numerator != name)
    return None


def _head_output_cap(tree, head: str) -> tuple[ast.If, LogitCap] | None:
    """The forward's softcap gate and its LogitCap, when it is the forward's only one, in the
    standard form, right after ``name = self.<head>(...)`` and on that name; else None (the fused
    loss then cannot tell where the cap applies)."""
    gates = [n for n in ast.walk(tree) if _is_softcap_gate(n)]
    cap = _standard_cap(gates[0]) if len(gates) == 1 else None
    if cap is None:
        return None
    (gate,) = gates
    name = ast.unparse(gate.body[0].targets[0])
    blocks = (
        getattr(node, field, None) for node in ast.walk(tree) for field in ("body", "orelse", "finalbody")
    )
    for block in (b for b in blocks if isinstance(b, list)):
        for before, statement in zip(block, block[1:], strict=False):  # consecutive statements
            if (
                statement is gate
                and isinstance(before, ast.Assign)
                and len(before.targets) == 1
                and ast.unparse(before.targets[0]) == name
                and isinstance(before.value, ast.Call)
                and _is_self_attr(before.value.func, head)
            ):
                return gate, cap
    return None


@functools.cache
def logit_cap(cls: type, head: str) -> LogitCap | None:
    """The cap ``cls.forward`` applies to its head's logits in transformers' gated form, or None.
    Read from the same source as ``fused_loss_blocker`` reads, so both find the same gate."""
    source = _trained_source(cls)
    found = _head_output_cap(ast.parse(source), head) if source else None
    return found[1] if found else None


class _WithoutPassedOn(ast.NodeTransformer):
    """The forward without the backbone's router logits passed on to the output it returns
    (``return ...(router_logits=outputs.router_logits)``: Gemma 4's), which add no loss."""

    def visit_Return(self, node):
        if isinstance(node.value, ast.Call):
            node.value.keywords = [k for k in node.value.keywords if not _is_passed_on(k)]
        return node


def _is_passed_on(keyword) -> bool:
    value = keyword.value
    return (
        keyword.arg == "router_logits"
        and isinstance(value, ast.Attribute)
        and value.attr == "router_logits"
        and isinstance(value.value, ast.Name)
    )


class _WithoutSoftcap(ast.NodeTransformer):
    """The forward without its gated capping: every such block when ``final_logit_softcapping`` is
    None (it never runs), else only ``gate``, the standard one on the head's output (the fused
    loss applies it)."""

    def __init__(self, gate: ast.If | None = None):
        self.gate = gate

    def visit_If(self, node):
        if node is self.gate or (self.gate is None and _is_softcap_gate(node)):
            return None
        return self.generic_visit(node)


@functools.cache
def router_loss_gated(cls: type) -> bool:
    """Whether ``cls.forward`` adds a router (load-balancing) loss only ``if output_router_logits``:
    then the fused loss is exact exactly when a call does not ask for router logits."""
    source = _source(cls.forward)
    return bool(source) and any(_is_router_gate(n) for n in ast.walk(ast.parse(source)))


@functools.cache
def _trained_source(cls: type) -> str | None:
    """``cls.forward``'s source as the fused loss would replace it: a router loss gated on
    ``output_router_logits`` read as absent (a call that asks for router logits is not fused)."""
    source = _source(cls.forward)
    if source and router_loss_gated(cls):
        source = ast.unparse(_WithoutRouterLoss().visit(ast.parse(source)))
    return source


@functools.cache
def fused_loss_blocker(cls: type, head: str, uncapped: bool = False) -> str | None:
    """Why ``cls.forward`` is not exactly ``self.loss_function(self.<head>(last hidden state))``.

    Read from the forward's source as data flow: ``self.<head>`` is called once, on the backbone's
    last hidden state (``outputs.last_hidden_state``, ``outputs[0]``, or a ``logits_to_keep`` slice),
    its result is assigned once and never changed, and that is what ``self.loss_function`` gets.
    A head wrapped in another module (ModernBERT-decoder's ``self.decoder(self.lm_head(h))``),
    scaled or capped logits, scaled hidden states and extra losses all fail it. None: fusable.
    A router loss gated on ``output_router_logits`` is read as absent (``router_loss_gated``): a
    call that asks for router logits keeps the model's own loss (forward.py checks that).
    ``uncapped``: the model's ``final_logit_softcapping`` is None, so a capping block gated on it
    (Gemma 3's) is read as absent too; with a cap set, only a block in transformers' standard form
    (``logit_cap``, which the fused loss then applies) is.
    """
    source = _trained_source(cls)
    if not source:
        return "its forward has no readable source"
    tree = ast.parse(source)
    capped = None if uncapped else _head_output_cap(tree, head)
    if uncapped or capped:
        tree = _WithoutSoftcap(capped[0] if capped else None).visit(tree)
    source = ast.unparse(_WithoutPassedOn().visit(tree))
    # the flag itself (a parameter, passed on to the backbone) is no router loss
    words = [w for w in _UNFUSABLE_WORDS if w in source.replace("output_router_logits", "")]
    if words:
        return f"its forward mentions {words[0]!r} (scaled or capped logits, or another loss)"
    tree = ast.parse(source)
    assigned: dict = {}
    changed: set = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else ():
            if isinstance(target, ast.Name):
                if isinstance(node, ast.AugAssign):
                    changed.add(target.id)
                elif node.value is not None:
                    assigned.setdefault(target.id, []).append(node.value)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_self_attr(n.func, head)]
    if len(calls) != 1:
        return f"its forward calls self.{head} {len(calls)} times"
    call = calls[0]

    def is_head_output(value) -> bool:  # the call itself, or .float() / .contiguous() of it
        if value is call:
            return True
        return (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr in ("float", "contiguous")
            and not value.args
            and value.func.value is call
        )

    logits = [name for name, values in assigned.items() if any(is_head_output(v) for v in values)]
    if len(logits) != 1 or len(assigned[logits[0]]) != 1 or logits[0] in changed:
        return f"the output of self.{head} is transformed before the loss"
    if len(call.args) != 1 or call.keywords:
        return f"self.{head} is called with more than the hidden states"
    arg = call.args[0]
    hidden = next((n.id for n in ast.walk(arg) if isinstance(n, ast.Name)), None)
    values = assigned.get(hidden, [])
    if (
        hidden is None
        or hidden in changed
        or not _is_slice_of(arg, hidden)
        or not any(_is_last_hidden(v) for v in values)
        or not all(_is_last_hidden(v) or _is_slice_of(v, hidden) for v in values)
    ):
        return f"self.{head} is not applied to the backbone's last hidden state as it is"

    def is_loss_of_logits(node) -> bool:
        if not (isinstance(node, ast.Call) and _is_self_attr(node.func, "loss_function")):
            return False
        given = [k.value for k in node.keywords if k.arg == "logits"] or node.args[:1]
        return bool(given) and isinstance(given[0], ast.Name) and given[0].id == logits[0]

    if not any(is_loss_of_logits(n) for n in ast.walk(tree)):
        return "its loss is not self.loss_function(logits, labels, ...)"
    return None
