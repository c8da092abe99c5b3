"""Hybrid models: Gated DeltaNet, Mamba and short-convolution layers see each packed sequence alone.

tests/test_sweep.py checks every hybrid type on padded batches (logits right and left, the
default training path's loss and gradients). Here: the paths around it, on the types users
fine-tune (Qwen3.5's Gated DeltaNet, LFM2's short convolution, Jamba's Mamba layer, whose
decoder layer hands the mixer no kwargs): pre-packed batches, gradient checkpointing, compiled
layers over many batch shapes, unpatch, deepcopy, and the refusal of what cannot be packed.
"""

import copy
import random

import pytest
import torch
from helpers import enable_checkpointing, grads, padded_batch
from tiny_models import build_tiny_model
from torch._dynamo.utils import counters
from torch.testing import assert_close
from transformers import DataCollatorWithFlattening

from seqpack import UnsupportedModelError, mixers, patch, unpatch
from seqpack import compile as compiling

# mamba2: no attention, and its head calls the backbone with named arguments only, so the
# metadata reaches its mixers by handover from the packed forward (mixers.PackedRows).
HYBRIDS = ["qwen3_5_text", "lfm2", "jamba", "mamba2"]
LENGTHS = [11, 5, 16, 1]


def _model(model_type):
    return build_tiny_model(model_type).train()


def _alone(model, ids, mask):
    """Each sequence run alone through the unpatched model: the truth."""
    with torch.no_grad():
        return [
            model(input_ids=ids[r][mask[r].bool()][None], use_cache=False).logits[0] for r in range(len(ids))
        ]


def _mixer_modules(model):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), mixers.MixerForward)]


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_prepacked_batches(model_type):
    reference = _model(model_type)
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    assert _mixer_modules(model), "no sequence mixer was wrapped"
    ids, mask, _ = padded_batch(LENGTHS, 16, vocab=200)
    truth = _alone(reference, ids, mask)
    features = [{"input_ids": ids[r][mask[r].bool()].tolist()} for r in range(len(LENGTHS))]
    for flash_kwargs in (False, True):
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")(
            features
        )
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        assert_close(out, torch.cat(truth), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("model_type", HYBRIDS)
def test_gradient_checkpointing(model_type, reentrant):
    """The backward replays each layer; Jamba's mixer must get its metadata in the replay too."""
    reference = _model(model_type)
    model = copy.deepcopy(reference)
    for m in (reference, model):
        enable_checkpointing(m, use_reentrant=reentrant)
    patch(model, compile=False)
    ids, mask, labels = padded_batch(LENGTHS, 16, vocab=200)
    for m in (reference, model):
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    expected, got = grads(reference), grads(model)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_compiled_layers_over_many_batch_shapes(monkeypatch, model_type):
    """The mixer call is eager by design (a graph break); the compiled pieces of each layer settle
    after a few warm-up shapes (the pieces after the break start static), then never recompile."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    reference = _model(model_type)
    model = patch(copy.deepcopy(reference))
    rng = random.Random(0)
    shapes = [[5, 9, 3], [6], [12, 2, 7, 4]] + [
        [rng.randint(2, 20) for _ in range(rng.randint(1, 6))] for _ in range(8)
    ]
    graphs = []
    for seed, lengths in enumerate(shapes):
        ids, mask, labels = padded_batch(lengths, max(lengths), vocab=200, seed=seed)
        reference.zero_grad()
        model.zero_grad()
        ref = reference(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        ref.loss.backward()
        out.loss.backward()
        assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        expected = grads(reference)
        for name, grad in grads(model).items():
            assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    if model_type == "mamba2":  # every layer hands its mixers the metadata: eager by design
        assert graphs[-1] == 0 and mixers.eager_layers(_wrapped(model)) == {
            id(x) for x in model.backbone.layers
        }
        return
    assert graphs[0] >= 1, "nothing was compiled"
    assert graphs[-1] == graphs[2], f"batch shapes after the warm-up recompiled: {graphs}"


def _wrapped(model):
    return [
        m
        for m in model.modules()
        if isinstance(m.__dict__.get("forward"), (mixers.MixerForward, mixers.LayerForward))
    ]


def test_unpatch_and_deepcopy():
    reference = _model("qwen3_5_text")
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    twin = copy.deepcopy(model)
    assert _mixer_modules(twin) and all(m.forward.module is m for m in _mixer_modules(twin))
    ids, mask, _ = padded_batch(LENGTHS, 16, vocab=200)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(
            twin(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )
    unpatch(model)
    assert not _mixer_modules(model)
    assert not any(isinstance(m.__dict__.get("forward"), mixers.LayerForward) for m in model.modules())
    with torch.no_grad():
        assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
        )


def test_a_mixer_that_gets_no_metadata_raises():
    """A mixer reached by neither kwargs nor handover in a packed forward raises, never runs on
    the packed row as one sequence."""
    model = patch(_model("mamba2"), compile=False)
    ids, mask, _ = padded_batch(LENGTHS, max(LENGTHS), vocab=model.config.vocab_size)
    for layer in model.backbone.layers:  # drop the handover: the mixers now get nothing
        del layer.forward
    with pytest.raises(RuntimeError, match="was called without the packing metadata"):
        model(input_ids=ids, attention_mask=mask)


def test_a_layer_stack_that_drops_the_kwargs_with_no_mixer_found_is_refused():
    """xLSTM's blocks are neither attention nor a mixer seqpack can wrap: dropped kwargs refuse it."""
    with pytest.raises(UnsupportedModelError, match=r"'xlstm'.*without \*\*kwargs"):
        patch(_model("xlstm"))


def test_a_convolution_inside_attention_is_refused():
    with pytest.raises(UnsupportedModelError, match="a convolution mixes tokens inside the attention module"):
        patch(_model("zaya"))


def test_only_real_mixers_are_wrapped_and_their_layers_stay_compiled():
    """RecurrentGemma's every class starts with "Recurrent": only its recurrent block is a mixer."""
    model = patch(_model("recurrent_gemma"))
    wrapped = {type(m).__name__ for m in _mixer_modules(model)}
    assert wrapped == {"RecurrentGemmaRecurrentBlock"}
    record = model._seqpack_record
    assert len(record.compiled) == len(record.layers)  # no layer had to run eager


def test_a_generous_max_length_is_not_the_rows_width():
    """Collators may pass a bucket as max_length_q; the mixers' rows are as wide as the longest."""
    from seqpack.packing import metadata_from_packed

    cu = torch.tensor([0, 9, 14, 23], dtype=torch.int32)
    meta = metadata_from_packed(1, 23, torch.device("cpu"), cu_seqlens=cu, max_seqlen=4096)
    assert meta.max_seqlen == 9
    reference = _model("qwen3_5_text")
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    ids = torch.randint(3, 200, (1, 23), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in (9, 5, 9)])[None]
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4096, max_length_k=4096)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, **kwargs).logits[0]
        truth = [
            reference(input_ids=ids[:, a:b], use_cache=False).logits[0]
            for a, b in ((0, 9), (9, 14), (14, 23))
        ]
    assert_close(out, torch.cat(truth), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_torch_checkpoint_wrapper(model_type):
    """torch's checkpoint_wrapper (FSDP's and accelerate's activation checkpointing) around the
    decoder layers: exact where the layers get the metadata through their kwargs; for Mamba-2,
    whose metadata comes by handover and cannot reach that replay, a clear error (it ran the
    replay unpacked and gave wrong gradients before: adversarial review)."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    reference = _model(model_type)  # left unwrapped: the unpatched model fails under it on 5.24
    model = patch(copy.deepcopy(reference), compile=False)
    layer_type = type(model.get_decoder().layers[0])
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrapper, check_fn=lambda s: type(s) is layer_type
    )
    ids, mask, labels = padded_batch(LENGTHS, max(LENGTHS), vocab=reference.config.vocab_size)
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    if model_type == "mamba2":
        with pytest.raises(
            RuntimeError, match="replayed by an activation checkpoint without the packing metadata"
        ):
            out.loss.backward()
        return
    out.loss.backward()
    expected = grads(reference)
    for name, grad in grads(model).items():
        name = name.replace("_checkpoint_wrapped_module.", "")
        assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
