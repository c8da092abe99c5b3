"""Hybrid mixers with their fast kernels installed: seqpack hands the kernels the packing metadata.

flash-linear-attention, causal-conv1d and mamba-ssm need a GPU, so CPU stand-ins take their place
here: packages of the same names and signatures, put in ``sys.modules`` before transformers
imports a model file (it picks each kernel then, once). A stand-in records what it is handed and
computes on transformers' own PyTorch reference, one sequence at a time where it gets
``cu_seqlens`` / ``seq_idx``, as the real kernels do. Each check runs in a fresh interpreter (the
stand-ins must be there before transformers' model files are first imported): this file is also
the script those interpreters run.

Checked: a mixer whose kernels are all installed runs on the packed sequence itself (batch 1, the
packing's ``cu_seqlens`` and ``seq_idx``), with logits, loss and gradients equal to the unpatched
model's on the padded batch and to each sequence run alone (right and left padding; the loss
and gradients on right padding, where the padded model's loss is the truth); with one of its kernels missing it
runs on the rows layout (the fallback ignores the metadata), equally exact.
"""

from __future__ import annotations

import copy
import importlib.machinery
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
LENGTHS = [11, 5, 16, 1]
CALLS: list[dict] = []  # what the stand-ins were handed, in order


# --------------------------------------------------------------------------- the stand-ins


def _reference_rule():
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return modeling_qwen3_5.torch_chunk_gated_delta_rule.__wrapped__  # the PyTorch fallback itself


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None,
):  # fmt: skip
    """flash-linear-attention's signature: (B, T, H, D) inputs; with ``cu_seqlens``, B == 1."""
    CALLS.append(
        {
            "kernel": "gdn",
            "batch": q.shape[0],
            "cu_seqlens": None if cu_seqlens is None else cu_seqlens.tolist(),
        }
    )
    rule = _reference_rule()
    args = {"use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, "initial_state": initial_state}
    assert scale is None
    if cu_seqlens is None:  # a padded batch, or generation's prefill (a cache: the final state too)
        return rule(q, k, v, g=g, beta=beta, output_final_state=output_final_state, **args)
    assert q.shape[0] == 1, "cu_seqlens with a batch of more than one row"
    lengths = cu_seqlens.diff().tolist()
    assert min(lengths) > 0, (
        f"an empty sequence in cu_seqlens {cu_seqlens.tolist()} (fla <= 0.5.0 skips what follows)"
    )
    assert initial_state is None and not output_final_state, "a cache in a packed training forward"
    bounds = cu_seqlens.tolist()
    pieces = [
        rule(*(x[:, a:b] for x in (q, k, v)), g=g[:, a:b], beta=beta[:, a:b], **args)[0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=False)
    ]
    return torch.cat(pieces, dim=1), None


def fused_recurrent_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
):  # fmt: skip
    raise AssertionError("the one-token recurrent step ran in a training forward")


def causal_conv1d_fn(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
    final_states_out=None, activation=None,
):  # fmt: skip
    """causal-conv1d's signature: x (B, C, L); ``seq_idx`` (B, L) int32 needs channel-last x."""
    CALLS.append(
        {"kernel": "conv", "batch": x.shape[0], "seq_idx": None if seq_idx is None else seq_idx.tolist()}
    )
    assert initial_states is None and not return_final_states

    def conv(piece):
        out = F.conv1d(piece, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])
        out = out[..., : piece.shape[-1]]
        return F.silu(out) if activation in ("silu", "swish") else out

    if seq_idx is None:
        return conv(x)
    channel_last = x.stride(1) == 1 and x.stride(2) > 1  # causal-conv1d's own check
    assert x.shape[0] == 1 and channel_last, (
        f"causal-conv1d takes seq_idx with channel-last x only {x.stride()}"
    )
    assert seq_idx.dtype == torch.int32 and seq_idx.shape == (1, x.shape[-1])
    _, counts = torch.unique_consecutive(seq_idx[0], return_counts=True)
    return torch.cat([conv(p) for p in torch.split(x, counts.tolist(), dim=-1)], dim=-1)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    raise AssertionError("the one-token convolution step ran in a training forward")


def _package(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install(packages) -> None:
    """Put the stand-ins of ``packages`` ("fla", "causal_conv1d") where an import finds them."""
    assert "transformers.models.qwen3_5" not in sys.modules, "install before transformers' model files"
    if "fla" in packages:
        rules = {"chunk_gated_delta_rule": chunk_gated_delta_rule,
                 "fused_recurrent_gated_delta_rule": fused_recurrent_gated_delta_rule}  # fmt: skip
        fla = _package("fla", **rules)
        fla.ops = _package("fla.ops")
        fla.ops.gated_delta_rule = _package("fla.ops.gated_delta_rule", **rules)
    if "causal_conv1d" in packages:
        _package(
            "causal_conv1d", causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update
        )


# --------------------------------------------------------------------------- one check, in a fresh interpreter


def _check(model_type: str, packed: bool, compile_layers: bool, checkpointing: bool) -> dict:
    sys.path.insert(0, HERE)
    from helpers import enable_checkpointing, grads, padded_batch, per_sequence_logits
    from tiny_models import build_tiny_model
    from torch.testing import assert_close

    from seqpack import mixers, patch
    from seqpack.support import mixer_reads_packing

    reference = build_tiny_model(model_type).train()
    model = patch(copy.deepcopy(reference), compile=compile_layers, keep_logits=True)
    wrapped = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), mixers.MixerForward)]
    assert wrapped, "no sequence mixer was wrapped"
    assert all(mixer_reads_packing(type(m)) == packed for m in wrapped), [type(m).__name__ for m in wrapped]
    if checkpointing:
        for m in (reference, model):
            enable_checkpointing(m, use_reentrant=False)
    cu_seqlens = torch.tensor([0, *LENGTHS]).cumsum(0).tolist()
    seq_idx = [[i for i, n in enumerate(LENGTHS) for _ in range(n)]]
    kernels = set()
    for left in (False, True):
        ids, mask, labels = padded_batch(LENGTHS, 16, left=left, vocab=200)
        for m in (reference, model):
            m.zero_grad()
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        expected.loss.backward()
        del CALLS[:]
        got = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        got.loss.backward()
        assert CALLS, "no stand-in kernel was called"
        for call in CALLS:  # the forward's calls, and a checkpoint replay's in the backward
            kernels.add(call["kernel"])
            if packed:
                assert call["batch"] == 1, call
                assert call.get("cu_seqlens", cu_seqlens) == cu_seqlens, call
                assert call.get("seq_idx", seq_idx) == seq_idx, call
            else:  # the rows layout: one row a sequence, no metadata
                assert (
                    call["batch"] == len(LENGTHS) and not call.get("cu_seqlens") and not call.get("seq_idx")
                ), call
        real = mask.bool()
        assert_close(got.logits[real], expected.logits[real], rtol=1e-4, atol=2e-4)
        truth = per_sequence_logits(reference, ids, mask)
        assert_close(got.logits[real], torch.cat(truth), rtol=1e-4, atol=2e-4)
        if left:  # the padded model's loss reads a pad token's logits for each first token: not the truth
            continue
        assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
        want, have = grads(reference), grads(model)
        assert want and have.keys() == want.keys()
        for name in want:
            assert_close(have[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    for lengths in ([5, 0, 3], [1], [7]):  # an all-padding row; one token; one sequence
        ids, mask, _ = padded_batch(lengths, 8, vocab=200)
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            del CALLS[:]
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert CALLS, "no stand-in kernel was called"
        real = mask.bool()
        assert_close(got[real], expected[real], rtol=1e-4, atol=2e-4)
        if packed and len(lengths) == 1:  # one sequence: the kernels' plain call
            assert all(c["batch"] == 1 and not c.get("cu_seqlens") and not c.get("seq_idx") for c in CALLS), (
                CALLS
            )
        elif packed:
            assert all(c.get("cu_seqlens", [0, 5, 8]) == [0, 5, 8] for c in CALLS), CALLS
    return {"kernels": sorted(kernels), "mixers": sorted({type(m).__name__ for m in wrapped})}


def _run(packages, model_type, packed, compile_layers=False, checkpointing=False) -> dict:
    spec = json.dumps([list(packages), model_type, packed, compile_layers, checkpointing])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_next"])
def test_gated_deltanet_gets_cu_seqlens_and_seq_idx(model_type):
    result = _run(["fla", "causal_conv1d"], model_type, packed=True)
    assert result["kernels"] == ["conv", "gdn"], result


def test_short_convolution_gets_seq_idx():
    assert _run(["causal_conv1d"], "lfm2", packed=True)["kernels"] == ["conv"]


def test_compiled_and_checkpointed_layers_hand_the_kernels_the_metadata():
    """The default compile=True, and the backward's replay of each layer, get the metadata too."""
    result = _run(
        ["fla", "causal_conv1d"], "qwen3_5_text", packed=True, compile_layers=True, checkpointing=True
    )
    assert result["kernels"] == ["conv", "gdn"], result


@pytest.mark.parametrize("installed", [["fla"], ["causal_conv1d"]], ids=["fla-only", "causal_conv1d-only"])
def test_a_missing_kernel_keeps_the_rows_layout(installed):
    """Its PyTorch fallback would run across sequences: the mixer stays on the rows layout."""
    result = _run(installed, "qwen3_5_text", packed=False)
    assert result["kernels"] == (["gdn"] if installed == ["fla"] else ["conv"]), result


if __name__ == "__main__":
    packages, model_type, packed, compile_layers, checkpointing = json.loads(sys.argv[1])
    install(packages)
    torch.manual_seed(0)
    print(json.dumps(_check(model_type, packed, compile_layers, checkpointing)))
