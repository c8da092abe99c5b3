"""Token-budget batches for data-parallel training: every rank gets about the same real tokens a step.

Padding-free, a step costs what its real tokens cost, not batch size x longest row. With a fixed
number of examples per rank, the rank that drew the long examples makes every other rank wait at
the gradient all-reduce (DDP) or the all-gathers (FSDP). Here each rank gets a token budget per
step instead (``max_tokens``), and the batches of a step hold nearly equal numbers of tokens.

One epoch, computed identically on every rank from ``(seed, epoch)``, with no communication:

1. The examples are put longest first by length *band* (lengths within about 9% of each other form
   a band; within a band the order is the epoch's shuffle, so the batches change every epoch).
2. They are dealt one at a time to the batch with the fewest tokens so far (LPT, "longest
   processing time first") among the epoch's ``num_steps * num_replicas`` batches.
3. The batches, sorted by tokens, are taken ``num_replicas`` at a time as one step; then the steps,
   and the ranks within each step, are shuffled.

Why it balances: an example goes to the lightest batch, so when the heaviest batch got its last
example it was the lightest; heaviest minus lightest is at most that example's length, and since
examples come longest first, that is one of the epoch's short ones. A step takes batches adjacent
in token order, so the spread within a step is smaller still.

Why no batch exceeds the budget, and why every epoch has the same number of steps: ``num_steps``
is fixed at construction, from the lengths alone, as the fewest steps for which a bound on the
lightest batch (at most the mean of the batches still open) proves that every example fits
whatever order it has within its band. The Trainer reads ``len()`` once for all epochs, and DDP and
FSDP need every rank to run the same number of steps; both hold by construction.

Planning is O(n log n) per epoch, in Python, cached: about 0.1 s for GSM8K's 7,473 examples and
4 s for a million on one CPU core. This module imports nothing of the patch, and nothing but torch
(a ``datasets.Dataset`` passed in is read through its own Arrow tables).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

__all__ = ["Balance", "TokenBudgetBatchSampler"]

# Length bands: floor(log2(length) * 8), i.e. bands 2**(1/8) = 9% wide. Wider bands shuffle more and
# cost budget: the budget check must allow the longest example of the last band to arrive last.
_BANDS_PER_OCTAVE = 8
_READ_BATCH = 65_536  # rows of a datasets.Dataset read at a time for its lengths


class Balance(NamedTuple):
    """How even an epoch's steps are (``TokenBudgetBatchSampler.balance``).

    Attributes:
        imbalance_max: over the steps, the largest (heaviest rank's real tokens / the ranks' mean):
            how much longer the slowest rank computes than the average one, at the worst step.
        imbalance_mean: the same ratio averaged over the steps.
        fill: the mean real tokens of a batch divided by ``max_tokens``.
    """

    imbalance_max: float
    imbalance_mean: float
    fill: float


def _read_lengths(source: Any, column: str) -> torch.Tensor:
    """(n,) int64 token counts from a sequence of counts, or from a dataset's list column."""
    if hasattr(source, "column_names") and hasattr(source, "with_format"):  # a datasets.Dataset
        if not hasattr(source, "__len__"):
            raise TypeError("a batch sampler needs a map-style dataset; got an iterable (streaming) one")
        if column not in source.column_names:
            raise ValueError(
                f"the dataset has no {column!r} column (it has {source.column_names}); pass column=NAME "
                "for the token ids, or a sequence of lengths"
            )
        import pyarrow.compute as pc  # datasets' own dependency; only reached with a datasets.Dataset

        parts = []
        # One pass over the list offsets, a slice at a time: no Python list per example, and the
        # dataset's indices mapping (select, shuffle, filter) is honoured by the Arrow view.
        for table in source.with_format("arrow").iter(batch_size=_READ_BATCH):
            counts = pc.list_value_length(table[column])
            if counts.null_count:
                raise ValueError(f"the dataset's {column!r} column has missing (null) rows")
            parts.append(torch.tensor(counts.to_numpy(), dtype=torch.int64))  # a copy: Arrow's is read-only
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    try:
        lengths = torch.as_tensor(source)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            "lengths must be a sequence of token counts (one int per example) or a datasets.Dataset "
            f"with a {column!r} column, got {type(source).__name__}"
        ) from e
    if (
        lengths.ndim != 1
        or lengths.dtype == torch.bool
        or lengths.dtype.is_floating_point
        or lengths.dtype.is_complex
    ):
        raise TypeError(
            f"lengths must be a 1-D sequence of ints, got {lengths.dtype} of shape {tuple(lengths.shape)}"
        )
    return lengths.to(torch.int64)


def _bands(lengths: torch.Tensor) -> torch.Tensor:
    """(n,) int64 band of each length (>= 1): floor(log2(length) * 8)."""
    return torch.floor(torch.log2(lengths.double()) * _BANDS_PER_OCTAVE).to(torch.int64)


class _BandStats(NamedTuple):
    """Per length band, longest band first: what ``_always_fits`` needs. All (bands,) int64."""

    placed: torch.Tensor  # C_b: the examples of this band and of the longer ones
    before: torch.Tensor  # P_b - max_b: their tokens, less this band's longest example
    longest: torch.Tensor  # max_b
    shortest: torch.Tensor  # min_b: no example of this band or a longer one is shorter


def _band_stats(lengths: torch.Tensor, bands: torch.Tensor) -> _BandStats:
    values, inverse = torch.unique(bands, return_inverse=True)  # ascending
    zeros = torch.zeros(len(values), dtype=torch.int64)
    count = zeros.scatter_add(0, inverse, torch.ones_like(lengths)).flip(0)
    total = zeros.scatter_add(0, inverse, lengths).flip(0)
    longest = zeros.scatter_reduce(0, inverse, lengths, "amax", include_self=False).flip(0)
    shortest = zeros.scatter_reduce(0, inverse, lengths, "amin", include_self=False).flip(0)
    return _BandStats(count.cumsum(0), total.cumsum(0) - longest, longest, shortest)


def _always_fits(stats: _BandStats, n: int, bins: int, cap: int | None, budget: int) -> bool:
    """Whether LPT in band order puts all ``n`` examples within ``budget``, whatever their order in a band.

    Args:
        stats: ``_band_stats`` of the examples (each at most ``budget`` tokens).
        bins: the batches open to them; cap: the most examples a batch may hold (None: no limit).

    An example goes to the lightest open batch; the first ``bins`` go to empty ones. An example of
    band b arrives with at most ``C = C_b - 1`` examples placed, holding at most ``P = P_b - its
    length`` tokens, each at least ``min_b`` long. Of the batches, ``x <= C // cap`` are closed
    (full), holding at least ``x * cap * min_b`` tokens, so the lightest open one holds at most
    ``(P - x * cap * min_b) // (bins - x)``, worst at x = 0 or x = C // cap; and, having fewer
    than ``cap`` examples, at most ``(cap - 1)`` times the longest example. The worst example of
    the band is its longest: it fits if that bound plus ``max_b`` is within the budget.
    """
    if n <= bins:
        return True
    if bins < 1:
        return False
    lightest = stats.before // bins
    if cap is not None:
        closed = (stats.placed - 1) // cap
        if bool((closed >= bins).any()):
            return False
        full = (stats.before - closed * cap * stats.shortest) // (bins - closed)
        lightest = torch.minimum(torch.maximum(lightest, full), (cap - 1) * stats.longest[0])
    needed = stats.placed > bins  # a band whose examples all meet empty batches fits as it is
    return bool((lightest + stats.longest <= budget)[needed].all())


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of example indices with a token budget per rank and step, balanced across ranks.

    Every rank builds the same sampler (same lengths, seed and options) and gets its own batches;
    together they hold every example exactly once per epoch (``drop_last=False``), and every rank
    gets ``len(sampler)`` batches, the same number every epoch. Use it as a DataLoader's
    ``batch_sampler`` and call ``set_epoch(epoch)`` before each epoch, as with DistributedSampler.

    Args:
        lengths: the examples' token counts (a list, tuple, numpy array or 1-D tensor of ints), or a
            ``datasets.Dataset`` whose ``column`` (token id lists) is read once for them, through
            Arrow list lengths (no ids are copied and nothing is tokenized again). Every length
            must be >= 1.
        max_tokens: the budget: most real tokens in one rank's batch of one step.
        num_replicas: the number of data-parallel ranks; default: ``torch.distributed``'s world size
            when a process group is initialised, else 1.
        rank: this process's rank; default: ``torch.distributed``'s rank, else 0.
        all_ranks: yield every rank's batch of each step in turn (step 0: rank 0, 1, ..., then step
            1 ...), for a wrapper that deals batch i to rank i % num_replicas. ``accelerator.prepare``
            does exactly that (with its default ``split_batches=False``), and so does the HF Trainer,
            which prepares its DataLoader: build the sampler with ``all_ranks=True`` for either.
        max_examples: most examples in one batch (None: no limit). A tight cap decides the batches
            instead of the budget, and the balance is then what sums of that many lengths give.
        shuffle: shuffle within length bands, and the order of steps and of ranks in a step.
        seed: the same on every rank; the epoch's order is drawn from ``seed + epoch``.
        drop_last: one step fewer than it takes to hold every example (at least one step): the
            examples that do not fit then are left out, from the end of the epoch's shuffled order
            (so different ones each epoch; about what the last, partial step would have held). It
            saves a step when the examples fill a fraction of the last one, as a DataLoader's
            drop_last does. False (default): no example is ever left out.
        oversized: what to do with an example longer than ``max_tokens``. ``"error"`` (default):
            ValueError at construction, naming them; truncate the data (the tokenizer's
            ``max_length``) or raise the budget. ``"alone"``: each is a batch of its own, over the
            budget, on one rank of some step (that step is as slow as its length makes it).
        column: the token-id column of a ``datasets.Dataset`` (default ``"input_ids"``).

    Raises:
        ValueError: a bad option, an example longer than the budget (``oversized="error"``), or
            data that cannot give every rank an example in every step within the budget
            (fewer examples than ranks, or examples too long for any step count).

    Example:
        >>> lengths = [5, 3, 8, 2, 7, 4]
        >>> sampler = TokenBudgetBatchSampler(lengths, max_tokens=10, num_replicas=2, shuffle=False)
        >>> [[[lengths[i] for i in batch] for batch in step] for step in sampler.plan()]
        [[[8], [7]], [[5, 2], [3, 4]]]
    """

    def __init__(
        self,
        lengths: Sequence[int] | torch.Tensor | Any,
        *,
        max_tokens: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        all_ranks: bool = False,
        max_examples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        oversized: str = "error",
        column: str = "input_ids",
    ):
        super().__init__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed and not all_ranks else 0
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"max_examples must be None or a positive int, got {max_examples!r}")
        if oversized not in ("error", "alone"):
            raise ValueError(f"oversized must be 'error' or 'alone', got {oversized!r}")

        self.lengths = _read_lengths(lengths, column)  # (n,) int64
        self.max_tokens = max_tokens
        self.num_replicas = num_replicas
        self.rank = rank
        self.all_ranks = all_ranks
        self.max_examples = max_examples
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.oversized = oversized
        self.epoch = 0
        self._plans: dict[int, list[list[list[int]]]] = {}

        n = self.lengths.numel()
        if n and int(self.lengths.min()) < 1:
            first = int(torch.nonzero(self.lengths < 1)[0])
            raise ValueError(f"example {first} has {int(self.lengths[first])} tokens; remove empty examples")
        over = self.lengths > max_tokens
        if oversized == "error" and bool(over.any()):
            longest = int(torch.argmax(self.lengths))
            raise ValueError(
                f"{int(over.sum())} of {n} examples are longer than max_tokens={max_tokens} (the longest: "
                f"example {longest}, {int(self.lengths[longest])} tokens); truncate them (e.g. the "
                "tokenizer's max_length), raise max_tokens, or pass oversized='alone' to give each a "
                "batch of its own"
            )
        if n < num_replicas:
            raise ValueError(
                f"{n} examples cannot give each of {num_replicas} ranks a batch (no example is repeated)"
            )
        self._bands = _bands(self.lengths)
        self.num_steps = self._count_steps(self.lengths, over)

    # ------------------------------------------------------------------ the step count

    def _fitter(self, examples: torch.Tensor):
        """``fits(steps)``: whether ``examples`` (indices) always fit, every batch given at least one."""
        over = self.lengths[examples] > self.max_tokens
        alone = int(over.sum())
        regular = examples[~over]
        stats = _band_stats(self.lengths[regular], self._bands[regular])

        def fits(steps: int) -> bool:
            bins = steps * self.num_replicas
            # Every batch gets an example, and each oversized one a batch of its own.
            if examples.numel() < bins or alone > bins:
                return False
            return _always_fits(stats, regular.numel(), bins - alone, self.max_examples, self.max_tokens)

        return fits

    def _count_steps(self, lengths: torch.Tensor, over: torch.Tensor) -> int:
        """The fewest steps that always hold every example; drop_last: one fewer (the partial step).

        drop_last, when no step count holds them all: one example per batch, as many steps as the
        examples allow.
        """
        n, replicas = lengths.numel(), self.num_replicas
        alone = int(over.sum())
        regular = lengths[~over]
        batches = alone + math.ceil(int(regular.sum()) / self.max_tokens)
        if self.max_examples is not None:
            batches = max(batches, alone + math.ceil(regular.numel() / self.max_examples))
        low, high = max(1, math.ceil(batches / replicas)), n // replicas
        fits = self._fitter(torch.arange(n))
        if low > high or not fits(high):
            if self.drop_last:
                return high
            raise ValueError(
                f"these {n} examples ({int(lengths.sum())} tokens, the longest {int(lengths.max())}) cannot "
                f"give each of {replicas} ranks at least one example in every step within max_tokens="
                f"{self.max_tokens} without leaving some out or repeating them; raise max_tokens, or pass "
                "drop_last=True"
            )
        while low < high:  # fits() only gets easier with more steps: bisect for the fewest
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        return max(1, low - 1) if self.drop_last else low

    # ------------------------------------------------------------------ one epoch

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (the same on every rank)."""
        self.epoch = epoch

    def _kept(self, order: torch.Tensor) -> torch.Tensor:
        """drop_last: the longest prefix of the epoch's order that always fits ``num_steps``."""

        def fits(k: int) -> bool:
            return self._fitter(order[:k])(self.num_steps)

        low, high = self.num_steps * self.num_replicas, order.numel()  # one example per batch always fits
        if fits(high):
            return order
        while low < high - 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return order[:low]

    def plan(self, epoch: int | None = None) -> list[list[list[int]]]:
        """Every rank's batches of an epoch: ``plan[step][rank]`` is a list of example indices.

        The same on every rank. Cached per epoch; treat it as read-only.
        """
        epoch = self.epoch if epoch is None else epoch
        if epoch in self._plans:
            return self._plans[epoch]
        n, replicas, budget = self.lengths.numel(), self.num_replicas, self.max_tokens
        g = torch.Generator().manual_seed(self.seed + epoch)  # as DistributedSampler: seed + epoch
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.drop_last:
            order = self._kept(order)
        position = torch.full((n,), n, dtype=torch.int64)
        position[order] = torch.arange(order.numel())  # each kept example's place in the shuffle
        # Longest band first (oversized ones before all), the shuffle's order within a band.
        band = self._bands[order]
        band = torch.where(self.lengths[order] > budget, int(self._bands.max()) + 1, band)
        dealt = order[torch.argsort(-band * (n + 1) + position[order])].tolist()

        lengths, cap = self.lengths.tolist(), self.max_examples
        bins = self.num_steps * replicas
        batches: list[list[int]] = [[] for _ in range(bins)]
        loads = [0] * bins
        lightest = [(0, b) for b in range(bins)]  # (tokens, batch): a heap, already in order
        for i in dealt:
            size = lengths[i]
            if not lightest:
                raise RuntimeError(
                    f"seqpack internal error: every batch is full before example {i}; "
                    "please report it with the lengths"
                )
            load, b = heapq.heappop(lightest)
            if size > budget:  # oversized="alone": first in the order, so it meets an empty batch
                batches[b].append(i)
                loads[b] = size
                continue  # closed
            if load + size > budget:
                raise RuntimeError(
                    f"seqpack internal error: example {i} ({size} tokens) does not fit the lightest batch "
                    f"({load} tokens, budget {budget}); please report it with the lengths"
                )
            batches[b].append(i)
            loads[b] = load + size
            if cap is None or len(batches[b]) < cap:
                heapq.heappush(lightest, (load + size, b))

        by_tokens = sorted(range(bins), key=lambda b: (-loads[b], b))
        steps = [by_tokens[s * replicas : (s + 1) * replicas] for s in range(self.num_steps)]
        if self.shuffle:
            steps = [steps[s] for s in torch.randperm(len(steps), generator=g).tolist()]
            steps = [[step[r] for r in torch.randperm(replicas, generator=g).tolist()] for step in steps]
        place = position.tolist()
        plan = [[sorted(batches[b], key=place.__getitem__) for b in step] for step in steps]
        self._plans = {epoch: plan}  # one epoch at a time: the plan holds every index
        return plan

    def balance(self, epoch: int | None = None) -> Balance:
        """How even the steps of an epoch are (see ``Balance``)."""
        lengths = self.lengths.tolist()
        tokens = torch.tensor(
            [[sum(lengths[i] for i in batch) for batch in step] for step in self.plan(epoch)],
            dtype=torch.float64,
        )  # (steps, ranks)
        ratio = tokens.max(dim=1).values / tokens.mean(dim=1)
        return Balance(float(ratio.max()), float(ratio.mean()), float(tokens.mean()) / self.max_tokens)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.plan():
            if self.all_ranks:
                yield from (list(batch) for batch in step)
            else:
                yield list(step[self.rank])

    def __len__(self) -> int:
        return self.num_steps * (self.num_replicas if self.all_ranks else 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.lengths.numel()} examples, max_tokens={self.max_tokens}, "
            f"num_replicas={self.num_replicas}, rank={'all' if self.all_ranks else self.rank}, "
            f"num_steps={self.num_steps})"
        )
