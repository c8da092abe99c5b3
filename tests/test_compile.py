"""Compiled layers: parity with eager, one graph for every batch shape, state dict unchanged."""

import random

import pytest
import torch
from helpers import enable_checkpointing, grads, padded_batch, tiny_llama
from torch._dynamo.utils import counters
from torch.testing import assert_close

from seqpack import compile as compiling
from seqpack import patch, unpatch


def _train_steps(model, batches):
    losses = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for ids, mask, labels in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_matches_eager_and_unpatched():
    torch._dynamo.reset()
    reference, patched = tiny_llama(), tiny_llama()
    keys = list(patched.state_dict())
    patch(patched, compile=True)
    assert list(patched.state_dict()) == keys  # compiled in place: no _orig_mod.
    batches = [
        padded_batch(lens, max(lens), seed=i) for i, lens in enumerate([[5, 3, 9], [7, 2], [4, 11, 1]])
    ]
    ids, mask, labels = batches[0]
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref_grads, new_grads = grads(reference), grads(patched)
    for name in ref_grads:
        assert_close(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    reference.zero_grad()
    patched.zero_grad()
    assert_close(_train_steps(patched, batches), _train_steps(reference, batches), rtol=1e-4, atol=1e-6)
    unpatch(patched)
    assert all(layer._compiled_call_impl is None for layer in patched.model.layers)


def test_one_graph_for_every_batch_shape(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()  # earlier tests in this process compiled too
    model = patch(tiny_llama(), compile=True)
    rng = random.Random(0)

    def step(lengths):
        ids, mask, labels = padded_batch(lengths, max(lengths), seed=len(lengths))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    step([5, 9, 3])  # warm-up: batches of several sequences and of one
    step([6])
    before = counters["stats"]["unique_graphs"]
    assert 1 <= before <= 2
    for _ in range(50):  # a batch of one token in all would specialise on T == 1: not drawn here
        step([rng.randint(2, 40) for _ in range(rng.randint(1, 8))])
    assert counters["stats"]["unique_graphs"] == before, "a batch shape recompiled a layer"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_memory_budget_needs_compile_and_a_fraction():
    with pytest.raises(ValueError, match="compile=True"):
        patch(tiny_llama(), compile=False, memory_budget=0.5)
    model = patch(tiny_llama(), compile=True, memory_budget=1.5)
    ids, mask, labels = padded_batch([3, 4], 4)
    with pytest.raises(ValueError, match=r"memory_budget must be in \[0, 1\]"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("wrapper", ["gradient_checkpointing", "peft_lora"])
def test_compiled_layers_with_checkpointing_and_peft(monkeypatch, wrapper):
    """Compiled in place, the layers still run under gradient checkpointing and inside PEFT."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # the capture is what is tested here
    torch._dynamo.reset()
    counters.clear()
    reference, patched = tiny_llama(), tiny_llama()
    if wrapper == "gradient_checkpointing":
        for model in (reference, patched):
            enable_checkpointing(model)
    else:
        peft = pytest.importorskip("peft")
        reference = peft.get_peft_model(reference, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        patched = peft.get_peft_model(patched, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        patched.load_state_dict(reference.state_dict())
    keys = list(patched.state_dict())
    patch(patched, compile=True)
    assert list(patched.state_dict()) == keys
    batches = [padded_batch(lens, max(lens), seed=i) for i, lens in enumerate([[5, 3, 9], [7, 2]])]
    for ids, mask, labels in batches:
        ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
        out = patched(input_ids=ids, attention_mask=mask, labels=labels)
        ref.loss.backward()
        out.loss.backward()
        assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref_grads, new_grads = grads(reference), grads(patched)
    assert ref_grads.keys() == new_grads.keys() and ref_grads
    for name in ref_grads:
        assert_close(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss", "qwen3_moe"])
def test_compiled_reference_attention_keeps_softcaps_sinks_and_experts(model_type):
    # On the CPU, compiled layers run the reference attention over the padded (N, max_seqlen)
    # layout: the architecture's own softcap, sinks, sliding window or router must survive it.
    from tiny_models import build_tiny_model

    torch._dynamo.reset()
    reference = build_tiny_model(model_type, seed=0)
    patched = patch(build_tiny_model(model_type, seed=0), compile=True, keep_logits=True)
    for seed, lengths in enumerate([[5, 9, 1, 7], [3, 12]]):
        ids, mask, labels = padded_batch(lengths, max(lengths), vocab=reference.config.vocab_size, seed=seed)
        ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
        out = patched(input_ids=ids, attention_mask=mask, labels=labels)
        real = mask.bool()
        assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
        assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        ref.loss.backward()
        out.loss.backward()
        expected = grads(reference)
        for name, grad in grads(patched).items():
            assert_close(grad, expected[name], rtol=1e-4, atol=1e-5)
        reference.zero_grad()
        patched.zero_grad()


def test_inductor_layers_take_no_length_guarded_fusion(monkeypatch):
    """Inductor's strict mix-order reduction fusion guards on the packed length (1280 <= T <= 8191
    for mistral-7b on torch 2.11): seqpack compiles with its non-strict mode, which does not."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    compiling.compile_layers([torch.nn.Linear(2, 2)])
    (kwargs,) = seen
    assert kwargs["backend"] == compiling.BACKEND == "inductor"
    from torch._inductor import config as inductor

    if hasattr(inductor.triton, "mix_order_reduction_non_strict_mode"):
        assert kwargs["options"] == {"triton.mix_order_reduction_non_strict_mode": True}
        torch.compile(lambda x: x + 1, **compiling._options("inductor"))(torch.ones(2))  # a known option
    assert compiling._options("aot_eager") == {}


def test_many_architectures_in_one_process_all_compile(monkeypatch):
    """dynamo keeps 8 graphs per code object, and every architecture's decoder layers enter through
    transformers' same layer call, about two graphs each: without room the fifth model patched in a
    process ran its layers eagerly. The room is made for the packed forward only."""
    from tiny_models import build_tiny_model

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    # A room of 2 instead of dynamo's 8: two architectures then overflow it as five did (each graph
    # costs seconds to capture on two cores). config.patch, not monkeypatch: monkeypatch's undo
    # deletes a torch config entry instead of restoring it.
    added, default = {}, torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=2):
        limit = torch._dynamo.config.recompile_limit
        for model_type in ("llama", "qwen3"):
            model = patch(build_tiny_model(model_type).train())
            before = counters["stats"]["unique_graphs"]
            for lengths in ([5, 3], [7]):  # several sequences, then one
                ids, mask, labels = padded_batch(lengths, 8, vocab=200)
                model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            added[model_type] = counters["stats"]["unique_graphs"] - before
        assert torch._dynamo.config.recompile_limit == limit  # left as it was outside the forward
    assert all(n >= 1 for n in added.values()), added  # a model that ran eagerly compiled nothing
    assert sum(added.values()) > limit, added  # more graphs than the room
    assert torch._dynamo.config.recompile_limit == default
    torch._dynamo.reset()
