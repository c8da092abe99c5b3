"""Tiny random vision-language models and padded batches with images, built offline.

``vlm_case(model_type)`` returns a tiny ``AutoModelForImageTextToText`` model and a right-padded
batch of three rows as its processor would lay them out: row 0 holds one image, row 1 another of a
different size where the model takes several sizes (the same size otherwise), row 2 is text only.
Each image is a run of image-placeholder tokens (as many as the vision tower gives features,
read from the model itself), wrapped in the model's start/end tokens where it has them; labels are
-100 at padding and image tokens. The language model is the generic tiny one (tiny_models.py);
``VISION`` shrinks each vision tower, the part the generic names miss.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from tiny_models import HIDDEN, tiny_config

IMAGE, START, END, VIDEO = 250, 251, 252, 253  # special token ids inside the tiny vocabulary (256)
TEXT_VOCAB = 200  # ordinary tokens are drawn below the special ones

_CLIP = dict(
    hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)  # fmt: skip
_QWEN3 = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
    deepstack_visual_indexes=[0], num_position_embeddings=64,
)  # fmt: skip
_IDEFICS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)

VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=2),
    "qwen2_5_vl": dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        fullatt_block_indexes=[1],
        window_size=56,
    ),  # fmt: skip
    "qwen3_vl": _QWEN3,
    "qwen3_vl_moe": _QWEN3,
    "llava": _CLIP,
    "llava_next": _CLIP,
    "mistral3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        image_size=64,
        patch_size=8,
    ),  # fmt: skip
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "gemma3": dict(_IDEFICS, vision_use_head=False),
}

# The image sizes of rows 0 and 1, in pixels (H, W); qwen's are in patches of the vision tower.
_SIZES = {
    "qwen2_vl": [(4, 4), (4, 6)],
    "qwen2_5_vl": [(4, 4), (4, 6)],
    "qwen3_vl": [(4, 4), (4, 6)],
    "qwen3_vl_moe": [(4, 4), (4, 6)],
    "llava_next": [(32, 32), (32, 64)],
    "mistral3": [(32, 32), (32, 48)],
}

VLM_TYPES = sorted(VISION)


def tiny_vlm_config(model_type: str):
    config = tiny_config(model_type)
    for key, value in VISION[model_type].items():
        setattr(config.vision_config, key, value)
    text = config.get_text_config(decoder=True)
    for name in ("image_token_id", "image_token_index"):
        if hasattr(config, name):
            setattr(config, name, IMAGE)
    for name, value in (
        ("vision_start_token_id", START), ("vision_end_token_id", END), ("video_token_id", VIDEO),
        ("boi_token_index", START), ("eoi_token_index", END),
    ):  # fmt: skip
        if hasattr(config, name):
            setattr(config, name, value)
    if model_type == "llava_next":
        config.image_grid_pinpoints = [[32, 32], [32, 64], [64, 32]]
    if model_type == "gemma3":
        config.mm_tokens_per_image = 4
    if model_type.startswith("qwen"):  # mRoPE: a section per axis (t, h, w), summing to head_dim / 2
        text.rope_parameters = dict(text.rope_parameters or {}, mrope_section=[2, 3, 3])
    if model_type in ("llava", "llava_next", "mistral3"):
        config.vision_feature_layer = -1
    if model_type in ("idefics3", "smolvlm"):
        config.scale_factor = 2
    text.vocab_size = max(text.vocab_size, 256)
    return config


def _media(model_type: str, config, images: list[int | None], seed: int) -> dict:
    """The vision inputs of a batch whose row r holds image ``images[r]`` (0, 1) or none (None).

    Image i's pixels are the same in every batch it appears in (a generator seeded by i), so a row
    run alone sees what it saw in the batch.
    """
    v = config.vision_config
    shown = [i for i in images if i is not None]

    def randn(i, *shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 10 + i))

    if not shown:
        return {}
    if model_type.startswith("qwen"):
        grids = [_SIZES[model_type][i] for i in shown]
        width = v.in_channels * v.temporal_patch_size * v.patch_size**2  # one temporal patch per image
        pixels = torch.cat([randn(i, h * w, width) for i, (h, w) in zip(shown, grids, strict=True)])
        return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}
    if model_type == "llava_next":  # anyres: the base image and its tiles, (image_size)^2 each
        pixels = torch.stack([randn(i, 3, 3, v.image_size, v.image_size) for i in shown])
        return {"pixel_values": pixels, "image_sizes": torch.tensor([_SIZES[model_type][i] for i in shown])}
    if model_type == "mistral3":  # one tensor padded to the largest image, and each image's size
        sizes = [_SIZES[model_type][i] for i in shown]
        pixels = torch.zeros(len(shown), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for k, (i, (h, w)) in enumerate(zip(shown, sizes, strict=True)):
            pixels[k, :, :h, :w] = randn(i, 3, h, w)
        return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
    if model_type in ("idefics3", "smolvlm"):  # (B, images per row, C, H, W); zeros: no image
        pixels = torch.zeros(len(images), 1, 3, v.image_size, v.image_size)
        for row, i in enumerate(images):
            if i is not None:
                pixels[row, 0] = randn(i, 3, v.image_size, v.image_size)
        return {
            "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(len(images), 1, 32, 32, dtype=torch.bool),
        }
    return {"pixel_values": torch.stack([randn(i, 3, v.image_size, v.image_size) for i in shown])}


def _features_per_image(model, media: dict) -> list[int]:
    """How many image tokens each image fills, asked of the model's own vision tower."""
    with torch.no_grad():
        out = model.model.get_image_features(**media)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, torch.Tensor):
        feats = list(feats) if feats.ndim == 3 else [feats]
    counts = [f.shape[-2] if f.ndim >= 2 else f.shape[0] for f in feats]
    return counts


class VlmCase(NamedTuple):
    model: torch.nn.Module  # train mode, fp32
    batch: dict  # right-padded (B, L) inputs with the vision inputs and labels
    rows: list[dict]  # each row alone, unpadded, with its own image (or none)


def vlm_case(model_type: str, seed: int = 0, lengths=(5, 4, 13), left: bool = False) -> VlmCase:
    """A tiny VLM and a padded batch: rows 0 and 1 with an image each, row 2 text only.

    ``lengths``: the text tokens of each row around its image (the image's tokens come on top).
    """
    from transformers import AutoModelForImageTextToText

    config = tiny_vlm_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).train()
    images = [0, 1, None]
    counts = _features_per_image(model, _media(model_type, config, [0, 1], seed))
    wrap = hasattr(config, "vision_start_token_id") or hasattr(config, "boi_token_index")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, n_text in zip(images, lengths, strict=True):
        text = torch.randint(3, TEXT_VOCAB, (n_text,), generator=gen).tolist()
        image = [] if i is None else ([START] if wrap else []) + [IMAGE] * counts[i] + ([END] if wrap else [])
        rows.append(text[:2] + image + text[2:])
    takes = inspect.signature(type(model).forward).parameters

    def inputs(token_rows, width, row_images):
        ids = torch.zeros(len(token_rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(token_rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[r, span] = torch.tensor(row)
            mask[r, span] = 1
        out = dict(
            input_ids=ids,
            attention_mask=mask,
            labels=ids.masked_fill((mask == 0) | (ids >= TEXT_VOCAB), -100),
        )
        out.update(_media(model_type, config, row_images, seed))
        if "mm_token_type_ids" in takes:
            out["mm_token_type_ids"] = (ids == IMAGE).int()
        if model_type == "gemma3":  # image tokens see each other (the processor's token types)
            out["token_type_ids"] = (ids == IMAGE).long()
        return out

    batch = inputs(rows, max(len(r) for r in rows), images)
    alone = []
    for row, i in zip(rows, images, strict=True):
        one = inputs([row], len(row), [i])
        one.pop("attention_mask")
        alone.append(one)
    return VlmCase(model, batch, alone)


def tiny_image_text_model(model_type: str, run):
    """A tiny ``AutoModelForImageTextToText`` of any type (train mode), checked by ``run(model)``.

    mRoPE models split each head's rotary dims into one section per axis; the generic tiny head
    dim leaves the published sections too wide, so a first run that says so is retried with
    sections that fit.
    """
    import re

    from transformers import AutoModelForImageTextToText

    config = tiny_vlm_config(model_type) if model_type in VISION else tiny_config(model_type)
    for attempt in range(2):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config).train()
        try:
            return model, run(model)
        except RuntimeError as err:
            found = re.search(r"split_sizes to sum exactly to (\d+)", str(err))
            if attempt or not found:
                raise
            n = int(found.group(1))
            text = config.get_text_config(decoder=True)
            text.rope_parameters = dict(
                text.rope_parameters or {}, mrope_section=[n - 2 * (n // 3), n // 3, n // 3]
            )
    raise AssertionError("unreachable")
