"""seqpack under DDP and FSDP2: two CPU processes (gloo) train exactly as one process on the global batch.

Each test spawns two processes. Each builds the same TokenBudgetBatchSampler (2 ranks) and takes
its rank's batches; ``patch(model, compile=True)`` runs BEFORE the model is wrapped (DDP) or
sharded (``fully_shard`` per decoder layer, then the root), so the compiled layers are the modules
FSDP2 shards. The reference is one process running the unpatched, uncompiled model on the global
batch of every micro-step: the rows of both ranks in one padded batch.

Loss normalisation is transformers' (``Trainer._get_num_items_in_batch`` with the default
``average_tokens_across_devices=True``): ``num_items_in_batch`` is the number of target tokens
(``labels[:, 1:] != -100``) summed over the accumulation steps of every rank, each rank's loss is
its tokens' summed loss divided by that global count, and the loss is multiplied by the world size
before backward because DDP and FSDP2 average gradients over ranks. Then each rank's gradient is
the gradient of the global mean loss, and the step equals the one-process step. The data is such
that the ranks' own counts differ, so a rank-local normalisation would fail the comparison.

Per-step losses (relative 1e-4) and every final weight are compared, as in test_frameworks.py.
"""

import contextlib
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_llama
from torch.testing import assert_close

from seqpack import TokenBudgetBatchSampler, patch

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(
    not _has_fully_shard(), reason="needs torch.distributed.fsdp.fully_shard (FSDP2)"
)

WORLD = 2
STEPS = 3  # optimizer steps
ACCUM = 2  # micro-batches per step and rank
MAX_TOKENS = 96  # per rank and micro-step
LR = 0.5
VOCAB = 128
TIMEOUT_S = 480  # a hung collective fails the test instead of hanging the suite


def _examples() -> list[list[int]]:
    """48 distinct token lists of 2..40 tokens (ids 3..127, never padding)."""
    g = torch.Generator().manual_seed(0)
    out, seen = [], set()
    while len(out) < 48:
        ids = torch.randint(3, VOCAB, (int(torch.randint(2, 41, (1,), generator=g)),), generator=g).tolist()
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(ids)
    return out


def _plan() -> list[list[list[int]]]:
    """plan[micro-step][rank]: the sampler's batches, the same in every process."""
    examples = _examples()
    sampler = TokenBudgetBatchSampler(
        [len(x) for x in examples], max_tokens=MAX_TOKENS, num_replicas=WORLD, seed=0
    )
    plan = sampler.plan(0)
    assert len(plan) >= STEPS * ACCUM, len(plan)
    return plan


def _collate(rows: list[list[int]]):
    """Right-padded (B, L) input_ids, attention_mask, and labels with -100 at padding."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def num_items(labels: list[torch.Tensor]) -> int:
    """transformers' count of target tokens: ``labels[..., 1:] != -100``, summed over micro-batches."""
    return sum(int((x[..., 1:] != -100).sum()) for x in labels)


def _micro_batches(plan, step: int, rank: int | None):
    """This rank's micro-batches of an optimizer step; rank None: the global batch (every rank's rows)."""
    examples = _examples()
    out = []
    for a in range(ACCUM):
        batches = plan[step * ACCUM + a]
        rows = [i for batch in (batches if rank is None else [batches[rank]]) for i in batch]
        out.append(_collate([examples[i] for i in rows]))
    return out


@torch.no_grad()
def _snapshot(model) -> dict:
    """Every parameter, whole (an FSDP2 shard is gathered: a collective, so every rank calls it)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _reference() -> dict:
    """One process, the unpatched eager model, the global batch of every micro-step."""
    plan = _plan()
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, counts = [], []
    for step in range(STEPS):
        micro = _micro_batches(plan, step, rank=None)
        count = num_items([labels for _, _, labels in micro])
        total = 0.0
        for ids, mask, labels in micro:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
        counts.append(count)
    return {"losses": losses, "counts": counts, "weights": _snapshot(model)}


# --------------------------------------------------------------------------- the processes


def _spawn(fn, *args):
    """Run fn(rank, *args) in WORLD fresh processes; fail (not hang) past TIMEOUT_S."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises ProcessRaisedException with the worker's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {TIMEOUT_S} s")


def _setup_worker(rank: int, rendezvous: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)


def _teardown() -> None:
    """Leave the group once this process's models and wrappers are gone (the bench's own teardown).

    A DDP wrapper that outlives ``destroy_process_group`` holds the last reference to the gloo group,
    and freeing it then joins gloo's threads with the GIL held while one of them waits for the GIL
    to free a tensor: the process hangs at exit (seen in CI, about one run in five on two cores).
    """
    from seqpack.bench import parallel

    parallel.stop(torch.device("cpu"))


def _train_worker(rank: int, tmp: str, mode: str, checkpointing: bool) -> None:
    _setup_worker(rank, f"{tmp}/rendezvous")
    torch.save(_train(rank, mode, checkpointing), f"{tmp}/rank{rank}.pt")
    _teardown()  # _train's models and wrappers died with its frame


def _mixed_precision_worker(rank: int, tmp: str) -> None:
    _setup_worker(rank, f"{tmp}/rendezvous")
    runs = {
        name: _train(rank, "fsdp2", False, patched=name == "patched", mixed=True)
        for name in ("unpatched", "patched")
    }
    torch.save(runs, f"{tmp}/rank{rank}.pt")
    _teardown()


def _train(rank: int, mode: str, checkpointing: bool, patched: bool = True, mixed: bool = False) -> dict:
    from torch._dynamo.utils import counters

    import seqpack.compile

    # aot_eager still runs all that compile=True does to a layer in these wrappers (dynamo's
    # capture of the layer, its guards and dynamic shapes, AOT autograd's joint graph and the
    # backward as a compiled function under DDP's and FSDP2's hooks), but skips inductor's C++
    # code generation, which would take minutes on two shared cores.
    seqpack.compile.BACKEND = "aot_eager"
    if checkpointing:
        # With dynamic=True the layers' float attributes (RMSNorm eps, attention scaling) are
        # traced as symbols; under FSDP2 the symbolic-shape reasoning over them, here for the
        # forward and the checkpointed recompute, takes about a minute on two CPU cores, about
        # 20 s with them specialized. The graph computes the same either way, and this case is
        # about checkpointing under FSDP2: it specializes them to stay quick.
        torch._dynamo.config.specialize_float = True
    model = tiny_llama()
    if patched:
        # patch first, then wrap or shard; mixed precision's numerics eager (the compiled layers
        # under FSDP2 are test_matches_one_process's; compiling twice more would add ~20 s)
        patch(model, compile=not mixed)
    if checkpointing:
        # transformers' default (non-reentrant torch.utils.checkpoint), as the Trainer's
        # gradient_checkpointing=True turns it on; 5.24 names it activation_checkpointing_enable,
        # 5.17 has only the old name
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    packed = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: packed.append(a[0].shape[0] == 1))
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute, fp32 master weights and gradient reduction: the usual FSDP2 recipe
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, **({"mp_policy": policy} if mixed else {}))
        if checkpointing:
            # lm_head an FSDP module of its own, resharded after its forward (the default): the
            # fused loss runs inside its call (test_accelerate_fsdp2_plugin: accelerate's group)
            fully_shard(model.lm_head)
        fully_shard(model, **({"mp_policy": policy} if mixed else {}))
        wrapped = model
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    plan = _plan()
    # A sampler built inside the process group takes its rank and world size from it.
    examples = _examples()
    default = TokenBudgetBatchSampler([len(x) for x in examples], max_tokens=MAX_TOKENS, seed=0)
    own = (default.num_replicas, default.rank, list(default)) == (WORLD, rank, [s[rank] for s in plan])
    losses, counts, fused = [], [], []
    for step in range(STEPS):
        micro = _micro_batches(plan, step, rank)
        local = torch.tensor(num_items([labels for _, _, labels in micro]))
        count = local.clone()
        dist.all_reduce(count)  # every rank's and every accumulation step's target tokens
        total = torch.zeros(())
        for a, (ids, mask, labels) in enumerate(micro):
            last = a == ACCUM - 1
            sync = contextlib.nullcontext()
            if mode == "ddp" and not last:
                sync = wrapped.no_sync()
            elif mode == "fsdp2":
                wrapped.set_requires_gradient_sync(last)
            with sync:
                out = wrapped(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count)
                loss = out.loss
                fused.append(out.logits is None)  # the fused loss materialises no logits
                (loss * WORLD).backward()  # the wrappers average gradients over the ranks
            total += loss.detach()
        dist.all_reduce(total)
        opt.step()
        opt.zero_grad()
        losses.append(float(total))
        counts.append((int(local), int(count)))
    compiled = all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.layers)
    result = {
        "losses": losses,
        "counts": counts,
        "weights": _snapshot(model),
        "packed": bool(packed) and all(packed),
        "fused": all(fused),
        "own_batches": own,
        "compiled": compiled and counters["stats"]["unique_graphs"] > 0,
        "sharded": mode != "fsdp2" or all(hasattr(p, "full_tensor") for p in model.parameters()),
    }
    return result


def _results(tmp) -> list[dict]:
    return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_matches_reference(results, reference):
    for rank, result in enumerate(results):
        assert result["packed"], f"rank {rank}: a batch reached the model unpacked"
        assert_close(result["losses"], reference["losses"], rtol=1e-4, atol=1e-6, msg=f"rank {rank} losses")
        assert [c for _, c in result["counts"]] == reference["counts"]
        for name, ref in reference["weights"].items():
            assert_close(result["weights"][name], ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
    # The global count is the sum of the ranks' own counts, which differ: normalising by a rank's
    # own count instead would not give the reference step.
    local = [[c for c, _ in result["counts"]] for result in results]
    assert [sum(pair) for pair in zip(*local, strict=True)] == reference["counts"]
    assert any(a != b for a, b in zip(*local, strict=True)), local
    assert len(set(reference["losses"])) == STEPS, "training did not move the loss"


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize(
    "mode, checkpointing",
    [
        pytest.param("ddp", False, id="ddp"),
        pytest.param("fsdp2", False, id="fsdp2", marks=needs_fsdp2),
        pytest.param("fsdp2", True, id="fsdp2-gradient_checkpointing", marks=needs_fsdp2),
    ],
)
def test_matches_one_process(tmp_path, reference, mode, checkpointing):
    _spawn(_train_worker, str(tmp_path), mode, checkpointing)
    results = _results(tmp_path)
    for result in results:
        assert result["own_batches"], "a sampler with the defaults did not take the process group's rank"
        assert result["compiled"], "the decoder layers did not run compiled"
        assert result["sharded"], "the parameters are not FSDP2 shards"
        assert result["fused"], "the loss was not fused"
    _assert_matches_reference(results, reference)


# --------------------------------------------------------------------------- the HF Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer_worker(rank: int, tmp: str, port: int, fsdp: bool = False) -> None:
    _torchrun_environment(rank, port)
    torch.save(_train_with_trainer(tmp, fsdp), f"{tmp}/rank{rank}.pt")
    _teardown()  # the Trainer, its accelerator and DDP wrapper died with _train_with_trainer's frame


def _torchrun_environment(rank: int, port: int) -> None:
    """What torchrun sets; accelerate (inside the Trainer) starts the gloo process group from it."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)


def _force_fsdp_on_cpu() -> None:
    """Let accelerate take its real FSDP path on CPU processes (gloo).

    accelerate (1.15, ``AcceleratorState.__init__``) reads ``fsdp_plugin`` only for GPU-like
    distributed types; on ``MULTI_CPU`` it drops the plugin and the Trainer trains DDP without a
    word. Relabelled before the Accelerator is built, the state takes the FSDP branch and keeps
    the CPU device and the gloo group: everything after it (``fsdp2_prepare_model``: fully_shard
    of each decoder layer, the activation-checkpoint wrappers, the optimizer's parameter swap) is
    the code that runs on GPUs.
    """
    from accelerate.state import DistributedType, PartialState

    state = PartialState(cpu=True)
    if state.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        return  # relabelled by an earlier run in this process
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def _compile_quickly(checkpointing: bool) -> None:
    """compile=True with aot_eager (see _train), floats specialized under checkpointing."""
    import seqpack.compile

    seqpack.compile.BACKEND = "aot_eager"
    torch._dynamo.config.specialize_float = checkpointing


@torch.no_grad()
def _whole_weights(model) -> dict:
    """_snapshot under the names of the unwrapped model (activation-checkpoint wrappers add a level)."""
    return {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in _snapshot(model).items()}


def _train_with_trainer(tmp: str, fsdp: bool = False) -> dict:
    from datasets import Dataset
    from test_frameworks import _args
    from test_sampler import TokenBudgetTrainer, _rows_to_examples, _tokenizer
    from transformers import DataCollatorForLanguageModeling

    examples = _examples()
    model = tiny_llama()
    if fsdp:
        # The Trainer's FSDP2 (fsdp plus fsdp_config version 2), with accelerate's activation
        # checkpointing (torch's checkpoint_wrapper around each decoder layer) and compile=True.
        _compile_quickly(checkpointing=True)
        patch(model)
    else:
        patch(model, compile=False)  # the compiled layers under DDP are test_matches_one_process's
    seen, counts, packed = [], [], []

    def record(module, args, kwargs):
        seen.append(_rows_to_examples(kwargs["input_ids"], kwargs["attention_mask"], examples))
        counts.append(int(kwargs["num_items_in_batch"]))

    model.register_forward_pre_hook(record, with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: packed.append(a[0].shape[0] == 1))
    fused = []
    model.register_forward_hook(lambda m, a, out: fused.append(out.logits is None))
    sharding = {}
    if fsdp:
        layer = type(model.model.layers[0]).__name__
        sharding = dict(
            fsdp=True,
            fsdp_config={
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": [layer],
                "activation_checkpointing": True,
            },
        )
    args = _args(
        tmp_path=f"{tmp}/out",
        max_steps=STEPS,
        gradient_accumulation_steps=ACCUM,
        learning_rate=LR,
        max_grad_norm=0.0,  # no clipping: the reference does not clip
        **sharding,
    )
    if fsdp:
        _ = args.device  # sets up accelerate's state, which the forcing relabels
        _force_fsdp_on_cpu()
    trainer = TokenBudgetTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": examples}),
        data_collator=DataCollatorForLanguageModeling(_tokenizer(), mlm=False),
        max_tokens=MAX_TOKENS,
    )
    trainer.train()
    result = {
        "seen": seen,
        "counts": counts,
        "packed": bool(packed) and all(packed),
        "fused": bool(fused) and all(fused),
        "weights": _whole_weights(model),
        "distributed": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__,
        "sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
        "checkpoint_wrapped": any("CheckpointWrapper" in type(m).__name__ for m in model.modules()),
        "compiled": all(getattr(m, "_compiled_call_impl", None) is not None for m in _layers(model)),
    }
    return result


def _layers(model) -> list:
    """The decoder layers, inside any activation-checkpoint wrapper."""
    return [getattr(m, "_checkpoint_wrapped_module", m) for m in model.model.layers]


def test_trainer_ddp_with_the_sampler(tmp_path, reference):
    """The HF Trainer on two processes (DDP over gloo), fed by the sampler through the README's
    TokenBudgetTrainer: each process sees exactly its rank's batches, num_items_in_batch is the
    global count, and the weights equal the one-process reference."""
    pytest.importorskip("datasets")
    _spawn(_trainer_worker, str(tmp_path), _free_port())
    results = _results(tmp_path)
    for result in results:
        assert (
            result["distributed"] == "DistributedType.MULTI_CPU"
            and result["wrapper"] == "DistributedDataParallel"
        )
    _assert_trainer_matches(results, reference)


def _assert_trainer_matches(results, reference) -> None:
    plan = _plan()
    for rank, result in enumerate(results):
        assert result["packed"], f"rank {rank}: a batch reached the model unpacked"
        assert result["fused"], f"rank {rank}: the loss was not fused"
        assert result["seen"] == [plan[s][rank] for s in range(STEPS * ACCUM)]
        assert result["counts"] == [c for c in reference["counts"] for _ in range(ACCUM)]
        assert result["weights"].keys() == reference["weights"].keys()
        for name, ref in reference["weights"].items():
            assert_close(result["weights"][name], ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")


@needs_fsdp2
def test_trainer_fsdp2_with_checkpointing_and_the_sampler(tmp_path, reference):
    """The HF Trainer with ``fsdp`` and ``fsdp_config`` version 2 (accelerate's fsdp2_prepare_model:
    fully_shard of each decoder layer, then the root; its activation checkpointing), the layers
    compiled by patch before accelerate shards them: the weights equal the one-process reference."""
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    _spawn(_trainer_worker, str(tmp_path), _free_port(), True)
    results = _results(tmp_path)
    for result in results:
        assert result["distributed"] == "DistributedType.FSDP", result["distributed"]
        assert result["sharded"], "the parameters are not FSDP2 shards"
        assert result["checkpoint_wrapped"], "accelerate did not wrap the layers for activation checkpointing"
        assert result["compiled"], "the decoder layers did not run compiled"
    _assert_trainer_matches(results, reference)


def _accelerate_worker(rank: int, tmp: str, port: int, precision: str) -> None:
    _torchrun_environment(rank, port)
    if precision == "fp32":
        runs = _train_with_accelerate(rank)
    else:  # accelerate's bf16: MixedPrecisionPolicy(param, reduce and output dtype bf16)
        runs = {
            name: _train_with_accelerate(rank, patched=name == "patched", mixed_precision=precision)
            for name in ("unpatched", "patched")
        }
    torch.save(runs, f"{tmp}/rank{rank}.pt")
    _teardown()


def _train_with_accelerate(rank: int, patched: bool = True, mixed_precision: str = "no") -> dict:
    """A plain Accelerate loop with an FSDP2 plugin (transformer-based wrap of the decoder layers)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    model = tiny_llama()
    if patched:  # compiled layers under FSDP2: the Trainer test and test_matches_one_process
        patch(model, compile=False)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[type(model.model.layers[0]).__name__],
    )
    _force_fsdp_on_cpu()
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision=mixed_precision)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    plan = _plan()
    losses, fused = [], []
    for step in range(STEPS):
        micro = _micro_batches(plan, step, rank)
        count = torch.tensor(num_items([labels for _, _, labels in micro]))
        dist.all_reduce(count)
        total = torch.zeros(())
        for ids, mask, labels in micro:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count)
            fused.append(out.logits is None)
            accelerator.backward(out.loss * WORLD)  # FSDP2 averages the gradients over the ranks
            total += out.loss.detach().float()
        dist.all_reduce(total)
        opt.step()
        opt.zero_grad()
        losses.append(float(total))
    return {
        "losses": losses,
        "weights": _whole_weights(model),
        "distributed": str(accelerator.distributed_type),
        "sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
        # accelerate shards [final norm, lm_head] as one group: the head is an FSDP module
        "head": type(model.get_output_embeddings()).__name__,
        "fused": all(fused),
    }


@needs_fsdp2
def test_accelerate_fsdp2_plugin(tmp_path, reference):
    """accelerate shards [final norm, lm_head] as one FSDP2 group, so the head is an FSDP module
    whose weight is whole only inside its call: the fused loss runs there, and the per-step
    losses and final weights equal the one-process reference."""
    pytest.importorskip("accelerate")
    _spawn(_accelerate_worker, str(tmp_path), _free_port(), "fp32")
    for rank, result in enumerate(_results(tmp_path)):
        assert result["distributed"] == "DistributedType.FSDP" and result["sharded"], result
        assert result["head"] == "FSDPLinear" and result["fused"], result
        assert_close(result["losses"], reference["losses"], rtol=1e-4, atol=1e-6, msg=f"rank {rank} losses")
        for name, ref in reference["weights"].items():
            assert_close(result["weights"][name], ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")


@needs_fsdp2
def test_accelerate_fsdp2_bf16_is_no_worse_than_unpatched(tmp_path, reference):
    """accelerate's bf16 (FSDP2 casts the head's output, here the fused loss's, to bf16): against
    the fp32 one-process run, the patched run's loss and weight-update errors are at most twice
    the unpatched run's, as in test_fsdp2_mixed_precision_is_no_worse_than_unpatched."""
    pytest.importorskip("accelerate")
    _spawn(_accelerate_worker, str(tmp_path), _free_port(), "bf16")
    for rank, runs in enumerate(_results(tmp_path)):
        assert runs["patched"]["fused"] and not runs["unpatched"]["fused"]
        _assert_no_worse_than_unpatched(runs, reference, rank)


@needs_fsdp2
def test_fsdp2_mixed_precision_is_no_worse_than_unpatched(tmp_path, reference):
    """FSDP2 with a mixed-precision policy (bf16 parameters in compute, fp32 reduction), patched and
    unpatched on the same two processes: against the fp32 one-process run, the patched run's loss
    and weight-update errors are at most twice the unpatched run's (the flash-attention rule)."""
    _spawn(_mixed_precision_worker, str(tmp_path))
    for rank, runs in enumerate(_results(tmp_path)):
        assert runs["patched"]["packed"] and not runs["unpatched"]["packed"]
        _assert_no_worse_than_unpatched(runs, reference, rank)


def _assert_no_worse_than_unpatched(runs: dict, reference: dict, rank: int) -> None:
    """The flash-attention rule on the losses and the weight update of a patched and an unpatched run."""
    initial = {n: p.detach() for n, p in tiny_llama().named_parameters()}
    ref_update = torch.cat([(reference["weights"][n] - initial[n]).flatten() for n in initial])
    errors = {}
    for name, run in runs.items():
        losses = torch.tensor(run["losses"]) / torch.tensor(reference["losses"]) - 1
        update = torch.cat([(run["weights"][n].float() - initial[n]).flatten() for n in initial])
        errors[name] = (float(losses.abs().max()), float((update - ref_update).norm() / ref_update.norm()))
    (loss, weights), (base_loss, base_weights) = errors["patched"], errors["unpatched"]
    assert loss <= 2 * base_loss + 1e-3, (rank, errors)
    assert weights <= 2 * base_weights + 1e-3, (rank, errors)
