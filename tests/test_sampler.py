"""TokenBudgetBatchSampler: every example once, determinism, balance, and the loaders that use it.

Imbalance, as measured here: for each step, the heaviest rank's real tokens divided by the mean
over the ranks (how much longer the slowest rank computes than the average one, at equal cost per
token); then the *maximum* over the steps of an epoch (the worst step), and, as a second figure,
the mean. The balance tests bound the maximum.

Each "rank" below is a sampler of its own built with that rank, as every process builds its own,
so coverage and equal step counts are checked across independent objects, not one shared plan.
"""

import functools
import math

import pytest
import torch
from test_frameworks import _args, _tokenizer
from torch.testing import assert_close
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, Trainer

from seqpack import TokenBudgetBatchSampler, patch
from seqpack.bench.data import load_default

RANKS = 8
VOCAB = 128  # tiny_llama's vocab; id 0 is padding


@functools.cache
def gsm8k_lengths() -> tuple[int, ...]:
    """Token counts of the 7,473 GSM8K train examples shipped with the bench (74 to 560 tokens)."""
    return tuple(len(example) for example in load_default().examples)


def lognormal_lengths(n: int, *, median: float, sigma: float, budget: int, seed: int = 0) -> list[int]:
    """A long tail: log-normal lengths, clipped to [8, budget]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * sigma + math.log(median))
    return lengths.round().clamp(8, budget).long().tolist()


def rank_batches(lengths, num_replicas: int, *, epoch: int = 0, **options) -> list[list[list[int]]]:
    """[rank][step]: what each rank's own sampler yields in ``epoch``."""
    out = []
    for rank in range(num_replicas):
        sampler = TokenBudgetBatchSampler(lengths, num_replicas=num_replicas, rank=rank, **options)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def step_tokens(per_rank, lengths) -> list[list[int]]:
    """[step][rank]: real tokens of each rank's batch."""
    return [[sum(lengths[i] for i in batch) for batch in step] for step in zip(*per_rank, strict=True)]


def imbalance(per_rank, lengths) -> tuple[float, float]:
    """(max, mean) over the steps of: heaviest rank's tokens / mean over the ranks."""
    ratios = [max(tokens) / (sum(tokens) / len(tokens)) for tokens in step_tokens(per_rank, lengths)]
    return max(ratios), sum(ratios) / len(ratios)


def fixed_count_imbalance(lengths, num_replicas: int, per_batch: int, seed: int = 0) -> float:
    """The same measure for the usual sampler: a shuffle, then ``per_batch`` examples per rank and step."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    size = per_batch * num_replicas
    steps = [order[s * size : (s + 1) * size] for s in range(len(order) // size)]
    per_rank = [[step[r * per_batch : (r + 1) * per_batch] for step in steps] for r in range(num_replicas)]
    return imbalance(per_rank, lengths)[0]


def assert_valid_epoch(per_rank, lengths, *, budget, n_expected=None, max_examples=None):
    """Every example at most once (exactly once unless n_expected says fewer), equal steps, budgets."""
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, f"ranks have different step counts: {[len(b) for b in per_rank]}"
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)), "an example was given twice"
    assert len(seen) == (len(lengths) if n_expected is None else n_expected)
    assert set(seen) <= set(range(len(lengths)))
    for batches in per_rank:
        for batch in batches:
            assert batch, "a rank got an empty batch"
            tokens = sum(lengths[i] for i in batch)
            assert tokens <= budget or len(batch) == 1, f"batch of {tokens} tokens over the budget {budget}"
            if max_examples is not None:
                assert len(batch) <= max_examples


# --------------------------------------------------------------------------- coverage


def _small_random(n, seed, low, high):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


COVERAGE_CASES = {
    "gsm8k-8ranks": (gsm8k_lengths, dict(max_tokens=4096), 8),
    "long_tail-8ranks": (
        lambda: lognormal_lengths(5000, median=400, sigma=1.2, budget=8192),
        dict(max_tokens=8192),
        8,
    ),
    "3ranks-max_examples": (lambda: _small_random(301, 1, 1, 40), dict(max_tokens=64, max_examples=3), 3),
    "1rank": (lambda: _small_random(50, 2, 1, 30), dict(max_tokens=100), 1),
    "no_shuffle": (lambda: _small_random(200, 3, 1, 50), dict(max_tokens=120, shuffle=False), 4),
    "oversized_alone": (lambda: _small_random(97, 4, 1, 150), dict(max_tokens=100, oversized="alone"), 2),
}


@pytest.mark.parametrize("case", list(COVERAGE_CASES))
def test_every_example_exactly_once_per_epoch_across_ranks(case):
    make, options, ranks = COVERAGE_CASES[case]
    lengths = list(make())
    counts = set()
    for epoch in (0, 1, 2):
        per_rank = rank_batches(lengths, ranks, epoch=epoch, **options)
        assert_valid_epoch(
            per_rank, lengths, budget=options["max_tokens"], max_examples=options.get("max_examples")
        )
        counts.add(len(per_rank[0]))
    sampler = TokenBudgetBatchSampler(lengths, num_replicas=ranks, **options)
    assert counts == {len(sampler)} == {sampler.num_steps}, "the step count changed between epochs"


def test_adversarial_lengths_keep_every_promise():
    """Random mixes of near-budget and tiny examples, ranks and caps: the guarantees hold, or the
    constructor says why not (and drop_last=True then gives a valid epoch)."""
    g = torch.Generator().manual_seed(0)
    refused = 0
    for trial in range(60):
        ranks = int(torch.randint(1, 9, (1,), generator=g))
        budget = int(torch.randint(16, 600, (1,), generator=g))
        n = int(torch.randint(ranks, 400, (1,), generator=g))
        long = torch.rand(n, generator=g) < float(torch.rand(1, generator=g))
        lengths = torch.where(
            long,
            torch.randint(budget // 2, budget + 1, (n,), generator=g),
            torch.randint(1, max(2, budget // 8), (n,), generator=g),
        ).tolist()
        cap = [None, 1, 2, 5][trial % 4]
        options = dict(max_tokens=budget, max_examples=cap, seed=trial)
        try:
            per_rank = rank_batches(lengths, ranks, epoch=trial, **options)
        except ValueError as e:
            assert "drop_last=True" in str(e)
            refused += 1
            per_rank = rank_batches(lengths, ranks, epoch=trial, drop_last=True, **options)
            kept = sum(len(batch) for batches in per_rank for batch in batches)
            assert_valid_epoch(per_rank, lengths, budget=budget, n_expected=kept, max_examples=cap)
            continue
        assert_valid_epoch(per_rank, lengths, budget=budget, max_examples=cap)
    assert 0 < refused < 60, refused  # both paths ran


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_epoch_same_batches_new_epoch_new_batches():
    lengths = gsm8k_lengths()
    a = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS, rank=3, seed=7)
    b = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS, rank=3, seed=7)
    assert list(a) == list(b)
    assert list(a) == list(a), "iterating twice changed the batches"
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    assert len(epoch1) == len(epoch0)
    # A new epoch draws new batches, not the old ones in a new order.
    old = {frozenset(batch) for batch in epoch0}
    assert sum(frozenset(batch) in old for batch in epoch1) == 0
    first_positions = [sorted(batch)[0] for batch in epoch0]
    assert first_positions != [sorted(batch)[0] for batch in epoch1]
    other_seed = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS, rank=3, seed=8)
    assert list(other_seed) != epoch0
    # The plan is the same whatever rank built it.
    assert a.plan(0) == TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS, seed=7).plan(0)


def test_batches_mix_lengths_and_change_membership():
    """Examples are dealt by length band, each batch taking from all bands; who shares a batch
    with whom is drawn anew each epoch."""
    lengths = gsm8k_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS)
    partner = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for step in sampler.plan():
            for batch in step:
                sizes = sorted(lengths[i] for i in batch)
                assert sizes[0] < 150 and sizes[-1] > 250, sizes  # short and long examples together
                for i in batch:
                    partner.setdefault(i, []).append(frozenset(batch) - {i})
    overlap = [len(a & b) / max(1, len(a)) for a, b in partner.values()]
    assert sum(overlap) / len(overlap) < 0.05, "batches keep the same members across epochs"


# --------------------------------------------------------------------------- balance


@pytest.mark.parametrize("budget", [1024, 2048, 4096, 8192])
def test_balance_gsm8k_8_ranks(budget):
    lengths = gsm8k_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=budget, num_replicas=RANKS)
    for epoch in (0, 1, 2):
        per_rank = rank_batches(lengths, RANKS, epoch=epoch, max_tokens=budget)
        worst, mean = imbalance(per_rank, lengths)
        assert worst <= 1.02, (budget, epoch, worst)
        assert mean <= 1.001, (budget, epoch, mean)
        sampler.set_epoch(epoch)
        balance = sampler.balance()
        assert_close(balance.imbalance_max, worst)
        assert_close(balance.imbalance_mean, mean)
        # Balanced by filling the budget, not by starving the batches.
        assert balance.fill >= 0.9, balance
    # The measure can fail: the same token volume in fixed-count batches is far off.
    per_batch = round(balance.fill * budget / (sum(lengths) / len(lengths)))
    assert fixed_count_imbalance(lengths, RANKS, per_batch) > 1.05


@pytest.mark.parametrize(
    "median, sigma, budget",
    [(400, 1.0, 8192), (300, 1.5, 8192), (600, 1.2, 4096)],
    ids=["lognormal-1.0-8k", "lognormal-1.5-8k", "lognormal-1.2-4k"],
)
def test_balance_long_tailed(median, sigma, budget):
    lengths = lognormal_lengths(20_000, median=median, sigma=sigma, budget=budget)
    assert max(lengths) == budget  # the tail reaches the budget itself
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=budget, num_replicas=RANKS)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        per_rank = [[step[r] for step in sampler.plan()] for r in range(RANKS)]
        worst, mean = imbalance(per_rank, lengths)
        assert worst <= 1.02, (epoch, worst)
        assert sampler.balance().fill >= 0.95
    assert fixed_count_imbalance(lengths, RANKS, round(0.95 * budget / (sum(lengths) / len(lengths)))) > 1.2


def test_max_examples_caps_every_batch():
    lengths = gsm8k_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS, max_examples=8)
    per_rank = [[step[r] for step in sampler.plan()] for r in range(RANKS)]
    assert_valid_epoch(per_rank, lengths, budget=4096, max_examples=8)
    # 8 examples of ~200 tokens need ~1,600 of the 4,096: the cap decides the step count.
    assert sampler.num_steps == math.ceil(len(lengths) / (8 * RANKS))


# --------------------------------------------------------------------------- drop_last, oversized


def test_drop_last_leaves_out_less_than_the_partial_step():
    lengths = gsm8k_lengths()
    full = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS)
    dropping = TokenBudgetBatchSampler(lengths, max_tokens=4096, num_replicas=RANKS, drop_last=True)
    assert len(dropping) == len(full) - 1
    left_out = []
    for epoch in (0, 1):
        per_rank = rank_batches(lengths, RANKS, epoch=epoch, max_tokens=4096, drop_last=True)
        kept = {i for batches in per_rank for batch in batches for i in batch}
        assert_valid_epoch(per_rank, lengths, budget=4096, n_expected=len(kept))
        dropped = set(range(len(lengths))) - kept
        assert 0 < sum(lengths[i] for i in dropped) < RANKS * 4096  # less than one step's budget
        left_out.append(dropped)
    assert left_out[0] != left_out[1], "drop_last leaves out the same examples every epoch"
    assert dropping.balance().fill > full.balance().fill


def test_drop_last_when_the_examples_cannot_fill_every_rank():
    """Nine examples of a whole budget on eight ranks: no step count gives every rank one example
    per step without repeating one. Refused, unless drop_last=True (one step, one left out)."""
    lengths = [100] * 9
    with pytest.raises(ValueError, match="drop_last=True"):
        TokenBudgetBatchSampler(lengths, max_tokens=100, num_replicas=8)
    per_rank = rank_batches(lengths, 8, max_tokens=100, drop_last=True)
    assert_valid_epoch(per_rank, lengths, budget=100, n_expected=8)


def test_oversized_examples():
    lengths = [30] * 40 + [250, 130, 101]
    with pytest.raises(
        ValueError, match=r"3 of 43 examples are longer than max_tokens=100 .*example 40, 250 tokens"
    ):
        TokenBudgetBatchSampler(lengths, max_tokens=100, num_replicas=2)
    per_rank = rank_batches(lengths, 2, max_tokens=100, oversized="alone")
    assert_valid_epoch(per_rank, lengths, budget=100)
    alone = [batch for batches in per_rank for batch in batches if sum(lengths[i] for i in batch) > 100]
    assert sorted(alone) == [[40], [41], [42]]


@pytest.mark.parametrize(
    "lengths, options, error, match",
    [
        ([3, 4], dict(max_tokens=0), ValueError, "max_tokens must be a positive int"),
        ([3, 4], dict(max_tokens=10, num_replicas=2, rank=2), ValueError, r"rank must be in \[0, 2\)"),
        ([3, 4], dict(max_tokens=10, num_replicas=0), ValueError, "num_replicas must be a positive int"),
        ([3, 4], dict(max_tokens=10, max_examples=0), ValueError, "max_examples must be None or a positive"),
        (
            [3, 4],
            dict(max_tokens=10, oversized="truncate"),
            ValueError,
            "oversized must be 'error' or 'alone'",
        ),
        ([[3, 4]], dict(max_tokens=10), TypeError, "1-D sequence of ints"),
        ([3.0, 4.5], dict(max_tokens=10), TypeError, "1-D sequence of ints"),
        ([{"input_ids": [1]}], dict(max_tokens=10), TypeError, "sequence of token counts"),
        ([3, 0, 4], dict(max_tokens=10), ValueError, "example 1 has 0 tokens"),
        (
            [3, 4, 5],
            dict(max_tokens=10, num_replicas=4),
            ValueError,
            "3 examples cannot give each of 4 ranks",
        ),
    ],
)
def test_bad_inputs(lengths, options, error, match):
    with pytest.raises(error, match=match):
        TokenBudgetBatchSampler(lengths, **options)


def test_lengths_from_tensor_numpy_and_datasets():
    datasets = pytest.importorskip("datasets")
    ids = [list(range(1, n + 1)) for n in _small_random(60, 5, 1, 30)]
    expected = [len(x) for x in ids]
    numpy = pytest.importorskip("numpy")
    for source in (
        expected,
        tuple(expected),
        torch.tensor(expected, dtype=torch.int32),
        numpy.array(expected),
    ):
        assert TokenBudgetBatchSampler(source, max_tokens=64).lengths.tolist() == expected
    table = datasets.Dataset.from_dict({"input_ids": ids, "text": ["x"] * len(ids)})
    assert TokenBudgetBatchSampler(table, max_tokens=64).lengths.tolist() == expected
    # An indices mapping (shuffle, select, filter) is honoured: lengths follow the dataset's rows.
    view = table.shuffle(seed=1).select(range(40)).filter(lambda row: len(row["input_ids"]) > 3)
    assert TokenBudgetBatchSampler(view, max_tokens=64).lengths.tolist() == [
        len(x) for x in view["input_ids"]
    ]
    renamed = table.rename_column("input_ids", "tokens")
    assert TokenBudgetBatchSampler(renamed, max_tokens=64, column="tokens").lengths.tolist() == expected
    with pytest.raises(ValueError, match=r"no 'input_ids' column \(it has \['tokens', 'text'\]\)"):
        TokenBudgetBatchSampler(renamed, max_tokens=64)


def test_import_seqpack_stays_free_of_optional_packages():
    import subprocess
    import sys

    code = (
        "import sys, seqpack; from seqpack import TokenBudgetBatchSampler; "
        "optional = ('datasets', 'pyarrow', 'accelerate', 'peft', 'trl', 'flash_attn', 'liger_kernel'); "
        "bad = [m for m in optional if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# --------------------------------------------------------------------------- loaders


def _examples(n: int, seed: int, longest: int = 40) -> list[list[int]]:
    """n distinct random token lists of 2..longest tokens (ids 3..127, never padding)."""
    g = torch.Generator().manual_seed(seed)
    out, seen = [], set()
    while len(out) < n:
        ids = torch.randint(
            3, VOCAB, (int(torch.randint(2, longest + 1, (1,), generator=g)),), generator=g
        ).tolist()
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(ids)
    return out


def _rows_to_examples(input_ids, attention_mask, examples) -> list[int]:
    """The example index of each padded row (right padding), found by its real tokens."""
    where = {tuple(ids): i for i, ids in enumerate(examples)}
    return [
        where[tuple(row[mask.bool()].tolist())] for row, mask in zip(input_ids, attention_mask, strict=True)
    ]


def test_plain_dataloader():
    examples = _examples(120, seed=0)
    dataset = [{"input_ids": ids} for ids in examples]
    sampler = TokenBudgetBatchSampler([len(x) for x in examples], max_tokens=200, num_replicas=2, rank=1)
    collator = DataCollatorForLanguageModeling(_tokenizer(), mlm=False)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    assert len(loader) == sampler.num_steps
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen = [_rows_to_examples(b["input_ids"], b["attention_mask"], examples) for b in loader]
        assert seen == [step[1] for step in sampler.plan(epoch)]
        for batch in loader:
            assert int(batch["attention_mask"].sum()) <= 200
            break


@pytest.mark.parametrize("even_batches", [True, False])
def test_accelerate_prepare_deals_each_rank_its_batches(even_batches):
    """``all_ranks=True``: accelerate's prepare (split_batches=False, the default) deals batch i to
    process i % num_processes, so each process gets exactly its rank's batches. Simulated here
    with prepare_data_loader's own num_processes/process_index, the arguments Accelerator passes."""
    from accelerate.data_loader import prepare_data_loader

    lengths = gsm8k_lengths()[:600]
    ranks = 4
    for rank in range(ranks):
        sampler = TokenBudgetBatchSampler(
            lengths, max_tokens=1024, num_replicas=ranks, all_ranks=True, seed=3
        )
        loader = DataLoader(range(len(lengths)), batch_sampler=sampler, collate_fn=list)
        prepared = prepare_data_loader(
            loader, num_processes=ranks, process_index=rank, put_on_device=False, even_batches=even_batches
        )
        assert len(prepared) == sampler.num_steps
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            assert list(prepared) == [step[rank] for step in sampler.plan(epoch)]
    # accelerate (1.15) does not forward its loader's set_epoch to a batch sampler it wrapped for
    # several processes: set the epoch on the sampler itself, as the Trainer does (the README says
    # so; if this fails, accelerate now forwards it).
    prepared.set_epoch(7)
    assert sampler.epoch == 1


def test_accelerate_split_batches_is_refused():
    """split_batches=True would cut every batch into slices by position: accelerate refuses a batch
    sampler without a batch_size, which keeps the token balance from being silently undone."""
    from accelerate.data_loader import prepare_data_loader

    sampler = TokenBudgetBatchSampler(gsm8k_lengths()[:100], max_tokens=1024, num_replicas=2, all_ranks=True)
    loader = DataLoader(range(100), batch_sampler=sampler, collate_fn=list)
    with pytest.raises(ValueError, match="batch_size"):
        prepare_data_loader(loader, num_processes=2, process_index=0, split_batches=True)


# --------------------------------------------------------------------------- HF Trainer


class TokenBudgetTrainer(Trainer):
    """The Trainer, its training batches from a TokenBudgetBatchSampler (the README's recipe).

    ``get_train_dataloader`` is the hook the Trainer documents for this. The sampler deals every
    rank's batches (``all_ranks=True``) and ``accelerator.prepare`` hands each process its own, as
    for any DataLoader; the Trainer sets the sampler's epoch itself.
    """

    def __init__(self, *args, max_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_tokens = max_tokens

    def get_train_dataloader(self) -> DataLoader:
        sampler = TokenBudgetBatchSampler(
            self.train_dataset,
            max_tokens=self.max_tokens,
            num_replicas=self.args.world_size,
            all_ranks=True,
            seed=self.args.seed,
        )
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)


def _trainer_run(tmp_path, examples, *, patch_it: bool):
    from datasets import Dataset
    from helpers import tiny_llama

    model = tiny_llama()
    if patch_it:
        patch(model, compile=False)  # CPU: eager layers (test_compile.py covers compile)
    seen, packed = [], []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            _rows_to_examples(kwargs["input_ids"], kwargs["attention_mask"], examples)
        ),
        with_kwargs=True,
    )
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: packed.append(args[0].shape[0] == 1)
    )
    # 2 epochs: 4 batches an epoch, 2 per optimizer step
    args = _args(tmp_path=tmp_path, max_steps=4, gradient_accumulation_steps=2, learning_rate=0.5)
    trainer = TokenBudgetTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": examples}),
        data_collator=DataCollatorForLanguageModeling(_tokenizer(), mlm=False),
        max_tokens=100,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return seen, packed, losses, model


def test_hf_trainer_trains_on_the_samplers_batches(tmp_path):
    """The model sees exactly the sampler's batches, epoch after epoch (the Trainer sets the epoch),
    and the patched run matches the unpatched one on them step for step."""
    examples = _examples(24, seed=1, longest=24)
    sampler = TokenBudgetBatchSampler([len(x) for x in examples], max_tokens=100, seed=0)
    assert sampler.num_steps == 4
    expected = [step[0] for epoch in (0, 1) for step in sampler.plan(epoch)]

    seen, packed, losses, patched = _trainer_run(tmp_path, examples, patch_it=True)
    assert seen == expected
    assert packed and all(packed), "seqpack was bypassed"
    ref_seen, _, ref_losses, reference = _trainer_run(tmp_path, examples, patch_it=False)
    assert ref_seen == expected
    assert len(losses) == 4 and len(set(losses)) == 4, losses
    assert_close(losses, ref_losses, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(reference.named_parameters(), patched.parameters(), strict=True):
        assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
