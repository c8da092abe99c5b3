"""Per-case tests of patch(): parity with the unpatched model and with each sequence run alone."""

import copy
import importlib.machinery
import subprocess
import sys
import types

import pytest
import torch
from helpers import EAGER, enable_checkpointing, grads, padded_batch, per_sequence_logits, tiny_llama
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
)

from seqpack import UnsupportedModelError, attention, is_patched, patch, unpatch
from seqpack.packing import metadata_from_mask, pack, unpack

LENGTHS = [7, 1, 13, 10]  # odd lengths, a length-1 row, one full row
L = 13


def _parity(reference, patched, ids, mask, labels):
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    real = mask.bool()
    assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref_grads, new_grads = grads(reference), grads(patched)
    assert ref_grads.keys() == new_grads.keys() and ref_grads
    for name in ref_grads:
        assert_close(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return out


def test_packing_round_trip():
    ids, mask, _ = padded_batch([3, 0, 5], 6, left=True)
    meta = metadata_from_mask(mask, 3, 6, ids.device)
    # the all-padding row is no sequence (an empty one confuses older linear-attention kernels)
    assert meta.cu_seqlens.tolist() == [0, 3, 8] and meta.cu_seqlens.dtype == torch.int32
    assert meta.max_seqlen == 5 and meta.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    x = torch.randn(3, 6, 4)
    back = unpack(pack(x, meta), meta)
    assert_close(back[mask.bool()], x[mask.bool()])
    assert back[~mask.bool()].abs().sum() == 0


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_llama_parity_with_unpatched(left):
    reference, patched = tiny_llama(), tiny_llama()
    patch(patched, backend="reference", **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L, left=left)
    if left:
        # Unpatched, the last padding position "predicts" the first real token and is counted in
        # the loss; seqpack counts real tokens only. A first label of -100 makes both the same.
        first = mask.argmax(dim=1)
        labels[torch.arange(len(LENGTHS)), first] = -100
    out = _parity(reference, patched, ids, mask, labels)
    assert out.logits.shape == (4, L, 128)
    assert out.logits[~mask.bool()].abs().sum() == 0  # zeros at padding


def test_matches_each_sequence_alone():
    model = tiny_llama()
    truth = per_sequence_logits(model, *padded_batch(LENGTHS, L, left=True)[:2])
    patch(model, **EAGER)
    ids, mask, _ = padded_batch(LENGTHS, L, left=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for row, expected in enumerate(truth):
        assert_close(logits[row][mask[row].bool()], expected, rtol=1e-4, atol=1e-5)


def test_all_padding_row_is_zero_and_finite():
    model = patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch([5, 0, 3], 6)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    assert out.logits[1].abs().sum() == 0
    assert all(h.shape == (3, 6, 64) and h[1].abs().sum() == 0 for h in out.hidden_states)
    out.loss.backward()
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_inputs_embeds():
    reference, patched = tiny_llama(), patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    embeds = reference.get_input_embeddings()(ids).detach()
    ref = reference(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    out = patched(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss)


def test_given_position_ids_are_gathered():
    reference, patched = tiny_llama(), patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    position_ids = (torch.arange(L) + 3).expand(4, L)  # an offset the caller asked for
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    out = patched(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_prepacked_batch_passes_through(flash_kwargs):
    ids, mask, _ = padded_batch(LENGTHS, L)
    features = [{"input_ids": ids[r][mask[r].bool()].tolist()} for r in range(len(LENGTHS))]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")(features)
    reference, patched = tiny_llama(), patch(tiny_llama(), **EAGER)
    truth = per_sequence_logits(reference, ids, mask)
    out = patched(**batch)
    # transformers' own packing detection needs use_cache=False: with a cache (the default, even in
    # train mode) it silently attends across sequences.
    ref = reference(
        **{k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_len"))}, use_cache=False
    )
    assert out.logits.shape == (1, sum(LENGTHS), 128)
    assert_close(out.logits[0], torch.cat(truth), rtol=1e-4, atol=1e-5)
    assert_close(ref.logits[0], torch.cat(truth), rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_loss_never_crosses_sequences():
    """Labels at padding that are not -100 are ignored, and no row predicts the next row's start."""
    model = patch(tiny_llama(), **EAGER)
    ids, mask, _ = padded_batch([4, 6], 6)
    labels = ids.clone()  # pad positions carry labels too: seqpack counts real tokens only
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = out.logits
    expected = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, :3], logits[1, :5]]), torch.cat([ids[0, 1:4], ids[1, 1:6]])
    )
    assert_close(out.loss, expected)


def test_num_items_in_batch_and_accumulation():
    reference, patched = tiny_llama(), patch(tiny_llama(), **EAGER)
    micro = [padded_batch(LENGTHS, L, seed=s) for s in (1, 2)]
    n_items = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in micro)
    for model in (reference, patched):
        for ids, mask, labels in micro:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
            loss.backward()
    ref_grads, new_grads = grads(reference), grads(patched)
    for name in ref_grads:
        assert_close(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing():
    reference, patched = tiny_llama(), tiny_llama()
    for model in (reference, patched):
        enable_checkpointing(model)
    patch(patched, **EAGER)
    _parity(reference, patched, *padded_batch(LENGTHS, L))


def test_peft_lora():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    reference = peft.get_peft_model(tiny_llama(), lora)
    patched = peft.get_peft_model(tiny_llama(), copy.deepcopy(lora))
    patched.load_state_dict(reference.state_dict())
    patch(patched, **EAGER)
    assert is_patched(patched)
    _parity(reference, patched, *padded_batch(LENGTHS, L))


def test_sequence_classification_head():
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(config)
    patched = copy.deepcopy(reference)
    patch(patched, **EAGER)
    ids, mask, _ = padded_batch(LENGTHS, L)
    target = torch.tensor([0, 1, 2, 1])
    ref = reference(input_ids=ids, attention_mask=mask, labels=target)
    out = patched(input_ids=ids, attention_mask=mask, labels=target)
    assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_unpatch_round_trip_and_patch_twice():
    model = tiny_llama()
    keys = list(model.state_dict())
    ids, mask, _ = padded_batch(LENGTHS, L)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    assert patch(model, **EAGER) is model and patch(model) is model  # twice: a no-op
    assert is_patched(model) and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="already patched"):
        patch(model, backend="torch")
    unpatch(model)
    assert not is_patched(model) and "forward" not in model.__dict__
    assert model.config._attn_implementation == "sdpa" and list(model.state_dict()) == keys
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_generation_and_custom_masks_run_the_original_forward():
    reference, patched = tiny_llama().eval(), patch(tiny_llama().eval(), **EAGER)
    ids, mask, _ = padded_batch([5, 7], 7, left=True)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(input_ids=ids, attention_mask=mask, **kwargs),
                       reference.generate(input_ids=ids, attention_mask=mask, **kwargs))  # fmt: skip
    causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))[None, None].expand(2, 1, 7, 7)
    with torch.no_grad():
        assert_close(patched(input_ids=ids, attention_mask=causal).logits,
                     reference(input_ids=ids, attention_mask=causal).logits)  # fmt: skip
    assert patched.config._attn_implementation == "sdpa"  # at rest the config names the original


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(4, L + 1, dtype=torch.long), "attention_mask has shape"),
        (torch.ones(4, 1, L, dtype=torch.long), "attention_mask has shape"),
        (torch.full((4, L), 2), "only 0 and 1"),
        (torch.tensor([[1, 1, 2, 2, 2, 3] + [0] * (L - 6)] * 4), "segment-id mask"),
    ],
    ids=["wrong-length", "3-d", "values", "segment-ids"],
)
def test_bad_masks_are_refused(mask, match):
    model = patch(tiny_llama(), **EAGER)
    ids, _, _ = padded_batch(LENGTHS, L)
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, attention_mask=mask)


def test_missing_inputs_are_refused():
    model = patch(tiny_llama(), **EAGER)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(attention_mask=torch.ones(2, 3))


def test_unknown_and_missing_backends():
    with pytest.raises(ValueError, match="Unknown seqpack backend"):
        patch(tiny_llama(), backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ImportError, match="torch >= 2.10"):
            patch(tiny_llama(), backend="torch")
    assert attention.resolve_backend("auto") in attention.BACKENDS


def test_unsupported_model_is_refused_and_strict_false_warns():
    config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=64)  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        patch(model)
    with pytest.warns(UserWarning, match="left unpatched"):
        assert patch(model, strict=False) is model
    assert not is_patched(model)
    assert issubclass(UnsupportedModelError, ValueError)


def test_model_dropping_kwargs_is_caught(monkeypatch):
    model = patch(tiny_llama(), **EAGER)
    layer = model.model.layers[0].self_attn
    original = type(layer).forward

    def drops_kwargs(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        return original(self, hidden_states, position_embeddings, attention_mask)

    monkeypatch.setattr(type(layer), "forward", drops_kwargs)
    with pytest.raises(RuntimeError, match="without the packing metadata"):
        model(*padded_batch(LENGTHS, L)[:2])


@pytest.fixture
def flash_stand_in(monkeypatch):
    """A CPU stand-in for the flash-attn package: records its arguments, computes causal attention
    with its ``window_size`` (left, 0) as flash-attn does: a query sees itself and ``left`` before."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False, window_size=(-1, -1), softcap=0.0):  # fmt: skip
        calls.append(dict(q=q.shape, k=k.shape, cu=cu_q.tolist(), max=max_q, scale=softmax_scale,
                          causal=causal, window=window_size, softcap=softcap, dropout=dropout_p))  # fmt: skip
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            ks = ks.repeat_interleave(q.shape[1] // k.shape[1], 0)
            vs = vs.repeat_interleave(q.shape[1] // k.shape[1], 0)
            offset = torch.arange(e - s)[:, None] - torch.arange(e - s)[None, :]
            allowed = (offset >= 0) & ((offset <= window_size[0]) if window_size[0] >= 0 else True)
            out[s:e] = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=allowed, scale=softmax_scale
            ).transpose(0, 1)
        return out

    flash_attn_varlen_func._seqpack_stand_in = True
    module = types.ModuleType("flash_attn")
    # transformers' find_spec checks of optional packages read sys.modules' entry: it needs a spec
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    attention._varlen_fn.cache_clear()
    yield calls
    attention._varlen_fn.cache_clear()


def test_flash_attn_adapter_plumbing(flash_stand_in):
    assert "flash_attn" in attention.available_backends()
    reference = tiny_llama().to(torch.bfloat16)
    patched = patch(copy.deepcopy(reference), backend="flash_attn", **EAGER)
    ids, mask, _ = padded_batch(LENGTHS, L)
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask).logits
        ref = reference(input_ids=ids, attention_mask=mask).logits
    call = flash_stand_in[0]
    assert len(flash_stand_in) == 2  # one call per layer
    assert call["q"] == (sum(LENGTHS), 4, 16) and call["k"] == (sum(LENGTHS), 2, 16)  # GQA, no repeat
    assert call["cu"] == [0, 7, 8, 21, 31] and call["max"] == 13 and call["causal"] is True
    assert call["window"] == (-1, 0) and call["scale"] == 16**-0.5 and call["dropout"] == 0.0
    real = mask.bool()
    assert (out[real].float() - ref[real].float()).abs().max() < 0.1


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "sliding"])
@pytest.mark.parametrize("value_dim", [288, 160], ids=["same-dim", "narrower-v"])
def test_rows_sdpa_matches_each_sequence_alone(window, value_dim):
    """The path for heads wider than the varlen kernels (Gemma 4's 512): SDPA over the padded
    layout, outputs and q/k/v gradients against each sequence's own masked attention (fp32)."""
    g = torch.Generator().manual_seed(0)
    total, heads, kv_heads, dim, scale = sum(LENGTHS), 4, 2, 288, 0.3
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    leaves = [
        torch.randn(1, h, total, d, generator=g, requires_grad=True)
        for h, d in ((heads, dim), (kv_heads, dim), (kv_heads, value_dim))
    ]
    upstream = torch.randn(1, total, heads, value_dim, generator=g)
    out = attention._rows_sdpa(*leaves, cu, max(LENGTHS), scaling=scale, dropout=0.0, sliding_window=window)
    got = [out, *torch.autograd.grad((out * upstream).sum(), leaves)]

    q, k, v = (t.detach().clone().requires_grad_() for t in leaves)
    parts = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pos = torch.arange(e - s)
        allowed = pos[None] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - pos[None] < window
        ks, vs = (t[0, :, s:e].repeat_interleave(heads // kv_heads, 0) for t in (k, v))
        scores = (q[0, :, s:e] @ ks.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        parts.append((scores.softmax(-1) @ vs).transpose(0, 1))
    want_out = torch.cat(parts)[None]
    want = [want_out, *torch.autograd.grad((want_out * upstream).sum(), [q, k, v])]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32 over 288-wide heads


def test_flash_attn_sliding_window_plumbing(flash_stand_in):
    """A window shorter than the sequences reaches flash-attn as (W - 1, 0), and the stand-in,
    which honours it, gives what the unpatched model's own sliding mask gives."""
    config = AutoConfig.for_model(
        "mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, sliding_window=4,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    patched = patch(copy.deepcopy(reference), backend="flash_attn", **EAGER)
    ids, mask, _ = padded_batch(LENGTHS, L)
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask).logits
        ref = reference(input_ids=ids, attention_mask=mask).logits
    assert flash_stand_in[0]["window"] == (3, 0)
    real = mask.bool()
    assert (out[real].float() - ref[real].float()).abs().max() < 0.1


def test_wide_heads_take_sdpa_not_the_kernel(flash_stand_in, monkeypatch):
    """A kernel backend with heads over 256 wide: no kernel call, the padded-layout SDPA instead,
    giving what the unpatched model gives (bf16: the kernel backends take half precision only)."""
    rows_calls = []
    rows_sdpa = attention._rows_sdpa
    monkeypatch.setattr(attention, "_rows_sdpa", lambda *a, **k: rows_calls.append(1) or rows_sdpa(*a, **k))
    reference = tiny_llama(head_dim=264).to(torch.bfloat16)
    patched = patch(copy.deepcopy(reference), backend="flash_attn", **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    assert not flash_stand_in and len(rows_calls) == 2  # the kernel never asked; each layer on SDPA
    wide = torch.zeros(1, 4, 3, 264, dtype=torch.bfloat16)
    capped = attention._unsupported_feature(attention.plan("flash_attn"), wide, wide, 0.0, 50.0, None)
    assert capped == "head_dim 264 > 256 with logit softcapping"  # SDPA has no softcap: reference path
    real = mask.bool()
    assert (out.logits[real].float() - ref.logits[real].float()).abs().max() < 0.1
    out.loss.backward()
    ref.loss.backward()
    for (name, a), b in zip(grads(patched).items(), grads(reference).values(), strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2, name


def test_import_has_no_side_effects():
    code = (
        "import sys, seqpack\n"
        "from transformers import AttentionInterface\n"
        "assert 'seqpack' not in AttentionInterface._global_mapping\n"
        "bad = [m for m in ('flash_attn', 'flash_attn_interface', 'liger_kernel', 'trl', 'peft', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patching_one_model_leaves_a_model_sharing_its_config_alone():
    config = tiny_llama().config
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(config).train()
    patched = AutoModelForCausalLM.from_config(config).train()
    assert patched.config is other.config  # transformers shares it
    ids, mask, labels = padded_batch(LENGTHS, L)
    before = other(input_ids=ids, attention_mask=mask, labels=labels).loss
    patch(patched, **EAGER)
    assert other.config._attn_implementation == "sdpa"
    assert_close(other(input_ids=ids, attention_mask=mask, labels=labels).loss, before)
    unpatch(patched)
    assert patched.config is other.config


def test_unpatch_keeps_a_forward_installed_after_patch():
    """A framework that wraps model.forward after patch() (TRL's fused head, Accelerate's autocast)
    keeps working after unpatch(), and the model then runs unpacked."""
    model = patch(tiny_llama(), **EAGER)
    inner = model.forward
    model.forward = lambda *args, **kwargs: inner(*args, **kwargs)  # someone else's wrapper
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    ids, mask, labels = padded_batch(LENGTHS, L)
    packed = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    unpatch(model)
    unpacked = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert seen == [(1, sum(LENGTHS)), (len(LENGTHS), L)]
    assert_close(packed, unpacked, rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_attention_dropout_runs_in_training_and_not_in_eval():
    """The reference path applies the model's own attention dropout in training only."""
    reference = tiny_llama(attention_dropout=0.5)
    patched = patch(tiny_llama(attention_dropout=0.5), **EAGER)
    ids, mask, _ = padded_batch(LENGTHS, L)
    real = mask.bool()
    first = patched(input_ids=ids, attention_mask=mask).logits
    second = patched(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(first[real], second[real])  # dropout is on
    with torch.no_grad():
        out = patched.eval()(input_ids=ids, attention_mask=mask).logits
        ref = reference.eval()(input_ids=ids, attention_mask=mask).logits
    assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5)


def test_prepacked_metadata_follows_transformers_rule():
    """A sequence starts wherever positions do not step by one; missing pieces are derived."""
    from seqpack.packing import metadata_from_packed

    cpu = torch.device("cpu")
    meta = metadata_from_packed(1, 7, cpu, position_ids=torch.tensor([[5, 6, 7, 0, 1, 0, 0]]))
    assert meta.cu_seqlens.tolist() == [0, 3, 5, 6, 7] and meta.max_seqlen == 3
    meta = metadata_from_packed(1, 5, cpu, cu_seqlens=torch.tensor([0, 3, 5]))
    assert meta.position_ids.tolist() == [[0, 1, 2, 0, 1]] and meta.cu_seqlens.dtype == torch.int32
    meta = metadata_from_packed(1, 5, cpu, cu_seqlens=torch.tensor([0, 0, 3, 3, 5]))  # empty documents
    assert meta.cu_seqlens.tolist() == [0, 3, 5] and meta.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # Several rows: each row starts a document too, even where its positions continue the last row's.
    meta = metadata_from_packed(2, 4, cpu, position_ids=torch.tensor([[0, 1, 0, 1], [2, 3, 4, 5]]))
    assert meta.cu_seqlens.tolist() == [0, 2, 4, 8] and meta.max_seqlen == 4


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 3}),
        ("gemma2", {"softcap": 5.0}),
        ("gpt_oss", {}),
    ],
)
def test_padded_layout_reference_equals_sequence_by_sequence(model_type, extra):
    # The reference path under compile (and on a GPU) lays the packed sequences out as a padded
    # batch; eager on the CPU it loops over them. Both must be the same function, gradients too,
    # with an empty sequence, a length-1 one and GQA.
    from tiny_models import build_tiny_model

    model = build_tiny_model(model_type)
    module = next(m for m in model.modules() if hasattr(m, "num_key_value_groups"))
    if model_type == "gpt_oss":
        extra = {"s_aux": module.sinks}
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    lengths = [5, 0, 1, 7, 4]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(1, h, total, dim, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads)
    ]
    features = {k: v for k, v in extra.items() if k != "sliding_window"}
    kwargs = dict(scaling=dim**-0.5, dropout=0.0, sliding_window=extra.get("sliding_window"), **features)

    looped = attention._reference_attention(module, *inputs, cu_seqlens, max(lengths), **kwargs)
    laid_out = attention._padded_layout_attention(module, *inputs, cu_seqlens, max(lengths), **kwargs)
    torch.testing.assert_close(laid_out, looped, rtol=1e-5, atol=1e-6)
    assert laid_out.shape == (1, total, heads, dim)
    cotangent = torch.randn(looped.shape, generator=g)
    grads_looped = torch.autograd.grad(looped, inputs, cotangent)
    grads_laid_out = torch.autograd.grad(laid_out, inputs, cotangent)
    for a, b in zip(grads_laid_out, grads_looped, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cu_seqlens, max_length, message",
    [
        ([0, 3, 9], 5, "max_length_q=5 is shorter than the longest sequence"),
        ([0, 3, 8], 6, "end at the packed length 9"),
        ([1, 3, 9], 6, "must start at 0"),
        ([0, 5, 3, 9], 6, "decreases"),
    ],
)
def test_prepacked_flash_kwargs_that_lie_are_refused(cu_seqlens, max_length, message):
    # The kernels trust cu_seq_lens_q and max_length_q; a wrong value would compute something else.
    patched = patch(tiny_llama(), **EAGER)
    batch = dict(
        input_ids=torch.randint(1, 128, (1, 9)),
        position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]]),
        cu_seq_lens_q=torch.tensor(cu_seqlens, dtype=torch.int32),
        cu_seq_lens_k=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_length_q=max_length,
        max_length_k=max_length,
    )
    with pytest.raises(ValueError, match=message):
        patched(**batch)


def test_rows_sdpa_compiles_whole_with_dynamic_shapes():
    """The wide-head path inside a compiled layer: one graph, no break, over two packed shapes."""
    fn = torch.compile(attention._rows_sdpa, backend="aot_eager", dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for lengths in (LENGTHS, [3, 9, 2]):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v = (torch.randn(1, h, sum(lengths), 272, generator=g) for h in (4, 2, 2))
        kwargs = dict(scaling=0.1, dropout=0.0, sliding_window=4)
        assert_close(
            fn(q, k, v, cu, max(lengths), **kwargs), attention._rows_sdpa(q, k, v, cu, max(lengths), **kwargs)
        )


def test_a_packed_forward_in_one_thread_leaves_another_threads_models_alone():
    """Two models training in two threads: while one thread is inside a packed forward, the other
    thread's patched model still packs (the packing depth is per thread)."""
    import threading

    model_a = patch(tiny_llama(), compile=False)
    model_b = patch(tiny_llama(seed=1), compile=False)
    ids, mask, labels = padded_batch(LENGTHS, L)
    inside, release, failures = threading.Event(), threading.Event(), []

    def hold(*_):
        inside.set()
        release.wait(30)

    handle = model_a.model.layers[0].register_forward_pre_hook(hold)

    def run_a():
        try:
            model_a(input_ids=ids, attention_mask=mask, labels=labels)
        except Exception as e:  # reported below, in the main thread
            failures.append(e)

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert inside.wait(30)
        out_b = model_b(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        release.set()
        thread.join(30)
        handle.remove()
    assert not failures
    assert out_b.logits is None  # packed, fused loss: not passed through as if nested in A's forward
    assert_close(out_b.loss, unpatch(model_b)(input_ids=ids, attention_mask=mask, labels=labels).loss)
