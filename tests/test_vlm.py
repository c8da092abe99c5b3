"""Vision-language models train packed: images in the batch, mRoPE, the vision tower left whole.

Each tiny VLM (tiny_vlms.py) gets a padded batch of two rows with an image each (two sizes where
the model takes several) and one text-only row. The multimodal forward runs on the padded batch as
the unpatched model does (vision tower, placeholder merge, multi-axis positions); its language
model packs what it is handed. The reference is the unpatched model on the same batch, and each
row run alone; every comparison is on real tokens.
"""

import copy

import pytest
import torch
from helpers import grads
from tiny_vlms import VLM_TYPES, vlm_case
from torch.testing import assert_close

from seqpack import compile as compiling
from seqpack import is_patched, patch, unpatch
from seqpack.support import _decoder_layers

# gemma3's image tokens see each other (a bidirectional block in its mask, from token_type_ids):
# its language model gets the masks ready-made and runs unpacked, exactly.
UNPACKED_WITH_IMAGES = {"gemma3"}


def _layer_inputs(model) -> list[tuple]:
    """The shapes of the hidden states the first decoder layer is called with."""
    seen = []
    layer = _decoder_layers(model.model, None)[0]
    layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple((args[0] if args else kwargs["hidden_states"]).shape)),
        with_kwargs=True,
    )
    return seen


def _assert_same_grads(model, reference):
    ours, ref = grads(model), grads(reference)
    assert ours.keys() == ref.keys() and ref
    for name in ref:  # fp32 rounding grows with the gradient's scale (gemma3's projector: ~100)
        atol = 1e-6 + 1e-5 * float(ref[name].abs().max())
        assert_close(ours[name], ref[name], rtol=1e-4, atol=atol, msg=name)


def _assert_trains_exactly(model, reference, batch: dict):
    """One training forward and backward of each: the same loss and every gradient. Returns the
    patched model's output."""
    out, ref = model(**batch), reference(**batch)
    out.loss.backward()
    ref.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(model, reference)
    return out


@pytest.mark.parametrize("model_type", VLM_TYPES)
def test_images_in_the_batch_train_exactly(model_type):
    """The default training path (fused loss): loss and every gradient, the vision tower's too."""
    reference, batch, _ = vlm_case(model_type)
    model = patch(copy.deepcopy(reference), compile=False)
    seen = _layer_inputs(model)
    _assert_trains_exactly(model, reference, batch)
    real = int(batch["attention_mask"].sum())
    assert (
        seen == [(3, *batch["input_ids"].shape[1:], seen[0][-1])]
        if model_type in UNPACKED_WITH_IMAGES
        else (seen and all(s[:2] == (1, real) for s in seen))
    ), seen


@pytest.mark.parametrize("model_type", VLM_TYPES)
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_logits_match_the_padded_batch_and_each_row_alone(model_type, left):
    reference, batch, rows = vlm_case(model_type, left=left)
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    with torch.no_grad():
        out, ref = model(**batch), reference(**batch)
        alone = [reference(**row).logits[0] for row in rows]
    real = batch["attention_mask"].bool()
    assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for r, truth in enumerate(alone):
        assert_close(out.logits[r][real[r]], truth, rtol=1e-4, atol=1e-5, msg=f"row {r}")


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava"])
def test_a_text_only_call_of_a_vlm_packs(model_type):
    reference, batch, _ = vlm_case(model_type)
    text = {k: v for k, v in batch.items() if not k.startswith(("pixel", "image_"))}
    text["input_ids"] = text["input_ids"].masked_fill(text["input_ids"] >= 250, 7)  # no image tokens
    text.pop("mm_token_type_ids", None)
    text["labels"] = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    model = patch(copy.deepcopy(reference), compile=False)
    seen = _layer_inputs(model)
    _assert_trains_exactly(model, reference, text)
    assert seen and seen[0][:2] == (1, int(text["attention_mask"].sum()))


def test_prepacked_images_with_text_positions_first():
    """One row holding two documents with an image each, as a padding-free collator lays them out:
    no mask, mRoPE positions of each document with its text positions first ((4, 1, L), the
    layout transformers reads documents from). Each document must see only itself."""
    reference, _, rows = vlm_case("qwen2_vl")
    positions = []
    language_model = reference.model.language_model
    hook = language_model.register_forward_pre_hook(
        lambda m, args, kwargs: positions.append(kwargs["position_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        alone = [reference(**row).logits[0] for row in rows[:2]]
    hook.remove()
    text = [torch.arange(row["input_ids"].shape[1])[None, None] for row in rows[:2]]
    position_ids = torch.cat([torch.cat([t, p]) for t, p in zip(text, positions, strict=True)], dim=-1)
    packed = dict(
        input_ids=torch.cat([row["input_ids"] for row in rows[:2]], dim=1),
        mm_token_type_ids=torch.cat([row["mm_token_type_ids"] for row in rows[:2]], dim=1),
        pixel_values=torch.cat([row["pixel_values"] for row in rows[:2]]),
        image_grid_thw=torch.cat([row["image_grid_thw"] for row in rows[:2]]),
        position_ids=position_ids,  # (4, 1, L)
    )
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    seen = _layer_inputs(model)
    with torch.no_grad():
        out = model(**packed).logits[0]
    assert_close(out, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert seen == [(1, packed["input_ids"].shape[1], seen[0][-1])]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava"])
def test_compiled_layers_with_images(monkeypatch, model_type):
    """The default compile=True: batches of other packed lengths reuse the layers' graph."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # the capture is what is tested here
    torch._dynamo.reset()
    counters.clear()
    reference, batch, _ = vlm_case(model_type)
    model = patch(copy.deepcopy(reference))
    graphs = []
    for drop in (0, 3, 5):
        step = dict(batch, attention_mask=batch["attention_mask"].clone())
        step["attention_mask"][2, batch["attention_mask"].shape[1] - drop :] = 0  # the text row shorter
        step["labels"] = batch["labels"].masked_fill(step["attention_mask"] == 0, -100)
        model.zero_grad()
        reference.zero_grad()
        _assert_trains_exactly(model, reference, step)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[2], graphs


def test_unpatch_restores_the_language_model():
    reference, batch, _ = vlm_case("qwen2_vl")
    model = patch(copy.deepcopy(reference), compile=False)
    unpatch(model)
    assert not is_patched(model)
    assert all("_seqpack_wrap" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_cross_attention_states_run_unpacked():
    """mllama's language model takes the image as cross-attention states, one per row: packing cannot
    align them with the packed text, so that call runs the original forward, exactly."""
    from tiny_models import tiny_config
    from transformers import AutoModelForImageTextToText

    config = tiny_config("mllama")
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size, vision.attention_heads = 32, 64, 2
    vision.num_hidden_layers, vision.num_global_layers, vision.intermediate_layers_indices = 2, 1, [0]
    vision.image_size, vision.patch_size, vision.max_num_tiles = 16, 8, 1
    vision.vision_output_dim, vision.supported_aspect_ratios = 64, [[1, 1]]
    config.text_config.cross_attention_layers, config.image_token_index = [1], 250
    torch.manual_seed(0)
    reference = AutoModelForImageTextToText.from_config(config).train()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 250
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = dict(
        input_ids=ids,
        attention_mask=mask,
        labels=ids.masked_fill((mask == 0) | (ids == 250), -100),
        pixel_values=torch.randn(2, 1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
        aspect_ratio_ids=torch.ones(2, 1, dtype=torch.long),
        aspect_ratio_mask=torch.ones(2, 1, 1, dtype=torch.long),
        cross_attention_mask=torch.ones(2, 9, 1, 1, dtype=torch.long),
    )
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    seen = _layer_inputs(model)
    out, ref = model(**batch), reference(**batch)
    real = mask.bool()
    assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert seen == [(2, 9, seen[0][-1])]


def _image_text_types() -> list[str]:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {})
    return sorted(set(names) - set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))  # those: test_sweep


@pytest.mark.parametrize("model_type", _image_text_types())
def test_every_image_text_type_on_a_text_batch(model_type):
    """Every image-text-to-text type test_sweep does not cover, on a padded text-only batch: exact
    (the default training path's loss and gradients, and the logits) or refused, naming its type.
    A type whose tiny model cannot be built, or whose unpatched forward needs images, is skipped."""
    from helpers import padded_batch
    from tiny_vlms import tiny_image_text_model

    from seqpack import UnsupportedModelError

    ids, mask, labels = padded_batch([9, 4, 13], 13, vocab=100)
    try:
        reference, ref = tiny_image_text_model(
            model_type, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels)
        )
    except Exception as err:  # noqa: BLE001 -- the unpatched model itself cannot run this here
        pytest.skip(f"unpatched tiny model does not run a text batch: {type(err).__name__}: {str(err)[:100]}")
    try:
        model = patch(copy.deepcopy(reference), compile=False)
    except UnsupportedModelError as err:
        assert repr(model_type) in str(err), str(err)
        return
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(model, reference)
    unpatch(model)
    patch(model, compile=False, keep_logits=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(logits[real], ref.logits.detach()[real], rtol=1e-4, atol=1e-5)


def test_precomputed_image_features_take_the_media_path():
    """``mm_encoder_outputs`` (vision features computed beforehand) instead of ``pixel_values``: the
    multimodal positions are still computed from the padded rows. Packing the text from the top
    would drop them (mRoPE)."""
    import inspect

    reference, batch, _ = vlm_case("qwen2_vl")
    if "mm_encoder_outputs" not in inspect.signature(type(reference.model).forward).parameters:
        pytest.skip("this transformers takes no mm_encoder_outputs")
    with torch.no_grad():
        media = {k: v for k, v in batch.items() if k.startswith(("pixel", "image_"))}
        features = reference.model.get_image_features(**media, return_dict=True)
    call = {k: v for k, v in batch.items() if not k.startswith("pixel")}
    call["mm_encoder_outputs"] = {"image": features}
    model = patch(copy.deepcopy(reference), compile=False)
    out = _assert_trains_exactly(model, reference, call)
    assert out.image_outputs is not None  # the model's own output fields, beside logits=None


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_a_video_beside_an_image(left):
    """Qwen2-VL with a video (two temporal patches: its mRoPE time axis moves) in one row, an image in
    the next, a text-only row: the default training path and the logits, against the unpatched model."""
    from tiny_vlms import END, IMAGE, START, TEXT_VOCAB, VIDEO

    reference, _, _ = vlm_case("qwen2_vl")
    vision = reference.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    gen = torch.Generator().manual_seed(0)
    text = [torch.randint(3, TEXT_VOCAB, (n,), generator=gen).tolist() for n in (5, 4, 13)]
    rows = [
        text[0][:2] + [START] + [VIDEO] * (2 * 4 * 4 // 4) + [END] + text[0][2:],  # grid (2, 4, 4)
        text[1][:2] + [START] + [IMAGE] * (4 * 6 // 4) + [END] + text[1][2:],  # grid (1, 4, 6)
        text[2],
    ]
    length = max(map(len, rows))
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[r, span], mask[r, span] = torch.tensor(row), 1
    batch = dict(
        input_ids=ids,
        attention_mask=mask,
        # Left-padded, the unpatched loss also counts the last pad predicting the first real token
        # (README: "Causal-LM loss on real tokens"); a label of -100 there leaves that out of both.
        labels=ids.masked_fill((mask == 0) | (ids >= TEXT_VOCAB) | (left & (mask.cumsum(1) == 1)), -100),
        pixel_values_videos=torch.randn(2 * 4 * 4, width, generator=gen),
        video_grid_thw=torch.tensor([[2, 4, 4]]),
        pixel_values=torch.randn(4 * 6, width, generator=gen),
        image_grid_thw=torch.tensor([[1, 4, 6]]),
    )
    import inspect

    if "mm_token_type_ids" in inspect.signature(type(reference).forward).parameters:
        batch["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    model = patch(copy.deepcopy(reference), compile=False)
    seen = _layer_inputs(model)
    _assert_trains_exactly(model, reference, batch)
    assert seen == [(1, int(mask.sum()), seen[0][-1])]
    unpatch(model)
    patch(model, compile=False, keep_logits=True)
    with torch.no_grad():
        logits, ref_logits = model(**batch).logits, reference(**batch).logits
    assert_close(logits[mask.bool()], ref_logits[mask.bool()], rtol=1e-4, atol=1e-5)
