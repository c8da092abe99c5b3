"""The fused linear cross-entropy and when patched models skip the logits."""

import pytest
import torch
import transformers
from helpers import grads, padded_batch, tiny_llama
from packaging.version import Version
from torch.testing import assert_close
from transformers import Gemma2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from seqpack import loss as seqloss
from seqpack import patch
from seqpack.support import fused_loss_blocker


@pytest.mark.parametrize("chunk", [3, 64], ids=["chunked", "one-chunk"])
@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 1.5], ids=["uncapped", "capped"])
def test_linear_cross_entropy_matches_plain(monkeypatch, chunk, num_items, bias, softcap):
    monkeypatch.setattr(seqloss, "_chunk_size", lambda vocab: chunk)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True) if bias else None
    targets = torch.tensor([1, 2, -100, 4, 5, 10, -100, 0, 3, 3])
    fused = seqloss.linear_cross_entropy(
        hidden, weight, targets, b, num_items_in_batch=num_items, softcap=softcap
    )
    fused.backward()
    fused_grads = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    logits = torch.nn.functional.linear(hidden, weight, b)
    if softcap is not None:  # logits of about 3: the cap bends them
        logits = torch.tanh(logits / softcap) * softcap
    reduction = "mean" if num_items is None else "sum"
    plain = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
    plain = plain if num_items is None else plain / num_items
    plain.backward()
    assert_close(fused, plain)
    for got, want in zip(fused_grads, [t.grad for t in (hidden, weight, b) if t is not None], strict=True):
        assert_close(got, want)


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    seqloss.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, -100])).backward()
    assert hidden.grad is not None and weight.grad is None


def test_training_with_labels_skips_logits_and_matches_unpatched():
    reference, patched = tiny_llama(), patch(tiny_llama(), compile=False)
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=50)
    ref.loss.backward()
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=50)
    out.loss.backward()
    assert out.logits is None
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref_grads, new_grads = grads(reference), grads(patched)
    for name in ref_grads:
        assert_close(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("hook", ["backward", "backward_pre"])
def test_a_backward_hook_on_the_head_keeps_the_models_own_loss(hook):
    """A full backward hook on lm_head (here halving the logits' gradient) needs the logits it
    hooks: the model's own head and loss run, and the gradients equal the unpatched model's
    (adversarial review: the fused loss skipped the hook)."""
    reference, patched = tiny_llama(), patch(tiny_llama(), compile=False)
    for model in (reference, patched):
        head = model.get_output_embeddings()
        if hook == "backward":
            head.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0] * 0.5,))
        else:
            head.register_full_backward_pre_hook(lambda m, grad_out: (grad_out[0] * 0.5,))
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    _assert_same_loss_and_grads(reference, patched, ref, out)


def test_logits_come_back_when_a_caller_needs_them():
    ids, mask, labels = padded_batch([7, 3], 7)
    model = patch(tiny_llama(), compile=False)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 7, 128)  # no labels
    with torch.no_grad():
        assert model.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits is not None  # eval
    kept = patch(tiny_llama(), compile=False, keep_logits=True)
    assert kept(input_ids=ids, attention_mask=mask, labels=labels).logits is not None  # the option


@pytest.mark.parametrize("release", ["plain", "capping", "capping, asked for a cap", "without the cap"])
def test_liger_kernel_is_used_when_installed(monkeypatch, release):
    """A CPU stand-in for liger-kernel's fused linear cross-entropy: the arguments it gets. A cap is
    handed on to a release that takes ``softcap``; a release without it is not used for a cap."""
    import sys
    import types

    calls = []
    softcap = 2.0 if release in ("capping, asked for a cap", "without the cap") else None

    def capping(input, weight, target, bias=None, ignore_index=-100, reduction="mean", softcap=None):
        calls.append(dict(shape=tuple(input.shape), reduction=reduction, softcap=softcap))
        logits = torch.nn.functional.linear(input, weight, bias).float()
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(
            logits, target, ignore_index=ignore_index, reduction=reduction
        )

    def uncapping(input, weight, target, bias=None, ignore_index=-100, reduction="mean"):
        return capping(input, weight, target, bias, ignore_index, reduction)

    liger_fused_linear_cross_entropy = capping if release.startswith("capping") else uncapping
    liger_fused_linear_cross_entropy._seqpack_stand_in = True
    functional = types.SimpleNamespace(liger_fused_linear_cross_entropy=liger_fused_linear_cross_entropy)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(
        sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")
    )
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    seqloss._liger_loss.cache_clear()
    try:
        hidden, weight = torch.randn(6, 8), torch.randn(11, 8)
        targets = torch.tensor([1, 2, -100, 4, 5, 10])
        got = seqloss.linear_cross_entropy(hidden, weight, targets, num_items_in_batch=4, softcap=softcap)
    finally:
        seqloss._liger_loss.cache_clear()
    if release == "without the cap":
        assert calls == []
    else:
        assert calls == [dict(shape=(6, 8), reduction="sum", softcap=softcap)]
    logits = hidden @ weight.T
    logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / 4
    assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["uncapped", "capped"])
def test_fusable_chunk_equals_the_eager_chunk(dtype, softcap):
    """The per-chunk softmax/gradient compiled on CUDA is the same function as the CPU path."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 37, generator=g) * 4).to(dtype)
    targets = torch.tensor([1, -100, 36, 0, 5, 5, -100, 2, 3])
    loss_eager, grad_eager = seqloss._chunk_eager(logits.clone(), targets, -100, True, softcap)
    loss_fusable, grad_fusable = seqloss._chunk_fusable(logits, targets, -100, softcap)
    assert grad_fusable.dtype == dtype and grad_eager.dtype == dtype
    assert_close(loss_fusable, loss_eager)
    assert_close(grad_fusable, grad_eager)
    assert grad_fusable[1].abs().sum() == 0 and grad_fusable[6].abs().sum() == 0  # ignored rows


def _assert_same_loss_and_grads(reference, patched, ref, out):
    """The patched output's loss, and every parameter's gradient after backward, equal the
    unpatched model's."""
    ref.loss.backward()
    out.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    want, got = grads(reference), grads(patched)
    assert want.keys() == got.keys()
    for name, grad in want.items():
        assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("asked", ["no", "call", "config"])
def test_router_loss_fused_only_when_not_asked_for(asked):
    """Mixture-of-experts forwards add a load-balancing loss only ``if output_router_logits``:
    without it the head and loss fuse (logits None); asked for (in the call or the config), the
    model's own loss runs, aux loss included. Both equal the unpatched model's loss and gradients."""
    import copy

    from tiny_models import build_tiny_model

    reference = build_tiny_model("qwen3_moe").train()
    reference.config.output_router_logits = asked == "config"
    patched = patch(copy.deepcopy(reference), compile=False)
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13, vocab=reference.config.vocab_size)
    extra = {"output_router_logits": True} if asked == "call" else {}
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    assert (out.logits is None) == (asked == "no")
    if asked != "no":
        assert ref.aux_loss is not None and out.aux_loss is not None
        assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    _assert_same_loss_and_grads(reference, patched, ref, out)


def test_router_loss_asked_for_in_a_multimodal_text_config_is_kept():
    """A multimodal MoE forward (Qwen3-VL-MoE) reads ``output_router_logits`` from its text
    config: set there, the model's own loss runs, aux loss included (adversarial review)."""
    import copy

    from tiny_vlms import vlm_case

    case = vlm_case("qwen3_vl_moe")
    reference = case.model.train()
    reference.config.get_text_config().output_router_logits = True
    reference.config.get_text_config().router_aux_loss_coef = 0.5  # so a dropped aux loss shows
    patched = patch(copy.deepcopy(reference), compile=False)
    text = {k: v for k, v in case.batch.items() if k in ("input_ids", "attention_mask", "labels")}
    ref, out = reference(**text), patched(**text)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert (out.aux_loss is None) == (ref.aux_loss is None)
    if Version(transformers.__version__) < Version("5.24"):
        # 5.17's forward reads the flag from the call only: no aux loss on either side (above)
        assert ref.aux_loss is None
        return
    assert out.logits is not None and out.aux_loss is not None
    assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


CAPPED = ["gemma2", "gemma3_text", "gemma4_text", "beam", "vaultgemma", "nanochat"]


@pytest.mark.parametrize("cap", [None, 2.0], ids=["uncapped", "capped"])
@pytest.mark.parametrize("model_type", CAPPED)
def test_capped_logits_fuse_with_their_cap(model_type, cap):
    """Gemma 2/3/4, VaultGemma, nanochat and Beam cap their logits ``if
    self.config.final_logit_softcapping is not None`` (Gemma 2's published configs: 30; its 256k
    vocabulary's logits were materialised before). The fused loss applies the cap read from the
    config at each call, set before or after patch: logits None, loss and gradients equal the
    unpatched model's, and ``logits_to_keep`` logits (GRPO's) are capped as the model caps them."""
    import copy

    from tiny_models import build_tiny_model
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    reference = build_tiny_model(model_type).train()
    reference.config.final_logit_softcapping = None
    patched = patch(copy.deepcopy(reference), compile=False)
    for model in (reference, patched):
        model.config.final_logit_softcapping = cap
    vocab = reference.config.vocab_size
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13, vocab=vocab)
    with torch.no_grad():  # logits of about 5, so a cap of 2 bends them
        reference.get_output_embeddings().weight.mul_(8)
        patched.get_output_embeddings().weight.mul_(8)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    if cap is not None:  # the cap changes the loss: a fused loss without it would fail below
        reference.config.final_logit_softcapping = None
        with torch.no_grad():
            uncapped = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        reference.config.final_logit_softcapping = cap
        assert abs(uncapped - ref.loss) > 0.01 * ref.loss.abs(), (float(uncapped), float(ref.loss))
    _assert_same_loss_and_grads(reference, patched, ref, out)
    kept = dict(input_ids=ids, attention_mask=mask, logits_to_keep=4)
    with torch.no_grad():
        want, got = reference(**kept).logits, patched(**kept).logits
    real = mask[:, -4:].bool()
    assert got.dtype == want.dtype
    assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    if cap is not None:
        assert want.abs().max() <= cap


class _CapForms:
    """Gemma 2 forwards capping their logits in the standard form and in others (adversarial review)."""

    class StandardForCausalLM(Gemma2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    class TanhPlusOneForCausalLM(Gemma2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits) + 1
                logits = logits * self.config.final_logit_softcapping
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    class CapAfterTheLossForCausalLM(Gemma2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    class CappedTwiceForCausalLM(Gemma2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    class CapOnACopyForCausalLM(Gemma2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            raw = self.lm_head(hidden_states)
            logits = raw
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            loss = None
            if labels is not None:
                loss = self.loss_function(raw, labels, self.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("form", ["Standard", "TanhPlusOne", "CapAfterTheLoss", "CappedTwice", "CapOnACopy"])
def test_only_the_standard_cap_on_the_heads_output_fuses(form):
    """The cap fuses only as transformers writes it: the one gated block, the three lines, right
    after the head's output is assigned and on that name. Any other form or place (capping after
    the loss, twice, a copy the loss does not read) keeps the model's own loss. Each form's own
    loss and gradients are matched either way, with logits large enough for the cap to bend."""
    import copy

    from tiny_models import build_tiny_model

    cls = getattr(_CapForms, f"{form}ForCausalLM")
    config = build_tiny_model("gemma2").config
    config.final_logit_softcapping = 2.0
    torch.manual_seed(0)
    reference = cls(config).train()
    with torch.no_grad():
        reference.lm_head.weight.mul_(8)
    assert fused_loss_blocker(cls, "lm_head", uncapped=True) is None  # the gate never runs
    patched = patch(copy.deepcopy(reference), compile=False)
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13, vocab=config.vocab_size)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert (out.logits is None) == (form == "Standard"), fused_loss_blocker(cls, "lm_head")
    _assert_same_loss_and_grads(reference, patched, ref, out)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "afmoe"])
@pytest.mark.parametrize("asked", [False, True], ids=["no_router_logits", "router_logits"])
def test_router_logits_passed_on_to_the_output_fuse(model_type, asked):
    """A mixture-of-experts forward that only passes the backbone's router logits on to its output
    (``router_logits=outputs.router_logits``, no loss from them) fuses; asked for, the router
    logits come back as the unpatched model's (B * L, E) on real tokens, with the loss fused and
    with ``logits_to_keep``."""
    import copy

    from tiny_models import build_tiny_model
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    reference = build_tiny_model(model_type).train()
    patched = patch(copy.deepcopy(reference), compile=False)
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13, vocab=reference.config.vocab_size)
    extra = {"output_router_logits": True} if asked else {}
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    assert out.logits is None
    real = mask.flatten().bool()
    assert (out.get("router_logits") is None) == (ref.get("router_logits") is None)
    for got, want in zip(out.get("router_logits") or (), ref.get("router_logits") or (), strict=True):
        assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    _assert_same_loss_and_grads(reference, patched, ref, out)
    kept = dict(input_ids=ids, attention_mask=mask, logits_to_keep=4, use_cache=False, **extra)
    with torch.no_grad():
        want, got = reference.eval()(**kept), patched.eval()(**kept)
    assert list(got.keys())[0] == "logits"
    assert_close(got.logits[mask[:, -4:].bool()], want.logits[mask[:, -4:].bool()], rtol=1e-4, atol=1e-5)
    assert (got.get("router_logits") is None) == (want.get("router_logits") is None)
    if asked and Version(transformers.__version__) >= Version("5.24"):  # 5.17's forwards return none
        assert want.get("router_logits") is not None
    for g, w in zip(got.get("router_logits") or (), want.get("router_logits") or (), strict=True):
        assert_close(g[real], w[real], rtol=1e-5, atol=1e-6)
