"""Models to benchmark: published architectures with random weights, or the user's own.

A preset is the architecture half of a real model's ``config.json`` on the hub, embedded here so
the benchmark builds the model offline with random weights (``from_config``). Speed and memory
depend on shapes, not on weight values, and a random-init model's first loss is still a fair
check that two modes compute the same function. The values are the published ones, in the
published spelling (``rope_theta``, ``rope_scaling``), so transformers reads them exactly as it
would read the hub file. Anything else is a hub id or local path for ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Preset:
    """A model architecture by name: where its config was published, and its values."""

    name: str
    source: str
    config: dict = field(repr=False)


def _llama(**values) -> dict:
    base = dict(
        model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0
    )
    return base | values


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "seqpack: a CPU-sized Llama with the Mistral/Llama-2 32k vocab, so the default data fits as is",
            _llama(
                hidden_size=128,
                intermediate_size=352,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                vocab_size=32000,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        Preset(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            _llama(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                rope_scaling={
                    "factor": 32.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3",
                },
                vocab_size=128256,
                tie_word_embeddings=True,
                bos_token_id=128000,
                eos_token_id=128001,
            ),
        ),
        Preset(
            "llama-2-7b",
            "meta-llama/Llama-2-7b-hf",
            _llama(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                vocab_size=32000,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        Preset(
            "mistral-7b",
            "mistralai/Mistral-7B-v0.1",
            dict(
                model_type="mistral",
                hidden_act="silu",
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                max_position_embeddings=32768,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                sliding_window=4096,
                vocab_size=32000,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        Preset(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B",
            dict(
                model_type="qwen2",
                hidden_act="silu",
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                sliding_window=32768,
                use_sliding_window=False,
                max_window_layers=24,
                vocab_size=151936,
                tie_word_embeddings=True,
                bos_token_id=151643,
                eos_token_id=151643,
            ),
        ),
        Preset(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B",
            dict(
                model_type="qwen2",
                hidden_act="silu",
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=131072,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                sliding_window=131072,
                use_sliding_window=False,
                max_window_layers=28,
                vocab_size=152064,
                tie_word_embeddings=False,
                bos_token_id=151643,
                eos_token_id=151643,
            ),
        ),
        Preset(
            "gemma-2-2b",
            "google/gemma-2-2b",
            dict(
                model_type="gemma2",
                hidden_act="gelu_pytorch_tanh",
                hidden_activation="gelu_pytorch_tanh",
                hidden_size=2304,
                intermediate_size=9216,
                num_hidden_layers=26,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=256,
                query_pre_attn_scalar=256,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                sliding_window=4096,
                max_position_embeddings=8192,
                rms_norm_eps=1e-6,
                rope_theta=10000.0,
                attention_bias=False,
                attention_dropout=0.0,
                vocab_size=256000,
                tie_word_embeddings=True,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=1,
            ),
        ),
        Preset(
            "gemma-3-4b",
            "google/gemma-3-4b-it, its text_config (values the file leaves out: Gemma3TextConfig's defaults)",
            dict(
                model_type="gemma3_text",
                hidden_activation="gelu_pytorch_tanh",
                hidden_size=2560,
                intermediate_size=10240,
                num_hidden_layers=34,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=256,
                query_pre_attn_scalar=256,
                sliding_window=1024,
                sliding_window_pattern=6,
                rope_theta=1000000.0,
                rope_local_base_freq=10000.0,
                rope_scaling={"factor": 8.0, "rope_type": "linear"},
                max_position_embeddings=131072,
                rms_norm_eps=1e-6,
                attention_bias=False,
                vocab_size=262208,
                tie_word_embeddings=True,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=[1, 106],
            ),
        ),
        Preset(
            "qwen3-8b",
            "Qwen/Qwen3-8B",
            dict(
                model_type="qwen3",
                hidden_act="silu",
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                attention_bias=False,
                rms_norm_eps=1e-6,
                max_position_embeddings=40960,
                rope_theta=1000000,
                use_sliding_window=False,
                max_window_layers=36,
                vocab_size=151936,
                tie_word_embeddings=False,
                bos_token_id=151643,
                eos_token_id=151645,
            ),
        ),
        Preset(
            "qwen3-30b-a3b",
            "Qwen/Qwen3-30B-A3B",
            dict(
                model_type="qwen3_moe",
                hidden_act="silu",
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                router_aux_loss_coef=0.001,
                attention_bias=False,
                rms_norm_eps=1e-6,
                max_position_embeddings=40960,
                rope_theta=1000000.0,
                use_sliding_window=False,
                max_window_layers=48,
                vocab_size=151936,
                tie_word_embeddings=False,
                bos_token_id=151643,
                eos_token_id=151645,
            ),
        ),
        Preset(
            "gpt-oss-20b",
            "openai/gpt-oss-20b (unquantized: bf16 weights for training)",
            dict(
                model_type="gpt_oss",
                hidden_act="silu",
                hidden_size=2880,
                intermediate_size=2880,
                num_hidden_layers=24,
                num_attention_heads=64,
                num_key_value_heads=8,
                head_dim=64,
                attention_bias=True,
                swiglu_limit=7.0,
                num_local_experts=32,
                num_experts_per_tok=4,
                router_aux_loss_coef=0.9,
                rms_norm_eps=1e-5,
                max_position_embeddings=131072,
                initial_context_length=4096,
                rope_theta=150000,
                rope_scaling={
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "factor": 32.0,
                    "original_max_position_embeddings": 4096,
                    "rope_type": "yarn",
                    "truncate": False,
                },
                sliding_window=128,
                layer_types=["sliding_attention", "full_attention"] * 12,
                vocab_size=201088,
                tie_word_embeddings=False,
                eos_token_id=200002,
                pad_token_id=199999,
            ),
        ),
        Preset(
            "deepseek-v2-lite",
            "deepseek-ai/DeepSeek-V2-Lite-Chat (the architecture of DeepSeek-V2-Lite): MLA attention, MoE",
            dict(
                model_type="deepseek_v2",
                hidden_act="silu",
                hidden_size=2048,
                intermediate_size=10944,
                moe_intermediate_size=1408,
                num_hidden_layers=27,
                num_attention_heads=16,
                num_key_value_heads=16,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_nope_head_dim=128,
                qk_rope_head_dim=64,
                v_head_dim=128,
                n_routed_experts=64,
                n_shared_experts=2,
                num_experts_per_tok=6,
                first_k_dense_replace=1,
                moe_layer_freq=1,
                n_group=1,
                topk_group=1,
                topk_method="greedy",
                scoring_func="softmax",
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
                attention_bias=False,
                rms_norm_eps=1e-6,
                max_position_embeddings=163840,
                rope_theta=10000,
                rope_scaling={
                    "beta_fast": 32,
                    "beta_slow": 1,
                    "factor": 40,
                    "mscale": 0.707,
                    "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 4096,
                    "type": "yarn",
                },
                vocab_size=102400,
                tie_word_embeddings=False,
                bos_token_id=100000,
                eos_token_id=100001,
            ),
        ),
        Preset(
            "qwen3.5-4b",
            "Qwen/Qwen3.5-4B, its text_config as transformers 5.7 resolves it: a Gated DeltaNet hybrid, "
            "3 linear-attention layers to 1 full",
            dict(
                model_type="qwen3_5_text",
                hidden_act="silu",
                hidden_size=2560,
                intermediate_size=9216,
                num_hidden_layers=32,
                num_attention_heads=16,
                num_key_value_heads=4,
                head_dim=256,
                attn_output_gate=True,
                linear_num_key_heads=16,
                linear_num_value_heads=32,
                linear_key_head_dim=128,
                linear_value_head_dim=128,
                linear_conv_kernel_dim=4,
                full_attention_interval=4,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
                rope_parameters={
                    "mrope_interleaved": True,
                    "mrope_section": [11, 11, 10],
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 10000000,
                    "rope_type": "default",
                },
                max_position_embeddings=262144,
                rms_norm_eps=1e-6,
                vocab_size=248320,
                tie_word_embeddings=True,
                eos_token_id=248044,
            ),
        ),
        Preset(
            "qwen2.5-vl-7b",
            "Qwen/Qwen2.5-VL-7B-Instruct: the language model and its whole vision tower; the bench adds "
            "one synthetic image per example (bench/media.py)",
            dict(
                model_type="qwen2_5_vl",
                hidden_act="silu",
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                rms_norm_eps=1e-6,
                max_position_embeddings=128000,
                rope_theta=1000000.0,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                sliding_window=32768,
                use_sliding_window=False,
                max_window_layers=28,
                attention_dropout=0.0,
                vocab_size=152064,
                tie_word_embeddings=False,
                bos_token_id=151643,
                eos_token_id=151645,
                vision_start_token_id=151652,
                vision_end_token_id=151653,
                vision_token_id=151654,
                image_token_id=151655,
                video_token_id=151656,
                vision_config=dict(
                    depth=32,
                    hidden_act="silu",
                    hidden_size=1280,
                    intermediate_size=3420,
                    num_heads=16,
                    in_chans=3,
                    out_hidden_size=3584,
                    patch_size=14,
                    spatial_merge_size=2,
                    spatial_patch_size=14,
                    window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2,
                    temporal_patch_size=2,
                ),
            ),
        ),
        Preset(
            "nemotron-h-8b",
            "nvidia/Nemotron-H-8B-Base-8K (from NVIDIA Megatron-Bridge's copy of its config): Mamba-2 "
            "layers, 4 attention layers, MLPs",
            dict(
                model_type="nemotron_h",
                hidden_size=4096,
                intermediate_size=21504,
                num_hidden_layers=52,
                hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                num_attention_heads=32,
                num_key_value_heads=8,
                attention_head_dim=128,
                attention_bias=False,
                mlp_bias=False,
                mlp_hidden_act="relu2",
                mamba_num_heads=128,
                mamba_head_dim=64,
                ssm_state_size=128,
                n_groups=8,
                conv_kernel=4,
                expand=2,
                chunk_size=128,
                mamba_hidden_act="silu",
                mamba_proj_bias=False,
                use_conv_bias=True,
                use_bias=False,
                rms_norm_eps=1e-5,
                layer_norm_epsilon=1e-5,
                residual_in_fp32=False,
                rescale_prenorm_residual=True,
                max_position_embeddings=8192,
                vocab_size=131072,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        ),
    ]
}


def build_config(name: str, layers: int | None = None):
    """The transformers config of a preset (``PretrainedConfig``), at ``layers`` depth if given."""
    from transformers import AutoConfig

    values = dict(PRESETS[name].config)
    if layers is not None:
        values = _at_depth(values, layers)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _at_depth(values: dict, layers: int) -> dict:
    """The same architecture with its first ``layers`` decoder layers: widths unchanged, per-layer
    lists (``layer_types``, ...) cut to the new depth, so the layers kept are the published ones."""
    depth = values["num_hidden_layers"]
    if layers > depth:
        raise ValueError(f"--layers {layers}: the model has only {depth} decoder layers")
    # per-layer values: lists, and pattern strings of one letter a layer (Nemotron-H's)
    cut = {k: v[:layers] for k, v in values.items() if isinstance(v, list | str) and len(v) == depth}
    return values | cut | {"num_hidden_layers": layers}


def depth_label(name: str, layers: int | None) -> str:
    """The model's name in the table: '(6 of 24 layers)' when run at a reduced depth."""
    if layers is None:
        return name
    depth = PRESETS[name].config["num_hidden_layers"] if name in PRESETS else None
    return f"{name} ({layers} of {depth} layers)" if depth else f"{name} ({layers} layers)"


def load_model(
    name: str,
    *,
    attn_implementation: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    random_init: bool,
    layers: int | None = None,
) -> torch.nn.Module:
    """A fresh model in train mode: a preset or hub id / path with random weights, or pretrained.

    Random weights are drawn under ``torch.manual_seed(seed)`` directly on ``device``, so every
    mode gets the same initial weights, and a 7B model is not first built on the CPU. A model
    without sdpa support (gpt-oss, gemma-2 on recent transformers) asked for "sdpa" gets its own
    default attention instead, one without flex_attention gets sdpa; the table names what it got.
    ``layers``: build at that depth (random weights only). A vision-language config is built as
    an image-text-to-text model, vision tower included.
    """
    if name in PRESETS or random_init:
        config = model_config(name, layers)
        auto = _auto_class(config)
        attn_implementation = _supported(auto, config, attn_implementation)
        torch.manual_seed(seed)
        with device:
            model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    else:
        if layers is not None:
            raise ValueError("--layers builds a model from its config: add --random-init")
        config = model_config(name)
        auto = _auto_class(config)
        model = auto.from_pretrained(
            name, dtype=dtype, attn_implementation=_supported(auto, config, attn_implementation)
        )
        model.to(device)
    return model.train()


def model_config(name: str, layers: int | None = None):
    """A preset's config, or a hub id's / path's (``from_pretrained``), at ``layers`` depth."""
    if name in PRESETS:
        return build_config(name, layers)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    if layers is not None:
        config.get_text_config().num_hidden_layers = layers
    return config


def _auto_class(config):
    """AutoModelForImageTextToText for a vision-language config, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if getattr(config, "vision_config", None) is not None:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


# attn_implementation -> the class flag transformers sets where a model supports it
_SUPPORT_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


def _supported(auto, config, attn_implementation: str | None) -> str | None:
    """``attn_implementation`` if the model's class supports it, else "sdpa" if that, else None
    (the model's own default: eager for gpt-oss)."""
    cls = auto._model_mapping.get(type(config), None)
    for choice in (attn_implementation, "sdpa"):
        flag = _SUPPORT_FLAGS.get(choice)
        if cls is None or flag is None or getattr(cls, flag, True):
            return choice
    return None


def vocab_size(name: str) -> int:
    """The vocab size of a model, without building it."""
    if name in PRESETS:
        return PRESETS[name].config["vocab_size"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    return getattr(config.get_text_config(), "vocab_size", None) or config.vocab_size
