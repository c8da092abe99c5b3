"""The attention-sink kernel path (gpt-oss) against gpt-oss's own eager attention, on the CPU.

``attention._VarlenWithSinks`` runs torch's varlen FlashAttention ops and adds the sinks around
them: the output scaled by ``sigmoid(lse - sink)`` and a backward that reuses the kernel's own
(see its docstring for why that is exact). The ops are CUDA-only, so here they are replaced by a
float64 stand-in with the same contract: the forward returns (out, lse, rng state), the backward is
the textbook FlashAttention backward that reads ``D = rowsum(dO * out)`` from the ``out`` it is
given, as the kernel does. This checks the derivation; tests/test_gpu.py checks the real kernels.
"""

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from seqpack import attention


def _allowed(n, causal, window, device):
    pos = torch.arange(n, device=device)
    allowed = (
        pos[None, :] <= pos[:, None] if (causal or window[1] == 0) else torch.ones(n, n, dtype=torch.bool)
    )
    if window[0] >= 0:
        allowed = allowed & (pos[:, None] - pos[None, :] <= window[0])
    return allowed


def _stand_in_forward(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal, scale, window_size, enable_gqa=False):
    out, lse = torch.zeros_like(q), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float64)
    groups = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~_allowed(e - s, is_causal, window_size, q.device), float("-inf"))
        lse[:, s:e] = torch.logsumexp(scores, -1)
        out[s:e] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
    return out, lse, torch.zeros(2)


def _stand_in_backward(
    dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, rng, *, scale, window_size
):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    groups = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        do, o = dout[s:e].transpose(0, 1), out[s:e].transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~_allowed(e - s, is_causal, window_size, q.device), float("-inf"))
        p = torch.exp(scores - lse[:, s:e, None])  # (H, n, n)
        dp = do @ vs.transpose(1, 2)
        ds = p * (dp - (do * o).sum(-1, keepdim=True))  # D from the out given, as the kernel reads it
        dq[s:e] = (ds @ ks * scale).transpose(0, 1)
        dks, dvs = (ds.transpose(1, 2) @ qs * scale), p.transpose(1, 2) @ do  # (Hq, n, D)
        dk[s:e] = dks.unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
        dv[s:e] = dvs.unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
    return dq, dk, dv


class _Module(torch.nn.Module):  # what gpt-oss's eager attention reads off its module
    def __init__(self, sinks, groups):
        super().__init__()
        self.sinks, self.num_key_value_groups = sinks, groups


@pytest.mark.parametrize("sink_scale", [1.0, 30.0], ids=["sinks", "far-sinks"])
@pytest.mark.parametrize("window", [(-1, 0), (5, 0)], ids=["causal", "sliding"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_sinks_match_eager_values_and_gradients(monkeypatch, window, kv_heads, sink_scale):
    monkeypatch.setattr(attention, "_varlen_ops", lambda: (_stand_in_forward, _stand_in_backward))
    g = torch.Generator().manual_seed(0)
    lengths, heads, dim, scale = [7, 1, 12, 4], 4, 8, 8**-0.5
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(total, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float64)
    # far-sinks: sinks of +-30 around the log-sum-exp, where 1 - sigmoid(lse - sink) would cancel
    sinks = torch.randn(heads, generator=g, dtype=torch.float64) * sink_scale
    upstream = torch.randn(total, heads, dim, generator=g, dtype=torch.float64)

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v, sinks)]

    q1, k1, v1, s1 = leaves()
    out = attention._VarlenWithSinks.apply(q1, k1, v1, s1, cu, max(lengths), scale, window, kv_heads != heads)
    (out * upstream).sum().backward()

    q2, k2, v2, s2 = leaves()
    module, outs = _Module(s2, heads // kv_heads).eval(), []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        allowed = _allowed(e - s, True, window, q.device)
        mask = torch.zeros(e - s, e - s, dtype=torch.float64).masked_fill(
            ~allowed, torch.finfo(torch.float64).min
        )
        per_seq = [t[s:e].transpose(0, 1)[None] for t in (q2, k2, v2)]
        outs.append(eager_attention_forward(module, *per_seq, mask[None, None], scaling=scale)[0][0])
    ref = torch.cat(outs)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref)
    for name, a, b in zip("qkv", (q1, k1, v1), (q2, k2, v2), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"d{name}: {m}")
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=0)  # relative, per head: tiny ones too
    assert s1.grad.abs().min() > 0  # the sinks do get a gradient
