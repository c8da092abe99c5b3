"""Tiny random causal-LM models for every architecture transformers knows, built offline.

Tests parametrize over `causal_lm_types()` and build each model with `build_tiny_model`, so the
whole set must build and run a short forward in well under two minutes on a laptop CPU. The
shrinking is generic: a table of attribute names that mean "width", "depth", "heads", "experts" and
so on is applied wherever the default config has that attribute, and per-layer lists
(`layer_types`, `mlp_layer_types`, ...) are cut down to one layer of each kind, in order. A small
table of per-type overrides handles the real exceptions, and `UNBUILDABLE` names the types that no
tiny config can make run a text-only forward, with the reason, so callers can skip them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 64
VOCAB = 256
MAX_POSITIONS = 512
EXPERTS = 4
TOP_K = 2
SLIDING_WINDOW = 8

# Attribute name -> tiny value, applied wherever the default config has the attribute.
_SHRINK = {
    # width
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "emb_dim": HIDDEN,
    "embedding_size": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "input_embedding_size": HIDDEN,
    "output_embedding_size": HIDDEN,
    "hidden_size_global": HIDDEN,
    "hidden_size_per_layer_input": 16,
    "vision_output_dim": HIDDEN,
    "projector_input_dim": HIDDEN,
    "projector_output_dim": HIDDEN,
    "out_hidden_size": HIDDEN,
    "mlp_dim": INTERMEDIATE,
    # depth
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "num_decoder_layers": 2,
    "num_blocks": 2,
    "num_encoder_layers": 2,
    # heads
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "attention_heads": HEADS,
    "num_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "num_decoder_attention_heads": HEADS,
    "num_encoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_kv_heads": KV_HEADS,
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": KV_HEADS,
    "swa_head_dim": HEAD_DIM,
    "head_dim": HEAD_DIM,
    "attention_head_size": HEAD_DIM,
    "d_head": HEAD_DIM,
    "dim_head": HEAD_DIM,
    # feed-forward
    "intermediate_size": INTERMEDIATE,
    "ffn_dim": INTERMEDIATE,
    "decoder_ffn_dim": INTERMEDIATE,
    "encoder_ffn_dim": INTERMEDIATE,
    "n_inner": INTERMEDIATE,
    "d_ff": INTERMEDIATE,
    "dff": INTERMEDIATE,
    "dim_ff": INTERMEDIATE,
    "d_inner": INTERMEDIATE,
    "ffn_hidden_size": INTERMEDIATE,
    "feed_forward_size": INTERMEDIATE,
    "intermediate_size_mlp": INTERMEDIATE,
    "dense_intermediate_size": INTERMEDIATE,
    # vocabulary and positions
    "vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "unpadded_vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "n_positions": MAX_POSITIONS,
    "n_ctx": MAX_POSITIONS,
    "max_target_positions": MAX_POSITIONS,
    "max_seq_len": MAX_POSITIONS,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    # mixture of experts
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "num_experts_per_token": TOP_K,
    "moe_k": TOP_K,
    "moe_topk": TOP_K,
    "moe_top_k": TOP_K,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "moe_intermediate_size": INTERMEDIATE // 2,
    "shared_expert_intermediate_size": INTERMEDIATE // 2,
    "shared_experts_intermediate_size": INTERMEDIATE // 2,
    "shared_intermediate_size": INTERMEDIATE // 2,
    "moe_shared_expert_intermediate_size": INTERMEDIATE // 2,
    "expert_ffn_hidden_size": INTERMEDIATE // 2,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "first_k_dense_replace": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "zero_expert_num": 2,
    "router_jitter_noise": 0.0,
    "input_jitter_noise": 0.0,
    # multi-head latent attention and sparse indexers
    "q_lora_rank": 32,
    "o_lora_rank": 32,
    "hc_lowrank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": HEAD_DIM,
    "qk_rope_head_dim": 8,
    "qk_head_dim": HEAD_DIM + 8,
    "v_head_dim": HEAD_DIM,
    "index_n_heads": 2,
    "index_head_dim": HEAD_DIM,
    "index_topk": 8,
    # linear attention and state-space layers
    "linear_num_key_heads": 2,
    "linear_num_value_heads": HEADS,
    "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM,
    "linear_num_heads": HEADS,
    "linear_head_dim": HEAD_DIM,
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_d_state": 8,
    "mamba_d_head": HEAD_DIM,
    "mamba_head_dim": HEAD_DIM,
    "mamba_headdim": HEAD_DIM,
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "n_mamba_heads": 8,
    "mamba_n_groups": 1,
    "mamba_ngroups": 1,
    "n_groups": 1,
    "mamba_expand": 2,
    "expand": 2,
    "time_step_rank": 8,
    "mamba_dt_rank": 8,
    "mamba_d_ssm": 2 * HIDDEN,
    "rotary_dim": HEAD_DIM // 2,
    # sliding windows, small so ~20-token tests cross the window
    "sliding_window": SLIDING_WINDOW,
    "sliding_window_size": SLIDING_WINDOW,
    "attention_window_size": SLIDING_WINDOW,
    "local_attention_window_len": SLIDING_WINDOW,
    "attention_chunk_size": SLIDING_WINDOW,
    "keep_window_size": SLIDING_WINDOW,
}

# Attributes set even where the default is None (None means "derive it", or is a bug).
_SET_IF_NONE = ("head_dim", "num_key_value_heads", "pad_token_id")

# Per-layer attributes whose values are layer indices (not one entry per layer).
_LAYER_INDEX_LISTS = ("full_attn_idxs", "no_rope_layers", "moe_layers", "hybrid_layer_ids", "ple_layer_ids")

_LINEAR_THEN_FULL = ["linear_attention", "full_attention"]

# Per-type overrides, applied after the generic shrink; only where the generic path is wrong.
_OVERRIDES: dict[str, dict] = {
    # All-mamba by default; put one attention layer in so the tiny model has both kinds.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": _LINEAR_THEN_FULL},
    # Attention every 2nd layer (and MoE every 2nd), so 2 layers hold both kinds.
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    # Block pattern is (recurrent, recurrent, attention): 3 layers reach the attention block.
    "recurrent_gemma": {"num_hidden_layers": 3},
    # Shipped LFM2 defaults are all-attention (lfm2) or None, which the model indexes (lfm2_moe);
    # real checkpoints interleave short-conv layers, so keep one of each.
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # Shared-transformer tying needs two hybrid layers to tie.
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # Input, recurrent (looped) and output stacks must sum to num_hidden_layers.
    "dory": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "n_input_layers": 1,
        "n_recurrent_layers": 1,
        "n_output_layers": 1,
    },
    # Shipped default has no RoPE entry per layer type; M-RoPE sections must sum to head_dim / 2.
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]}
        }
    },
    # Shipped attention config lacks rope_theta, and clip_qkv=None breaks the clamp in forward.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # Sliding layers need head_dim == qk_nope_head_dim + qk_rope_head_dim.
    "dots3_note_text": {"head_dim": HEAD_DIM + 8},
    # Shipped defaults leave the routing counts None, which routing cannot use.
    "deepseek_v2": {"num_experts_per_tok": TOP_K},
    # JetMoE names its per-head width kv_channels.
    "jetmoe": {"kv_channels": HEAD_DIM},
    "dots1": {"n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K, "n_shared_experts": 1},
    # Mamba2 checks num_heads * head_dim == expand * hidden_size.
    "mamba2": {"num_heads": 8},
    # ZAYA supports top-1 routing only.
    "zaya": {"num_experts_per_tok": 1},
    # ReformerModelWithLMHead requires is_decoder; axial position shapes must match the tiny sizes.
    "reformer": {
        "is_decoder": True,
        "attn_layers": ["local", "lsh"],
        "axial_pos_shape": [16, 32],
        "axial_pos_embds_dim": [16, 48],
    },
    # X-MOD routes through per-language adapters and needs a language; XLM is bidirectional unless causal.
    "xmod": {"default_language": "en_XX"},
    "xlm": {"causal": True},
    # qk_dim_factor != 1 breaks the native chunkwise kernel on sequences shorter than a chunk.
    "xlstm": {"embedding_dim": HIDDEN, "qk_dim_factor": 1.0},
    # RoCBert's glyph and pronunciation embedding tables are the bulk of the model otherwise.
    "roc_bert": {
        "pronunciation_embed_dim": 16,
        "pronunciation_vocab_size": 64,
        "shape_embed_dim": 16,
        "shape_vocab_size": 64,
    },
    # Audio and vision towers: the parts the generic names miss.
    "phi4_multimodal_audio": {
        "ext_pw_out_channel": HIDDEN,
        "depthwise_separable_out_channel": HIDDEN,
        "nemo_conv_channels": HIDDEN,
    },
    "got_ocr2_vision": {"output_channels": 32},
    "dots3_note_vision_encoder": {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN},
    "dots3_note_audio_encoder": {"adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN},
    # The hash-embedding tables default to 500k rows each; the cache builder needs `num_hidden_layers`,
    # which the composite BltConfig lacks, so the tiny model runs cache-free.
    "blt": {"encoder_hash_byte_group_vocab": 64, "use_cache": False},
    # KV-shared layers must reuse a kind that an earlier layer produces; 4 layers keep both kinds.
    "gemma3n_text": {"num_kv_shared_layers": 2},
    # Indexed-attention layers need the QSA indexer configured; the shipped default leaves it unset.
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": HEAD_DIM,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    },
}

# Types for which no tiny config runs a text-only forward; value is the reason (for pytest.skip).
UNBUILDABLE: dict[str, str] = {
    "gemma3n": "vision tower is a TimmWrapperModel: needs the timm and pillow packages",
    "gemma4_assistant": "speculative-decoding drafter: forward needs the target model's shared_kv_states "
    "and inputs_embeds (and the shipped default config does not validate)",
    "gemma4_unified_assistant": "speculative-decoding drafter: every layer reuses the target model's KV "
    "(shared_kv_states); no standalone text forward",
    "musicgen": "audio-codebook decoder: input_ids are (batch * num_codebooks, seq) and AutoModelForCausalLM "
    "rejects the composite MusicgenConfig",
    "musicgen_melody": "audio-codebook decoder: input_ids are (batch * num_codebooks, seq) and "
    "AutoModelForCausalLM rejects the composite MusicgenMelodyConfig",
}


def causal_lm_types() -> list[str]:
    """Every `model_type` with an `AutoModelForCausalLM` mapping in the installed transformers.

    Returns:
        Sorted list of model_type strings, e.g. `["afmoe", "apertus", ..., "zamba2"]`.
    """
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_DEPTH_NAMES = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


def _per_layer_overrides(config: PretrainedConfig) -> dict:
    """Cut every per-layer list down to the first layer of each distinct kind, keeping order.

    A layer's "kind" is the tuple of its entries across all per-layer lists, so a hybrid with
    attention/mamba mixers and dense/MoE MLPs keeps one layer of each combination it uses.
    """
    values = config.to_dict()
    n = next((values[name] for name in _DEPTH_NAMES if isinstance(values.get(name), int)), None)
    if not n:
        return {}
    lists = {
        name: value
        for name, value in values.items()
        if (isinstance(value, list) or (isinstance(value, str) and "pattern" in name))
        and len(value) == n
        and n > 1
        and name not in _LAYER_INDEX_LISTS
    }
    lists = {name: value for name, value in lists.items() if name not in _SHRINK}
    if not lists:
        return {}
    kinds = list(zip(*lists.values(), strict=True))
    keep: list[int] = []
    seen: set = set()
    for i, kind in enumerate(kinds):
        key = repr(kind)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < 2:
        keep = sorted(set(keep) | {1})
    out = {}
    for name, value in lists.items():
        picked = [value[i] for i in keep]
        out[name] = "".join(picked) if isinstance(value, str) else picked
    for name in _DEPTH_NAMES:
        if name in values:
            out[name] = len(keep)
    if isinstance(values.get("per_layer_config"), dict):
        # Heterogeneous configs: per-layer deltas keyed by layer index, so re-key and shrink them.
        per_layer = {int(i): delta for i, delta in values["per_layer_config"].items()}
        out["per_layer_config"] = {
            new: _shrink_layer_delta(per_layer[old], mla="kv_lora_rank" in values)
            for new, old in enumerate(keep)
            if old in per_layer
        }
    return out


def _shrink_layer_delta(delta: dict, *, mla: bool) -> dict:
    out = {name: _SHRINK.get(name, value) for name, value in delta.items()}
    if "head_dim" in delta:
        # Wider than the other layers, as the real per-layer override is.
        out["head_dim"] = 2 * HEAD_DIM
    if mla and "num_key_value_heads" in delta:
        out["num_key_value_heads"] = out.get("num_attention_heads", HEADS)
    return out


def _shrink_overrides(config: PretrainedConfig, *, top_level: bool = True) -> dict:
    """Keyword overrides that make `config` tiny, sub-configs included (as dicts)."""
    present = config.to_dict()
    out: dict = {}
    for name, value in _SHRINK.items():
        # Only serialized fields: properties and attribute_map aliases are derived from them.
        if name not in present or isinstance(getattr(type(config), name, None), property):
            continue
        current = present[name]
        if isinstance(current, bool) or (current is None and name not in _SET_IF_NONE):
            continue
        out[name] = value
    if present.get("kv_lora_rank"):
        # Multi-head latent attention: keys/values are expanded to every head from one latent, and
        # `head_dim` names the rotary part of each query/key head.
        if "num_key_value_heads" in present:
            out["num_key_value_heads"] = out.get("num_attention_heads", present.get("num_attention_heads"))
        if "head_dim" in present:
            out["head_dim"] = out.get("qk_rope_head_dim", present.get("qk_rope_head_dim"))
    for name, value in present.items():
        lowered = name.lower()
        if isinstance(value, float) and (
            "dropout" in lowered or "pdrop" in lowered or "layerdrop" in lowered
        ):
            out[name] = 0.0
    if top_level and present.get("is_decoder") is False:
        # Encoder families (BERT, RoBERTa, ...) are causal LMs only as decoders; otherwise their
        # *ForCausalLM attends bidirectionally.
        out["is_decoder"] = True
    out.update(_per_layer_overrides(config))
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            # Only the sub-config's non-default fields: older releases reject bookkeeping keys.
            kept = {
                k: v
                for k, v in sub.to_diff_dict().items()
                if not k.startswith("_") and k != "transformers_version"
            }
            out[name] = {**kept, **_shrink_overrides(sub, top_level=False)}
    for name, value in _OVERRIDES.get(config.model_type, {}).items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **value}  # a sub-config: amend it, keep the shrunk rest
        else:
            out[name] = value
    return out


def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny random config for `model_type`: hidden 64, 2 layers, 4 heads (2 kv), vocab 256.

    Args:
        model_type: a key of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, e.g. `"llama"`.

    Returns:
        The config, with every dropout 0.0, pad_token_id 0 where the config has one, 4 experts
        with top-2 routing for MoE, and sliding windows of 8 tokens.

    Example:
        >>> tiny_config("llama").hidden_size
        64
    """
    default = AutoConfig.for_model(model_type)
    return AutoConfig.for_model(model_type, **_shrink_overrides(default))


def build_tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build a seeded tiny `AutoModelForCausalLM` for `model_type` in eval mode, without downloads.

    Eager attention is requested so the unpatched model is a plain reference; types that reject
    it fall back to their default implementation.

    Args:
        model_type: a key of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, e.g. `"qwen3"`.
        seed: seed for the random weights.
        dtype: parameter dtype.

    Returns:
        The model, in eval mode, on CPU.

    Example:
        >>> model = build_tiny_model("llama")
        >>> model(torch.ones(1, 5, dtype=torch.long)).logits.shape
        torch.Size([1, 5, 256])
    """
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    except ValueError:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
