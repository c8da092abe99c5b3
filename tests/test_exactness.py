"""Exact on every path users take: each test here failed on an earlier main (issues 9 and 16).

What a config copied from a patched model builds, whole-model compile, the default fused loss on
heads that are not a plain linear layer, adapters added after patch(), every way a batch can say
where its sequences are, outputs a caller can receive, unpatch after config edits, bad input.
The reference is always the unpatched model (or each sequence run alone).
"""

import copy
import inspect
import math

import pytest
import torch
from helpers import grads, padded_batch, tiny_llama
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from seqpack import attention, is_patched, patch, unpatch

LENGTHS = [7, 1, 13, 10]
L = 13
EAGER = {"compile": False}  # the default fused loss, eager layers


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, grads(model)


def _assert_same_grads(new, ref, rtol=1e-4, atol=1e-6):
    assert new.keys() == ref.keys() and ref
    for name in ref:
        assert_close(new[name], ref[name], rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------- what a copied config builds


def test_config_names_the_original_attention_at_rest(tmp_path):
    """TRL builds reference models with attn_implementation=model.config._attn_implementation."""
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    patch(model, **EAGER)
    assert model.config._attn_implementation == "sdpa"
    ids, mask, _ = padded_batch(LENGTHS, L)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=model.config._attn_implementation
    ).train()
    copied = AutoModelForCausalLM.from_config(model.config).train()
    copied.load_state_dict(reference.state_dict())
    truth = tiny_llama()
    real = mask.bool()
    with torch.no_grad():
        expected = truth(input_ids=ids, attention_mask=mask).logits[real]
        for other in (reference, copied):
            assert not is_patched(other)
            assert_close(other(input_ids=ids, attention_mask=mask).logits[real], expected)
        single = ids[2:3, :13]  # one unpadded row: it was wrong even there
        assert_close(reference(input_ids=single).logits, truth(input_ids=single).logits)


def test_unpatched_model_asking_for_seqpack_attention_is_refused():
    model = AutoModelForCausalLM.from_config(tiny_llama().config)  # registers nothing by itself
    patch(tiny_llama(), **EAGER)  # registers "seqpack" with transformers
    model.config._attn_implementation = attention.ATTN_NAME
    with pytest.raises(RuntimeError, match="not patched"):
        model(*padded_batch(LENGTHS, L)[:2])


# --------------------------------------------------------------------------- whole-model compile


@pytest.mark.parametrize("how", ["torch.compile", "model.compile", "compile-then-patch"])
def test_whole_model_compile_matches(how):
    torch._dynamo.reset()
    reference, model = tiny_llama(), tiny_llama()
    ids, mask, labels = padded_batch(LENGTHS, L)
    if how == "compile-then-patch":
        model.compile(backend="aot_eager")
        patch(model, compile=True)
        run = model
    else:
        patch(model, compile=True)
        if how == "torch.compile":
            run = torch.compile(model, backend="aot_eager")
        else:
            model.compile(backend="aot_eager")
            run = model
    ref, ref_grads = _loss_and_grads(reference, input_ids=ids, attention_mask=mask, labels=labels)
    out = run(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads(model), ref_grads)  # model: the compiled wrapper prefixes _orig_mod.


def test_trainer_torch_compile(tmp_path):
    """TrainingArguments(torch_compile=True) compiles the whole patched model."""
    from test_frameworks import _args, _assert_same_run, _lm_dataset, _logged, _tokenizer
    from transformers import DataCollatorForLanguageModeling, Trainer

    def run(patch_it):
        torch._dynamo.reset()
        model = tiny_llama()
        if patch_it:
            patch(model)
        args = _args(tmp_path=tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
        collator = DataCollatorForLanguageModeling(_tokenizer(), mlm=False)
        trainer = Trainer(model=model, args=args, train_dataset=_lm_dataset(), data_collator=collator)
        trainer.train()
        return _logged(trainer, "loss"), model

    ref_logs, reference = run(False)
    new_logs, patched = run(True)
    _assert_same_run(ref_logs, new_logs, reference, patched)


# --------------------------------------------------------------------------- the default fused loss


def _tiny(model_type, **overrides):
    """tiny_models' model of a type, with config overrides, in train mode."""
    from tiny_models import tiny_config

    config = tiny_config(model_type)
    values = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # derived again
    config = type(config)(**{**values, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def test_fused_loss_skips_a_head_that_is_not_the_output_embedding_alone():
    """ModernBERT-decoder's logits are self.decoder(self.lm_head(h)): the default loss must be its own."""
    reference = _tiny("modernbert-decoder")
    model = patch(copy.deepcopy(reference), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L, vocab=reference.config.vocab_size)
    ref, ref_grads = _loss_and_grads(reference, input_ids=ids, attention_mask=mask, labels=labels)
    out, new_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert any(name.startswith("lm_head.") for name in new_grads)  # the prediction head learns
    _assert_same_grads(new_grads, ref_grads, atol=1e-5)


def test_lora_on_lm_head_added_after_patch():
    """SFTTrainer(peft_config=...) on a model patched first: the adapter on lm_head is in the loss."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    reference = peft.get_peft_model(tiny_llama(), config)
    model = patch(tiny_llama(), **EAGER)
    model = peft.get_peft_model(model, copy.deepcopy(config))
    model.load_state_dict(reference.state_dict())
    ids, mask, labels = padded_batch(LENGTHS, L)
    ref, ref_grads = _loss_and_grads(reference, input_ids=ids, attention_mask=mask, labels=labels)
    out, new_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert any("lm_head.lora_A" in name for name in new_grads)
    _assert_same_grads(new_grads, ref_grads)


def test_trainable_tokens_on_tied_embeddings_added_after_patch():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])
    reference = peft.get_peft_model(tiny_llama(tie_word_embeddings=True), config)
    model = patch(tiny_llama(tie_word_embeddings=True), **EAGER)
    model = peft.get_peft_model(model, copy.deepcopy(config))
    model.load_state_dict(reference.state_dict())
    ids, mask, labels = padded_batch(LENGTHS, L)
    ref, ref_grads = _loss_and_grads(reference, input_ids=ids, attention_mask=mask, labels=labels)
    out, new_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(new_grads, ref_grads)


# --------------------------------------------------------------------------- what a batch means


def _documents(lengths_per_row, vocab=128, seed=0):
    """Rows of several documents each, positions restarting per document, no padding."""
    g = torch.Generator().manual_seed(seed)
    rows, positions = [], []
    for lengths in lengths_per_row:
        rows.append(torch.randint(3, vocab, (sum(lengths),), generator=g))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows), torch.stack(positions)


def test_several_documents_per_row_with_more_than_one_row():
    """Restarting position_ids and no mask mark documents in any row, as transformers reads them."""
    reference, model = tiny_llama(), patch(tiny_llama(), compile=False, keep_logits=True)
    layout = [[5, 3, 4], [2, 8, 2], [12]]
    ids, positions = _documents(layout)
    labels = ids.masked_fill(positions == 0, -100)  # what flattening collators put at document starts
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, labels=labels)
        ref = reference(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
    assert out.logits.shape == ids.shape + (128,)
    assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    truth, targets = [], []
    for row, lengths in enumerate(layout):
        start = 0
        for n in lengths:  # each document alone
            with torch.no_grad():
                alone = reference(input_ids=ids[row : row + 1, start : start + n]).logits[0]
            assert_close(out.logits[row, start : start + n], alone, rtol=1e-4, atol=1e-5)
            truth.append(alone[:-1])
            targets.append(ids[row, start + 1 : start + n])
            start += n
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # With labels at the document starts too, the last token of a document is never asked to
    # predict the next document's first token (transformers' row-wise shift would count it).
    with torch.no_grad():
        everything = model(input_ids=ids, position_ids=positions, labels=ids.clone()).loss
    per_document = torch.nn.functional.cross_entropy(torch.cat(truth), torch.cat(targets))
    assert_close(everything, per_document, rtol=1e-5, atol=1e-6)


def test_a_rows_meaning_does_not_depend_on_the_batch_size():
    """An all-ones mask with positions that do not step by one: one sequence, in B = 1 as in B = 2."""
    reference, model = tiny_llama(), patch(tiny_llama(), **EAGER)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]).expand(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        for rows in (slice(0, 1), slice(0, 2)):
            batch = dict(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows])
            assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "model_type, overrides",
    [("phimoe", {"sliding_window": 4}), ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 4})],
    ids=["phimoe", "qwen2_moe"],
)
def test_windows_that_reach_attention_only_through_the_mask(model_type, overrides):
    reference = _tiny(model_type, **overrides)
    model = patch(copy.deepcopy(reference), keep_logits=True, compile=False)
    plans = {
        getattr(m, attention.PLAN_ATTR).window for m in model.modules() if hasattr(m, attention.PLAN_ATTR)
    }
    assert 4 in plans
    ids, mask, labels = padded_batch([11, 5, 16, 1], 16, vocab=reference.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = reference(input_ids=ids, attention_mask=mask).logits
    assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5)


def test_prompt_tuning_with_left_padding_is_one_sequence_per_row():
    """PEFT puts its virtual tokens before the left padding; they belong to the row's sequence."""
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    reference = peft.get_peft_model(tiny_llama(), config)
    model = peft.get_peft_model(patch(tiny_llama(), **EAGER), copy.deepcopy(config))
    model.load_state_dict(reference.state_dict())
    right = padded_batch(LENGTHS, L)
    left = [torch.zeros_like(right[0]), torch.zeros_like(right[1])]  # the same tokens, padded left
    for row, n in enumerate(LENGTHS):
        left[0][row, L - n :], left[1][row, L - n :] = right[0][row, :n], 1
    with torch.no_grad():
        for row, n in enumerate(LENGTHS):
            packed_left = model(input_ids=left[0], attention_mask=left[1]).logits[row, -n:]
            truth = reference(input_ids=right[0], attention_mask=right[1]).logits[row, 3 : 3 + n]
            assert_close(packed_left, truth, rtol=1e-4, atol=1e-5)


def test_router_logits_come_back_in_the_padded_layout():
    reference = _tiny("qwen3_moe")
    model = patch(copy.deepcopy(reference), keep_logits=True, compile=False)
    ids, mask, _ = padded_batch(LENGTHS, L, vocab=reference.config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        ref = reference(input_ids=ids, attention_mask=mask, output_router_logits=True)
    real = mask.bool().flatten()
    assert len(out.router_logits) == len(ref.router_logits)
    for got, expected in zip(out.router_logits, ref.router_logits, strict=True):
        assert got.shape == expected.shape == (len(LENGTHS) * L, expected.shape[-1])
        assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
        assert got[~real].abs().sum() == 0


# --------------------------------------------------------------------------- outputs a caller can receive


def test_eval_with_the_configs_use_cache_returns_a_cache():
    """model.eval()(ids) with the config's default use_cache=True, then a hand-written decode loop."""
    reference, model = tiny_llama().eval(), patch(tiny_llama(), **EAGER).eval()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    assert model.config.use_cache
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    tokens = {}
    for key, m in (("reference", reference), ("patched", model)):
        seq = ids
        with torch.no_grad():
            out = m(input_ids=seq)
            for _ in range(5):
                cache = out[name]
                assert cache is not None, key
                nxt = out.logits[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt], dim=1)
                out = m(input_ids=nxt, **{name: cache})
        tokens[key] = seq
    assert torch.equal(tokens["patched"], tokens["reference"])


def test_return_dict_false_keeps_the_tuple_layout():
    reference, model = tiny_llama(), patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert [type(x) for x in out] == [type(x) for x in ref]
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])  # the logits, where the unpatched model has them


def test_unpatch_keeps_config_edits_made_while_patched(tmp_path):
    model = patch(tiny_llama(), **EAGER)
    model.resize_token_embeddings(160)
    model.config.use_cache = False
    unpatch(model)
    assert model.config.vocab_size == 160 and model.config.use_cache is False
    ids, mask, labels = padded_batch(LENGTHS, L, vocab=160)
    ids[0, 0] = 150  # a token only the resized vocabulary has
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape[-1] == 160
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.vocab_size == 160


def test_deepcopy_of_a_patched_model_stays_patched_and_its_own():
    model = patch(tiny_llama(), **EAGER)
    twin = copy.deepcopy(model)
    assert is_patched(twin) and twin.config._attn_implementation == "sdpa"
    ids, mask, labels = padded_batch(LENGTHS, L)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    a = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    b = twin(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert not torch.allclose(a, b)
    twin.config.use_cache = False
    assert model.config.use_cache is True  # the copy's configs are its own


# --------------------------------------------------------------------------- bad input


def test_labels_of_another_shape_are_refused():
    model = patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    with pytest.raises(ValueError, match=r"labels have shape \(5, 13\) but the inputs are \(4, 13\)"):
        model(input_ids=ids, attention_mask=mask, labels=torch.cat([labels, labels[:1]]))


def test_an_empty_batch_is_refused():
    model = patch(tiny_llama(), **EAGER)
    with pytest.raises(ValueError, match="the batch is empty"):
        model(input_ids=torch.zeros(0, 5, dtype=torch.long), attention_mask=torch.zeros(0, 5))


def test_an_all_padding_batch_is_the_unpatched_answer():
    reference, model = tiny_llama(), patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch([0, 0], 5)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert math.isnan(ref.loss.item()) and math.isnan(out.loss.item())
    assert out.logits.shape == (2, 5, 128) and out.logits.abs().sum() == 0
    n_items = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=3).loss
    assert n_items.item() == 0.0  # gradient accumulation: zero tokens add zero
    n_items.backward()


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"], ids=["plain-head", "model-own-head"])
def test_logits_to_keep_is_packed_and_exact(model_type):
    """TRL's GRPO/RLOO ask for the last k columns' logits of a left+right padded batch."""
    reference = tiny_llama() if model_type == "llama" else _tiny(model_type)
    model = patch(copy.deepcopy(reference), **EAGER)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    vocab = reference.config.vocab_size
    ids, mask, _ = padded_batch([9, 4, 12], 12, vocab=vocab)
    mask[0, :2] = 0  # left padding in one row, right padding in the others
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=6, use_cache=False).logits
        ref = reference(input_ids=ids, attention_mask=mask, logits_to_keep=6, use_cache=False).logits
    assert seen == [torch.Size([1, int(mask.sum())])]  # packed
    assert out.shape == ref.shape == (3, 6, vocab)
    real = mask[:, -6:].bool()
    assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5)
    assert out[~real].abs().sum() == 0


# --------------------------------------------------------------------------- found by an adversarial review


def test_a_loss_function_set_on_the_model_is_the_loss():
    """transformers' own hook (model.loss_function = ...), before or after patch."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def smoothed(logits, labels, vocab_size, **kwargs):
        logits = logits.float()
        logits = logits - 0.1 * logits.detach().mean()  # anything but plain cross-entropy
        return ForCausalLMLoss(logits * 0.9, labels, vocab_size, **kwargs)

    reference = tiny_llama()
    reference.loss_function = smoothed
    ids, mask, labels = padded_batch(LENGTHS, L)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    for first in ("patch", "hook"):
        model = tiny_llama()
        if first == "patch":
            patch(model, **EAGER)
            model.loss_function = smoothed
        else:
            model.loss_function = smoothed
            patch(model, **EAGER)
        assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss, expected)


@pytest.mark.parametrize("keep_logits", [False, True], ids=["fused", "own-loss"])
def test_ignore_index_passed_to_the_forward(keep_logits):
    reference, model = tiny_llama(), patch(tiny_llama(), compile=False, keep_logits=keep_logits)
    ids, mask, _ = padded_batch(LENGTHS, L)
    labels = ids.masked_fill(mask == 0, 0)  # 0 marks "no target" here
    labels[:, :2] = 0
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels, ignore_index=0).loss
    out = model(input_ids=ids, attention_mask=mask, labels=labels, ignore_index=0).loss
    assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_a_sliding_window_edited_after_patch_is_the_window():
    reference = _tiny("mistral")
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    ids, mask, _ = padded_batch([11, 5, 16, 1], 16, vocab=reference.config.vocab_size)
    real = mask.bool()
    for window in (3, None, 6):
        reference.config.sliding_window = window
        model.config.sliding_window = window
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
            ref = reference(input_ids=ids, attention_mask=mask).logits
        assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5, msg=f"window {window}")


def test_output_attentions_from_the_config():
    reference, model = tiny_llama(attn="eager"), patch(tiny_llama(attn="eager"), **EAGER)
    for m in (reference, model):
        m.config.output_attentions = True
    ids, mask, labels = padded_batch(LENGTHS, L)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(out.attentions) == len(ref.attentions) == 2
    assert_close(out.attentions[0], ref.attentions[0])


def _neftune_peak(model) -> float:
    """The largest noise NEFTune's hook adds to the embedding output in one forward."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = 5.0
    embeddings.register_forward_hook(neftune_post_forward_hook)
    seen = {}
    embeddings.register_forward_pre_hook(lambda m, args: seen.update(ids=args[0]))
    embeddings.register_forward_hook(
        lambda m, args, out: seen.update(peak=(out - m.weight[seen["ids"]]).abs().max())
    )
    ids, mask, labels = padded_batch([24, 24, 24, 24], 24)
    torch.manual_seed(0)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    return seen["peak"].item()


def test_neftune_noise_has_the_unpatched_scale():
    """Trainer's neftune_noise_alpha scales noise by 1 / sqrt(L * H) of the embedding output."""
    expected = 5.0 / math.sqrt(24 * 64)  # uniform(-mag, mag) over 6k values: the peak is just under mag
    reference, patched = _neftune_peak(tiny_llama()), _neftune_peak(patch(tiny_llama(), **EAGER))
    assert 0.99 * expected < reference <= expected and 0.99 * expected < patched <= expected


def test_patch_of_a_torch_compiled_model():
    reference = tiny_llama()
    compiled = torch.compile(tiny_llama(), backend="aot_eager")
    assert patch(compiled, compile=False) is compiled and is_patched(compiled)
    ids, mask, labels = padded_batch(LENGTHS, L)
    assert_close(
        compiled(input_ids=ids, attention_mask=mask, labels=labels).loss,
        reference(input_ids=ids, attention_mask=mask, labels=labels).loss,
    )


def test_logits_to_keep_longer_than_the_rows():
    reference, model = tiny_llama(), patch(tiny_llama(), **EAGER)
    ids, mask, _ = padded_batch([9, 4], 9)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=12, use_cache=False).logits
        ref = reference(input_ids=ids, attention_mask=mask, logits_to_keep=12, use_cache=False).logits
    assert out.shape == ref.shape == (2, 9, 128)
    assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-5)


def test_float_labels_are_refused_clearly():
    model = patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        model(input_ids=ids, attention_mask=mask, labels=labels.float())


def _tiny_gemma3_with_images():
    from tiny_models import tiny_config
    from transformers import Gemma3ForConditionalGeneration

    config = tiny_config("gemma3")
    config.image_token_id, config.mm_tokens_per_image = 250, 4
    config.boi_token_index, config.eoi_token_index = 251, 252
    config.vision_config.image_size, config.vision_config.patch_size = 32, 8  # 4 image tokens
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).train()
    ids, mask, labels = padded_batch([14, 11, 9], 14, vocab=200)
    ids[:, 1], ids[:, 2:6], ids[:, 6] = 251, 250, 252  # <boi> 4 x <image> <eoi>
    token_types = (ids == 250).long()
    return (
        model,
        dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(token_types == 1, -100)),
        token_types,
    )


@pytest.mark.parametrize("inputs", ["pixel_values", "token_type_ids"])
def test_a_vlm_batch_with_images_is_exact(inputs):
    """Image tokens see each other (gemma3's token-type mask) and the vision tower keeps its own
    attention: such a call runs unpacked, exactly; a text-only call of the same model packs."""
    reference, batch, token_types = _tiny_gemma3_with_images()
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    batch = dict(batch, token_type_ids=token_types)
    if inputs == "pixel_values":
        batch["pixel_values"] = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = reference(**batch)
    out = model(**batch)
    real = batch["attention_mask"].bool()
    assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- a second adversarial review


def test_shift_labels_given_by_the_caller_are_the_targets():
    """Trainer passes its own shift_labels under context parallelism: they, not labels, are the targets."""
    reference = tiny_llama()
    ids, mask, labels = padded_batch(LENGTHS, L)
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shift[:, ::3] = -100  # the caller's own targets differ from labels shifted
    for options in (EAGER, dict(EAGER, keep_logits=True)):
        model = patch(copy.deepcopy(reference), **options)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
        ref = reference(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
        assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_a_loss_function_of_its_own_sees_the_padded_batch():
    """A loss set on the model may average per row: it gets the (B, L) logits and labels it expects."""

    def per_row_mean(logits, labels, vocab_size, **kwargs):
        logits, labels = logits.float()[:, :-1], labels[:, 1:]
        tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return (tokens.sum(-1) / (labels != -100).sum(-1).clamp(min=1)).mean()

    reference = tiny_llama()
    reference.loss_function = per_row_mean
    model = patch(copy.deepcopy(reference), **EAGER)
    ids, mask, labels = padded_batch([7, 2, 13, 10], L)
    out, out_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_grads = _loss_and_grads(reference, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(out_grads, ref_grads)


def test_copies_of_a_layer_config_leave_the_model_config_alone():
    model = patch(tiny_llama(), **EAGER)
    view = model.model.layers[0].self_attn.config
    private = copy.copy(view)
    private.rms_norm_eps = 0.5
    assert model.config.rms_norm_eps != 0.5 and private._attn_implementation == "sdpa"
    AutoModelForCausalLM.from_config(view)  # transformers writes back the implementation it read
    assert model.config._attn_implementation == "sdpa"
    ids, mask, _ = padded_batch(LENGTHS, L)
    unpatch(model)
    model(input_ids=ids, attention_mask=mask)  # still runs as the unpatched model


def test_a_question_answering_head_is_refused():
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_config(tiny_llama().config)
    with pytest.raises(ValueError, match="question-answering head's span loss reads the padding"):
        patch(model)


def test_patching_again_with_other_options_is_refused():
    model = patch(tiny_llama(), compile=False)
    assert patch(model) is model  # defaults: nothing asked, nothing changes
    with pytest.raises(ValueError, match="already patched .*keep_logits=False"):
        patch(model, keep_logits=True)
    with pytest.raises(ValueError, match="already patched .*memory_budget=None"):
        patch(model, memory_budget=0.5)


def test_a_patched_model_loaded_by_torch_load_registers_its_attention(monkeypatch):
    """torch.save(model) then torch.load in a fresh process: nothing has registered "seqpack" there."""
    import io

    from transformers import AttentionInterface

    model = patch(tiny_llama(), **EAGER)
    ids, mask, labels = padded_batch(LENGTHS, L)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.delitem(AttentionInterface._global_mapping, attention.ATTN_NAME)  # as in a fresh process
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_close(loaded(input_ids=ids, attention_mask=mask, labels=labels).loss, expected)


def test_data_parallel_is_refused_clearly(monkeypatch):
    """The HF Trainer wraps a model in nn.DataParallel on several GPUs without torchrun. Its replicas
    would run the original module's weights: refused at the first replication (emulated on the CPU
    with torch's own replicate, the CUDA broadcast replaced by copies)."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(
        replicate,
        "_broadcast_coalesced_reshape",
        lambda tensors, devices, detach=False: [[t.detach().clone() for t in tensors] for _ in devices],
    )
    monkeypatch.setattr(replicate, "_get_device_index", lambda device, optional=False: 0)
    replicate.replicate(tiny_llama(), ["cpu", "cpu"])  # the unpatched model replicates
    model = patch(tiny_llama(), **EAGER)
    with pytest.raises(RuntimeError, match="cannot run under torch.nn.DataParallel"):
        replicate.replicate(model, ["cpu", "cpu"])
    unpatch(model)
    replicate.replicate(model, ["cpu", "cpu"])


def test_fewer_layers_run_after_a_config_edit():
    """Layer-dropping experiments lower config.num_hidden_layers (transformers runs that many):
    the layers left out need no mask, and bringing them back reads their windows again."""
    reference = _tiny("mistral")
    model = patch(copy.deepcopy(reference), compile=False, keep_logits=True)
    ids, mask, _ = padded_batch([11, 5, 16, 1], 16, vocab=reference.config.vocab_size)
    real = mask.bool()
    for depth in (1, reference.config.num_hidden_layers):
        reference.config.num_hidden_layers = model.config.num_hidden_layers = depth
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
            ref = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5, msg=f"{depth} layers")
