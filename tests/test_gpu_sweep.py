"""The GPU sweep: every AutoModelForCausalLM type of the installed transformers, bf16, on CUDA.

tests/test_sweep.py proves each accepted type exact in fp32 on the CPU, where the reference
attention runs. This file runs the same tiny models the way they train: on a CUDA GPU, in bf16,
with the default backend (``"auto"``: a varlen FlashAttention kernel) and the default options
(``keep_logits=False``, so training with labels takes the fused loss where the head allows it and
returns ``logits=None``). bf16 is never exact, so every check is the flash-attention rule: with
``error = ||x - truth|| / ||truth||`` over real tokens, the patched bf16 model's error against the
fp32 unpatched model (the truth) may be at most twice the unpatched bf16 model's error, plus a
floor::

    error(patched bf16) <= 2 * error(unpatched bf16) + floor

Per type, on a right-padded batch of odd lengths longer than the tiny sliding windows with a
length-1 row (``LENGTHS``):

1. train mode with labels: the loss; the gradient of every parameter, all concatenated; the worst
   single parameter tensor of the attention modules (what packing and the kernels touch: a wrong
   gradient of a small tensor such as gpt-oss's sinks vanishes in the concatenation; router and
   expert tensors are left out of this one, see below); and the patched model must give a
   gradient to exactly the parameters the unpatched bf16 model does;
2. eval mode without labels (``use_cache=False``): the real-token logits, right-padded against
   the fp32 padded run, and left-padded against the fp32 model run on each sequence alone (some
   absolute-position models shift their positions under left padding).

Types in ``UNBUILDABLE`` skip; types that ``patch`` refuses pass as "refused" when the message
names their model_type. ``test_compiled`` repeats the training checks with ``patch(model)`` fully
default (compiled layers) on a subset that covers the attention families, over three batch shapes
(one graph per layer must serve them all); it also asserts that the layers did compile.

Routed (mixture-of-experts) models: in bf16 a router's top-k can flip on a token whose two best
experts score within rounding, and then the patched and unpatched errors jump ~10x on that batch,
by luck, in either direction. Such types run three random batches (same weights, batch seeds 0,
1, 2) and the rule is applied to the median over the batches of
``patched_err / (2 * unpatched_err + floor)``, which must be <= 1. A real error cannot hide
behind the median: a packing error (one sequence seeing another, positions that do not restart,
a window or mask applied wrong) is systematic, a function of the batch layout that every batch
shares, so it fails all three batches and the median with them; a flip large enough to move these
whole-model errors is rare and random, so it spoils one batch of three, which the median drops.
(The gradient of a router or expert tensor alone is another matter: one flipped token of ~130
moves it by 10-30%, and on an H200 that happened in most batches, patched or unpatched; hence
the per-tensor check looks at attention tensors only.) Dense types run one batch and the rule is
strict (for the compiled subset: strict on each of the three shapes).

Run on an H100/H200::

    pytest -m gpu -s tests/test_gpu_sweep.py      # ~4 min on an H200; the table prints with -s
    python tests/test_gpu_sweep.py [TYPE ...]     # the table alone; a crash is a row, not a stop

With ``SEQPACK_SWEEP_OUT=PATH`` the table is also written to PATH. ``SEQPACK_SWEEP_COMPILED=all``
adds ``COMPILED_MORE`` to the compiled subset (~2 min more, left out by default). The private
``SEQPACK_SWEEP_DEVICE=cpu`` (for dry-running this harness on a machine without a GPU) runs
everything on the CPU, where "auto" is the reference attention and compiled layers are C++.
"""

from __future__ import annotations

import copy
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import UNBUILDABLE, build_tiny_model, causal_lm_types, tiny_config  # noqa: E402

from seqpack import UnsupportedModelError, patch  # noqa: E402

DEVICE = os.environ.get("SEQPACK_SWEEP_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LENGTHS = [37, 1, 64, 23, 9]  # longer than the tiny sliding windows (8), a length-1 row
# The compiled subset trains on three shapes (batch size, total and longest length all change).
COMPILED_LENGTHS = [LENGTHS, [5, 50, 2], [17, 33, 1, 8, 40, 12, 3]]
ROUTED_SEEDS = (0, 1, 2)

# Floors of the 2x rule. The loss is a mean over ~130 tokens, so its bf16 error is ~1e-5 and can
# land on the fp32 value by luck (unpatched error ~0) while the fused loss, reduced in another
# order, is a few ulps off: 1e-4, as in tests/test_gpu.py. Elsewhere 1e-6 only keeps identical
# outputs (0 <= 0) from being a 0/0. The worst attention tensor gets 5e-2: the bf16 error of a
# tensor of a few elements (a norm weight, the sinks) is noisy, and this check is there for the
# gross, O(1) error of one small tensor's gradient, which the concatenated gradient dilutes away.
FLOORS = {"loss": 1e-4, "attn grad": 5e-2}
FLOOR = 1e-6
# A tensor's gradient error is measured against its own norm, but never against less than a tenth
# of its fair share of the whole gradient's norm (sqrt(numel) x the whole gradient's RMS): a
# gradient that is ~0 in exact arithmetic (a key bias: softmax ignores a shift along the keys) or
# a small difference of large terms (diffllama's lambdas) is rounding noise in every dtype, and
# the ratio of two noises says nothing.
SHARE = 0.1

# The compiled subset: a type of each attention family, with config overrides where the tiny
# config hides the family's point (build_tiny_model gives head_dim 16 everywhere). Layers that run
# on the reference attention on a GPU (softcap on torch's kernel, sinks, head_dim > 256) take up to
# a minute a model to compile on an H200, and MLA's ~25 s a layer: those types get one layer.
_ONE_SLIDING_LAYER = {"num_hidden_layers": 1, "layer_types": ["sliding_attention"]}
COMPILED: dict[str, dict] = {
    "llama": {},  # GQA
    "mistral": {},  # sliding window
    "qwen3": {},  # QK-norm
    "qwen3_moe": {},  # MoE
    "phi3": {},  # fused qkv projection
    "gpt_neox": {},  # partial rotary (0.25)
    "cohere2": {},  # parallel block, alternating sliding/full layers
    "gemma3_text": {"head_dim": 256},  # alternating sliding/full layers, head_dim 256 in the kernel
    "gemma2": {**_ONE_SLIDING_LAYER, "head_dim": 512},  # logit softcapping; head_dim > 256: no kernel
    "deepseek_v3": {"num_hidden_layers": 1, "first_k_dense_replace": 0},  # MLA: v head dim 16, qk 24; MoE
    "gpt_oss": _ONE_SLIDING_LAYER,  # attention sinks, MoE
}
COMPILED_MORE: dict[str, dict] = {
    "mixtral": {},  # MoE
    "phi": {},  # partial rotary (0.5)
    "olmo2": {},  # QK-norm on the full projection
    "deepseek_v2": {},  # MLA
    "minicpm3": {},  # MLA, dense
    "glm4_moe_lite": {},  # MLA, MoE
}
if os.environ.get("SEQPACK_SWEEP_COMPILED") == "all":
    COMPILED = {**COMPILED_MORE, **COMPILED}

# Routing, detected two ways (they agree on every accepted type of transformers 5.24; either one
# suffices, so a family that names its router or its expert count differently is still caught):
# an expert count > 1 anywhere in the config (sub-configs and nested dicts such as dbrx's
# ffn_config included), or a module class named like a router or an expert bank.
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_ROUTING_CLASS = re.compile(r"Router|Experts|MoE|Moe|TopK|Topk|Gate$")


class Batch(NamedTuple):
    ids: torch.Tensor  # (B, L) int64, 0 at padding
    mask: torch.Tensor  # (B, L) int64 0/1
    labels: torch.Tensor  # (B, L) int64, -100 at padding


class Comparison(NamedTuple):
    patched: float  # ||patched bf16 - truth|| / ||truth||
    unpatched: float  # ||unpatched bf16 - truth|| / ||truth||
    floor: float
    where: str = ""  # the parameter, for the worst-tensor check

    @property
    def ratio(self) -> float:
        """<= 1 passes the 2x rule."""
        return self.patched / (2 * self.unpatched + self.floor)


@dataclass
class Row:
    """One type's line of the table."""

    model_type: str
    mode: str  # "eager" (patch(compile=False)) or "compiled" (patch() fully default)
    verdict: str = ""  # exact | refused | skipped | WRONG | CRASH
    detail: str = ""
    routed: bool = False
    head: str = ""  # "fused" when training with labels returned logits=None, else "logits"
    batches: list[dict[str, Comparison]] = field(default_factory=list)  # one per seed or shape
    seconds: float = 0.0
    error: BaseException | None = None


_TABLE: list[Row] = []


def _batch(vocab: int, lengths: list[int], *, left: bool, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, min(vocab, 200), (len(lengths), width), generator=g)  # (B, L)
    pos = torch.arange(width)[None]  # (1, L)
    n = torch.tensor(lengths)[:, None]  # (B, 1)
    real = pos >= width - n if left else pos < n  # (B, L) bool
    ids = ids.masked_fill(~real, 0)
    return Batch(ids.to(DEVICE), real.long().to(DEVICE), ids.masked_fill(~real, -100).to(DEVICE))


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.double(), truth.double()
    return ((x - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def _compare(patched: torch.Tensor, unpatched: torch.Tensor, truth: torch.Tensor, floor: float = FLOOR):
    return Comparison(_err(patched, truth), _err(unpatched, truth), floor)


def _worst_tensor(patched: dict, unpatched: dict, truth: dict, names: list[str]) -> Comparison:
    """The parameter among `names` whose gradient does worst under the 2x rule (see SHARE)."""
    whole = torch.cat([g.flatten() for g in truth.values()]).double()
    rms = (whole.norm() / whole.numel() ** 0.5).item()
    comparisons = []
    for name in names:
        ref = truth[name].double()
        scale = max(ref.norm().item(), SHARE * rms * ref.numel() ** 0.5)
        errors = [(grads[name].double() - ref).norm().item() / scale for grads in (patched, unpatched)]
        comparisons.append(Comparison(*errors, FLOORS["attn grad"], name))
    return max(comparisons, key=lambda c: c.ratio)


def _attention_parameters(model: torch.nn.Module) -> set[str]:
    """Names of the parameters inside the modules that mix tokens: attention modules (a class name
    containing "Attention"), or in a model without attention (Mamba), its sequence mixers."""
    for kind in ("Attention", "Mixer"):
        names = set()
        for prefix, module in model.named_modules():
            if kind in type(module).__name__:
                names |= {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()}
        if names:
            return names
    return set()


def is_routed(model: torch.nn.Module) -> bool:
    """Whether the model routes tokens to experts (top-k routing can flip in bf16)."""

    def counts(value) -> bool:
        if isinstance(value, dict):
            return any(
                (name in _EXPERT_COUNTS and isinstance(v, int) and v > 1) or counts(v)
                for name, v in value.items()
            )
        return False

    return counts(model.config.to_dict()) or any(
        _ROUTING_CLASS.search(type(m).__name__) for m in model.modules()
    )


def _build(model_type: str, overrides: dict) -> torch.nn.Module:
    """The fp32 truth on DEVICE, eval mode, every dropout 0."""
    if not overrides:
        model = build_tiny_model(model_type)
    else:  # build_tiny_model's recipe, with some config fields changed
        config = tiny_config(model_type)
        for name, value in overrides.items():
            setattr(config, name, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # The tiny configs already zero every *dropout*/*pdrop* float; a module-level p is zeroed too,
    # so train mode is deterministic and the three models compute the same function.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.to(DEVICE)


def _train_step(model, batch: Batch, **kwargs):
    """(loss, {name: fp32 grad}, logits-is-None) of one forward and backward in train mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), grads, out.logits is None


def _train_comparisons(fp32, base, patched, batch: Batch) -> tuple[dict[str, Comparison], bool]:
    """Loss and gradients against the fp32 unpatched run on the same padded batch.

    Right padding only: with left padding the unpatched model counts one extra prediction per row
    (the last pad predicting the first real token), which seqpack does not.
    """
    truth_loss, truth, _ = _train_step(fp32, batch, use_cache=False)
    base_loss, base_grads, _ = _train_step(base, batch, use_cache=False)
    loss, grads, fused = _train_step(patched, batch)
    assert torch.isfinite(loss), f"patched loss {loss}"
    assert grads.keys() == base_grads.keys(), (
        f"parameters with a gradient differ: only patched {sorted(grads.keys() - base_grads.keys())}, "
        f"only unpatched {sorted(base_grads.keys() - grads.keys())}"
    )
    assert truth, "the fp32 truth gives no parameter a gradient"
    names = [n for n in truth if n in grads]  # the fp32 run can reach an expert no bf16 token chose

    def flat(g):
        return torch.cat([g.get(n, torch.zeros_like(truth[n])).flatten() for n in truth])

    attention = [n for n in names if n in _attention_parameters(fp32)]
    assert attention, "no attention (or mixer) parameter has a gradient"
    checks = {
        "loss": _compare(loss, base_loss, truth_loss, FLOORS["loss"]),
        "grads": _compare(flat(grads), flat(base_grads), flat(truth)),
        "attn grad": _worst_tensor(grads, base_grads, truth, attention),
    }
    return checks, fused


@torch.no_grad()
def _logit_comparisons(fp32, base, patched, right: Batch, left: Batch) -> dict[str, Comparison]:
    """Real-token logits in eval mode: right padding against the fp32 padded run, left padding
    against the fp32 model run on each sequence alone (and the bf16 baseline likewise)."""
    for model in (fp32, base, patched):
        model.eval()

    def padded(model, batch):  # (N_real, V), real tokens row by row
        logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
        return logits[batch.mask.bool()].float()

    def alone(model, batch):  # (N_real, V), each sequence run unpadded
        rows = [batch.ids[r][batch.mask[r].bool()][None] for r in range(batch.ids.shape[0])]
        return torch.cat([model(input_ids=ids, use_cache=False).logits[0].float() for ids in rows])

    return {
        "logits": _compare(padded(patched, right), padded(base, right), padded(fp32, right)),
        "logits left": _compare(padded(patched, left), alone(base, left), alone(fp32, left)),
    }


def _judge(row: Row) -> None:
    """The 2x rule on every check: strict on each batch, or on the median for routed types."""
    for name in row.batches[0]:
        ratios = [batch[name].ratio for batch in row.batches]
        judged = statistics.median(ratios) if row.routed else max(ratios)
        seen = ", ".join(
            f"{c.patched:.2e} (unpatched {c.unpatched:.2e}{', ' + c.where if c.where else ''})"
            for c in (batch[name] for batch in row.batches)
        )
        rule = "median over batches of " if row.routed else ""
        assert judged <= 1, (
            f"{row.model_type} {name}: {rule}patched_err / (2 * unpatched_err + {row.batches[0][name].floor:g}) "
            f"= {judged:.2f} > 1; errors per batch: {seen}"
        )


def _shown(row: Row, name: str) -> Comparison | None:
    """The batch the verdict rests on: the median one for routed types, the worst one otherwise."""
    if not row.batches or name not in row.batches[0]:
        return None
    ranked = sorted((batch[name] for batch in row.batches), key=lambda c: c.ratio)
    return ranked[(len(ranked) - 1) // 2] if row.routed else ranked[-1]


def _patched_copy(fp32, row: Row, compile: bool):
    """A bf16 copy of fp32, patched (fully default but for compile); None when patch refuses."""
    model = copy.deepcopy(fp32).to(torch.bfloat16)
    try:
        return patch(model) if compile else patch(model, compile=False)
    except UnsupportedModelError as err:
        # The model's own model_type: AutoModelForCausalLM builds some types' text model ("llama4"
        # gives a Llama4ForCausalLM of model_type "llama4_text").
        model_type = fp32.config.model_type
        assert repr(model_type) in str(err), f"the refusal does not name {model_type!r}: {err}"
        row.verdict, row.detail = "refused", str(err).split(" exactly: ", 1)[-1].rstrip(".")
        return None


def _measure_eager(row: Row) -> None:
    if row.model_type in UNBUILDABLE:
        row.verdict, row.detail = "skipped", UNBUILDABLE[row.model_type]
        return
    fp32 = _build(row.model_type, {})
    patched = _patched_copy(fp32, row, compile=False)
    if patched is None:
        return
    base = copy.deepcopy(fp32).to(torch.bfloat16)
    row.routed = is_routed(fp32)
    vocab = fp32.get_input_embeddings().num_embeddings
    for seed in ROUTED_SEEDS if row.routed else ROUTED_SEEDS[:1]:
        right = _batch(vocab, LENGTHS, left=False, seed=seed)
        left = _batch(vocab, LENGTHS, left=True, seed=seed)
        checks, fused = _train_comparisons(fp32, base, patched, right)
        checks.update(_logit_comparisons(fp32, base, patched, right, left))
        row.head = "fused" if fused else "logits"
        row.batches.append(checks)
    _judge(row)
    row.verdict = "exact"


def _measure_compiled(row: Row) -> None:
    from torch._dynamo.utils import counters  # dynamo's own tally, as torch's tests read it

    # A fresh dynamo per type, as in a process that trains one model: transformers calls every
    # decoder layer through one shared function (GradientCheckpointingLayer's
    # forward_with_checkpointing), whose dynamo cache gains an entry per layer class, and past
    # torch._dynamo.config.recompile_limit (8) every later model's layers run eagerly, silently.
    torch._dynamo.reset()
    fp32 = _build(row.model_type, COMPILED[row.model_type])
    patched = _patched_copy(fp32, row, compile=True)
    assert patched is not None, (
        f"{row.model_type} is in the compiled subset but patch refuses it: {row.detail}"
    )
    base = copy.deepcopy(fp32).to(torch.bfloat16)
    row.routed = is_routed(fp32)
    vocab = fp32.get_input_embeddings().num_embeddings
    graphs = counters["stats"]["unique_graphs"]
    for seed, lengths in enumerate(COMPILED_LENGTHS):
        checks, fused = _train_comparisons(fp32, base, patched, _batch(vocab, lengths, left=False, seed=seed))
        row.head = "fused" if fused else "logits"
        row.batches.append(checks)
    # Without this, a torch that silently stopped compiling would pass every check eagerly.
    assert counters["stats"]["unique_graphs"] > graphs, "patch(model) compiled no graph"
    _judge(row)
    row.verdict = "exact"


def sweep(model_type: str, mode: str = "eager") -> Row:
    """Measure and judge one type; never raises: a wrong or crashing type is a row (with .error)."""
    row = Row(model_type, mode)
    start = time.perf_counter()
    try:
        (_measure_compiled if mode == "compiled" else _measure_eager)(row)
    except Exception as err:  # noqa: BLE001 -- the table lists failures instead of stopping
        row.verdict = "WRONG" if isinstance(err, AssertionError) else "CRASH"
        row.detail = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
        row.error = err
    row.seconds = time.perf_counter() - start
    _TABLE.append(row)
    print(_line(row), flush=True)
    return row


_COLUMNS = ("logits", "logits left", "loss", "grads", "attn grad")


def _line(row: Row) -> str:
    cells = []
    for name in _COLUMNS:
        shown = _shown(row, name)
        cells.append(f"{shown.patched:.1e}/{shown.unpatched:.1e}" if shown else "-")
    kind = f"{'routed' if row.routed else 'dense'}x{len(row.batches)}" if row.batches else ""
    name = row.model_type + (" [compiled]" if row.mode == "compiled" else "")
    return (
        f"{name:30s} {row.verdict:8s} {row.head:6s} {kind:8s} "
        + " ".join(f"{c:17s}" for c in cells)
        + f" {row.seconds:5.1f}s {row.detail}"
    )


def table(rows: list[Row]) -> str:
    """The whole table: a header, one line per row, and the counts per mode."""
    import transformers

    card = torch.cuda.get_device_name() if DEVICE == "cuda" and torch.cuda.is_available() else DEVICE
    header = (
        f"{'model_type':30s} {'verdict':8s} {'head':6s} {'batches':8s} "
        + " ".join(f"{c + ' p/u':17s}" for c in _COLUMNS)
        + "  time  detail"
    )
    lines = [
        f"seqpack GPU sweep: {card}, bf16, backend auto; errors are patched/unpatched bf16 vs fp32 truth",
        header,
        *(_line(r) for r in rows),
        "",
    ]
    for mode in ("compiled", "eager"):
        chosen = [r for r in rows if r.mode == mode]
        if chosen:
            counts = {
                v: sum(r.verdict == v for r in chosen)
                for v in ("exact", "refused", "skipped", "WRONG", "CRASH")
            }
            lines.append(
                f"{mode}: transformers {transformers.__version__}, torch {torch.__version__}: {counts}"
            )
    return "\n".join(lines)


def _report(rows: list[Row]) -> None:
    text = table(rows)
    print("\n" + text, flush=True)
    out = os.environ.get("SEQPACK_SWEEP_OUT")
    if out:
        Path(out).write_text(text + "\n")


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _TABLE:
        _report(_TABLE)


def _assert_row(row: Row) -> None:
    if row.verdict == "skipped":
        pytest.skip(row.detail)
    if row.error is not None:
        raise row.error
    assert row.verdict in ("exact", "refused"), row.verdict
    assert row.verdict == "exact" or row.detail, "a refusal must give its reason"


@pytest.mark.parametrize("model_type", list(COMPILED))
def test_compiled(model_type):
    _assert_row(sweep(model_type, "compiled"))


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_eager(model_type):
    _assert_row(sweep(model_type, "eager"))


def main(argv: list[str]) -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (SEQPACK_SWEEP_DEVICE=cpu runs the harness on the CPU)")
    chosen = argv or causal_lm_types()
    rows = [sweep(t, "compiled") for t in COMPILED if t in chosen]
    rows += [sweep(t, "eager") for t in chosen]
    _report(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
