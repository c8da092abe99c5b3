"""Synthetic images for a vision-language model: the same text batches, one image per example.

A Qwen-VL-style model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: a ``vision_config`` with
``spatial_merge_size`` and ``temporal_patch_size``) takes an image as ``pixel_values`` patches, its
``image_grid_thw`` and a run of image placeholder tokens in ``input_ids`` (one per merged patch,
between the vision start and end tokens). The benchmark puts such a run in front of every example,
for an image whose size is drawn (seeded) from ``GRIDS``, and fills its pixels with seeded random
values: speed and memory depend on the number of image tokens and patches, not on what the image
shows, and every mode sees the same pixels. The image tokens are real tokens (counted in the
throughput) and carry no targets (labels -100), as VLM collators do.

At Qwen2.5-VL's 14-pixel patches and 2x2 merge, ``GRIDS`` are images of 224x224, 336x448, 448x448
and 448x672 pixels: 64, 192, 256 and 384 image tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# Image sizes in merged patches (rows, columns): one merged patch is one image token.
GRIDS = ((8, 8), (12, 16), (16, 16), (16, 24))


@dataclass(frozen=True)
class ImageSpec:
    """What a Qwen-VL-style model's image input looks like, read from its config."""

    image_token: int
    start_token: int
    end_token: int
    merge: int  # spatial_merge_size: merge x merge patches make one image token
    patch_features: int  # one row of pixel_values: channels * temporal_patch * patch * patch

    def tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]


def image_spec(config) -> ImageSpec | None:
    """The spec of a model config that takes Qwen-VL-style images, else None."""
    vision = getattr(config, "vision_config", None)
    merge = getattr(vision, "spatial_merge_size", None)
    temporal = getattr(vision, "temporal_patch_size", None)
    ids = [
        getattr(config, name, None)
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
    ]
    if vision is None or merge is None or temporal is None or None in ids:
        return None
    channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", None) or 3
    return ImageSpec(*ids, merge, channels * temporal * vision.patch_size**2)


def describe(spec: ImageSpec) -> str:
    """The data line's note on the images."""
    counts = "/".join(str(spec.tokens(g)) for g in GRIDS)
    return f"+ one synthetic image per example (random pixels; {counts} image tokens, seeded)"


def with_images(plan: list, spec: ImageSpec, seed: int) -> list:
    """Every example of ``plan[step][rank]`` with an image's tokens in front: start, the image
    placeholders, end. The grid is drawn from GRIDS by ``seed`` and the example's place."""
    rng = random.Random(seed)
    special = {spec.image_token, spec.start_token, spec.end_token}

    def one(example: list[int]) -> list[int]:
        grid = GRIDS[rng.randrange(len(GRIDS))]
        # A text id that is an image id (a vocab folded onto a tiny model's) would read as an
        # image: it becomes 0.
        text = [0 if t in special else t for t in example]
        return [spec.start_token, *[spec.image_token] * spec.tokens(grid), spec.end_token, *text]

    return [[[one(e) for e in batch] for batch in step] for step in plan]


def attach(inputs: dict, spec: ImageSpec, seed: int) -> dict:
    """Add ``pixel_values`` and ``image_grid_thw`` for the image runs in ``inputs["input_ids"]``
    (padded (B, L) or flattened (1, T)), and take the targets off the image tokens.

    Returns:
        inputs with pixel_values: (sum of t*h*w patches, patch_features) fp32;
        image_grid_thw: (images, 3) int64, in the order the runs appear (row-major), as the
        model's ``get_rope_index`` and the vision tower read them.
    """
    ids = inputs["input_ids"]
    is_image = ids == spec.image_token
    grids = []
    for row in is_image.tolist():
        run = 0
        for flag in [*row, False]:
            if flag:
                run += 1
            elif run:
                grids.append(_grid_of(run, spec))
                run = 0
    grid_thw = torch.tensor([(1, h * spec.merge, w * spec.merge) for h, w in grids], dtype=torch.long)
    patches = int(grid_thw.prod(-1).sum()) if grids else 0
    g = torch.Generator().manual_seed(seed + int(ids.sum()))  # the same pixels for the same batch
    out = dict(inputs)
    out["pixel_values"] = torch.rand(patches, spec.patch_features, generator=g) * 2 - 1
    out["image_grid_thw"] = grid_thw
    if "labels" in out:
        out["labels"] = out["labels"].masked_fill(is_image, IGNORE_INDEX)
    return out


def _grid_of(tokens: int, spec: ImageSpec) -> tuple[int, int]:
    for grid in GRIDS:
        if spec.tokens(grid) == tokens:
            return grid
    raise ValueError(f"a run of {tokens} image tokens matches no image size of seqpack.bench.media.GRIDS")
