"""Every AutoModelForCausalLM type of the installed transformers: exact, or refused. Never wrong.

For each type a tiny random fp32 model in train mode (dropout 0) sees a right-padded and a
left-padded batch. The truth is each sequence run alone without padding (the unpatched model).
A type is exact when the patched model's real-token logits and loss match that truth, and on the
default training path (``patch``'s defaults but compile: the fused loss wherever the head allows
it) its loss and every parameter gradient match the unpatched padded run. A type that
``patch`` refuses must name its model_type and a reason. Anything else fails.

``python tests/test_sweep.py`` prints the table the README shows.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import UNBUILDABLE, build_tiny_model, causal_lm_types  # noqa: E402

from seqpack import UnsupportedModelError, patch, unpatch  # noqa: E402

CORE = ("llama", "mistral", "qwen2", "qwen3_moe", "gemma2", "phi3", "gpt2", "mixtral")  # must be exact
LENGTHS = [11, 5, 16, 1]  # longer than the tiny sliding windows (8); a length-1 row
SEQ_LEN = 16


def _batch(vocab, left):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 200), (len(LENGTHS), SEQ_LEN), generator=g)
    mask = torch.zeros(len(LENGTHS), SEQ_LEN, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, SEQ_LEN - n :] = 1 if left else 0
        if not left:
            mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _truth(model, ids, mask):
    """Logits and summed loss of each sequence run alone."""
    logits, loss_sum, count = [], 0.0, 0
    with torch.no_grad():
        for row in range(ids.shape[0]):
            real = ids[row][mask[row].bool()][None]
            out = model(input_ids=real, use_cache=False).logits[0].float()
            logits.append(out)
            if real.shape[1] > 1:
                loss_sum += torch.nn.functional.cross_entropy(out[:-1], real[0, 1:], reduction="sum")
                count += real.shape[1] - 1
    return logits, loss_sum / count


def check_type(model_type: str) -> tuple[str, str]:
    """("exact" | "refused", detail). Raises AssertionError when patched outputs are wrong."""
    if model_type in UNBUILDABLE:
        return "skipped", UNBUILDABLE[model_type]
    model = build_tiny_model(model_type).train()
    vocab = model.get_input_embeddings().num_embeddings
    try:
        patch(model, compile=False, keep_logits=True)
    except UnsupportedModelError as err:
        assert repr(model.config.model_type) in str(err), str(err)
        return "refused", str(err).split(" exactly: ", 1)[-1].rstrip(".")
    for left in (False, True):
        ids, mask, labels = _batch(vocab, left)
        unpatch(model)
        truth, truth_loss = _truth(model, ids, mask)
        patch(model, compile=False, keep_logits=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        side = "left" if left else "right"
        for row, expected in enumerate(truth):
            got = out.logits[row][mask[row].bool()].float()
            assert_close(
                got, expected, rtol=1e-4, atol=2e-4, msg=lambda m, r=row, s=side: f"{s} row {r}: {m}"
            )
        assert_close(
            out.loss.float(), truth_loss.float(), rtol=1e-4, atol=1e-5, msg=lambda m, s=side: f"{s} loss: {m}"
        )
    _check_training_path(model, vocab)
    return "exact", ""


def _check_training_path(model, vocab):
    """The default training path: patch()'s defaults but compile (the fused loss wherever the
    model's head allows it), train mode, labels; loss and every parameter's gradient against the
    unpatched model on the same right-padded batch."""
    ids, mask, labels = _batch(vocab, left=False)
    unpatch(model)
    model.zero_grad()
    reference_out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    reference_out.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    patch(model, compile=False)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    patched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close(
        out.loss.float(), reference_out.loss.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"loss: {m}"
    )
    assert patched.keys() == reference.keys() and len(reference) > 0, set(patched) ^ set(reference)
    for name, grad in reference.items():
        assert_close(patched[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_type_is_exact_or_refused(model_type):
    verdict, detail = check_type(model_type)
    if verdict == "skipped":
        pytest.skip(detail)
    assert verdict in ("exact", "refused")
    if verdict == "refused":
        assert detail


def test_core_architectures_are_exact():
    for model_type in CORE:
        assert check_type(model_type)[0] == "exact", model_type


def main() -> None:
    import transformers

    rows = []
    for model_type in causal_lm_types():
        try:
            verdict, detail = check_type(model_type)
        except Exception as err:  # noqa: BLE001 -- the report lists failures instead of stopping
            verdict, detail = (
                "WRONG" if isinstance(err, AssertionError) else "CRASH",
                str(err).splitlines()[0][:200],
            )
        rows.append((model_type, verdict, detail))
        print(f"{model_type:28s} {verdict:8s} {detail}", flush=True)
    counts = {v: sum(1 for r in rows if r[1] == v) for v in ("exact", "refused", "skipped", "WRONG", "CRASH")}
    print(f"\ntransformers {transformers.__version__}, torch {torch.__version__}: {counts}")


if __name__ == "__main__":
    main()
