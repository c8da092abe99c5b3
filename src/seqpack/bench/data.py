"""Token data for the benchmark, and the seeded batches every mode sees in the same order.

The default is real text with real lengths: GSM8K train tokenised with the Mistral-7B v0.1
tokenizer, shipped in this package as token ids (``data/``, built by ``data/build_gsm8k.py``) and
read with the standard library only, so the default run needs no network, tokenizer or numpy.
A user's JSONL (or, online, a hub dataset) is tokenised here with their tokenizer.

A batch is a list of examples, each a list of token ids; the modes turn it into tensors
(padded or flattened) themselves, so every mode starts from the very same ids. An example whose
first tokens are a prompt with no loss on them (``--data rl``, synthetic.py) is a ``Prompted``
list: still a list of ids, so counting, cutting and batching treat it as any other. A plan is every
rank's batch of every step (``plan[step][rank]``; one process: one batch a step), computed the
same way in every process.
"""

from __future__ import annotations

import array
import gzip
import json
import random
import struct
import sys
from importlib import resources
from pathlib import Path
from typing import NamedTuple

MAGIC = b"SQPTOK01"
DEFAULT_DATA = "gsm8k"
_DEFAULT_FILE = "gsm8k_train.tokens.gz"


class TokenData(NamedTuple):
    """Tokenised examples.

    Attributes:
        name: what to call the data in reports.
        examples: one list of token ids per example, BOS (and EOS) included.
        vocab_size: size of the tokenizer that made the ids (ids are < vocab_size).
    """

    name: str
    examples: list[list[int]]
    vocab_size: int


def decode_token_file(payload: bytes, name: str) -> TokenData:
    """Parse the ``build_gsm8k.py`` format: magic, n, vocab, n uint32 lengths, uint16 ids."""
    if payload[:8] != MAGIC:
        raise ValueError(f"{name}: not a seqpack token file (bad magic {payload[:8]!r})")
    n, vocab_size = struct.unpack_from("<II", payload, 8)
    lengths = array.array("I")
    lengths.frombytes(payload[16 : 16 + 4 * n])
    ids = array.array("H")
    ids.frombytes(payload[16 + 4 * n :])
    if sys.byteorder == "big":
        lengths.byteswap()
        ids.byteswap()
    if sum(lengths) != len(ids):
        raise ValueError(f"{name}: lengths add up to {sum(lengths)} tokens, file holds {len(ids)}")
    examples, start = [], 0
    for length in lengths:
        examples.append(ids[start : start + length].tolist())
        start += length
    return TokenData(name, examples, vocab_size)


def load_default() -> TokenData:
    """GSM8K train (7,473 examples, mean 199 tokens), as shipped in ``seqpack/bench/data``."""
    payload = gzip.decompress(resources.files("seqpack.bench").joinpath("data", _DEFAULT_FILE).read_bytes())
    return decode_token_file(payload, "gsm8k-train (mistral-7b tokenizer)")


class Prompted(list):
    """An example whose first ``prompt_length`` ids are a prompt: the collates label them -100.

    A list subclass rather than a record, so that everything that reads an example as its ids
    (``len``, token counts, ``torch.tensor``, pickling to ``--nproc`` ranks) works unchanged and the
    plain examples of the default data stay plain lists. What makes a new list of ids from an
    example (a cut, a vocab fold) goes through ``with_ids``, which keeps the prompt. Compares equal
    to a plain list of the same ids.

    Example:
        >>> e = Prompted([1, 22478, 28747, 13, 7], prompt_length=4)
        >>> len(e), prompt_length(e), prompt_length([1, 2])
        (5, 4, 0)
    """

    __slots__ = ("prompt_length",)

    def __init__(self, ids, prompt_length: int):
        super().__init__(ids)
        self.prompt_length = prompt_length


def prompt_length(example: list[int]) -> int:
    """How many leading ids of ``example`` carry no loss: its prompt (0 for a plain list)."""
    return getattr(example, "prompt_length", 0)


def with_ids(example: list[int], ids: list[int]) -> list[int]:
    """``ids`` as the same kind of example: a ``Prompted`` keeps its prompt, cut to ``len(ids)``."""
    if isinstance(example, Prompted):
        return Prompted(ids, min(example.prompt_length, len(ids)))
    return ids


class Tokenizer(NamedTuple):
    """A text -> ids function that adds the tokenizer's BOS, and the vocab size it draws from."""

    encode: object
    vocab_size: int


def load_tokenizer(path: str) -> Tokenizer:
    """A sentencepiece ``.model`` file, or anything ``AutoTokenizer.from_pretrained`` takes."""
    if path.endswith(".model") and Path(path).is_file():
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise SystemExit(
                f"--tokenizer {path} is a sentencepiece model: pip install 'seqpack[bench]' (or sentencepiece)"
            ) from e
        sp = spm.SentencePieceProcessor(model_file=path)
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
        return Tokenizer(lambda text: bos + sp.encode(text), sp.vocab_size())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    # len(tok) counts added tokens too, which vocab_size does not.
    return Tokenizer(lambda text: tok(text)["input_ids"], len(tok))


def _read_records(source: str, split: str) -> list[dict]:
    if Path(source).is_file():
        with open(source, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(
            f"--data {source}: no such file; to read a hub dataset, pip install datasets (and be online)"
        ) from e
    return list(datasets.load_dataset(source, split=split))


def load_text_data(
    source: str,
    *,
    tokenizer: str,
    text_field: str = "text",
    template: str | None = None,
    split: str = "train",
) -> TokenData:
    """Tokenise a JSONL file (one JSON object a line) or a hub dataset.

    Args:
        source: path to a .jsonl file, or a hub dataset name (needs `datasets` and a network).
        tokenizer: see `load_tokenizer`.
        text_field: the record's field holding the text, when no template is given.
        template: a `str.format` template over the record's fields, e.g.
            "Question: {question}\\nAnswer: {answer}".
    Returns:
        TokenData with one example per non-empty record.
    """
    records = _read_records(source, split)
    if not records:
        raise SystemExit(f"--data {source}: no records")
    tok = load_tokenizer(tokenizer)
    examples = []
    for i, record in enumerate(records):
        try:
            text = template.format(**record) if template else record[text_field]
        except KeyError as e:
            raise SystemExit(f"--data {source}: record {i} has no field {e}; it has {sorted(record)}") from e
        ids = list(tok.encode(text))
        if ids:
            examples.append(ids)
    return TokenData(f"{Path(source).name} ({Path(tokenizer).name})", examples, tok.vocab_size)


def _pool(data: TokenData, max_length: int | None) -> list[list[int]]:
    pool = [with_ids(e, e[:max_length]) if max_length else e for e in data.examples]
    # At least one next-token target: 2 ids, or one id past the prompt.
    return [e for e in pool if len(e) - max(prompt_length(e), 1) >= 1]


def make_batches(
    data: TokenData, *, batch_size: int, num_batches: int, seed: int, max_length: int | None = None
) -> list[list[list[int]]]:
    """Seeded batches of random examples, drawn without replacement (reshuffled each epoch).

    Examples longer than ``max_length`` are cut to their first ``max_length`` tokens; examples
    with no next-token target are dropped: shorter than 2 tokens, or (``Prompted``) nothing left
    after the prompt.
    """
    pool = _pool(data, max_length)
    if len(pool) < batch_size:
        raise SystemExit(f"{data.name}: {len(pool)} usable examples, fewer than --batch-size {batch_size}")
    rng = random.Random(seed)
    order: list[int] = []
    batches = []
    for _ in range(num_batches):
        if len(order) < batch_size:
            epoch = list(range(len(pool)))
            rng.shuffle(epoch)
            order = epoch
        batches.append([pool[i] for i in order[:batch_size]])
        order = order[batch_size:]
    return batches


def make_plan(
    data: TokenData,
    *,
    num_steps: int,
    seed: int,
    world_size: int = 1,
    batch_size: int | None = None,
    token_budget: int | None = None,
    oversized: str = "error",
    max_length: int | None = None,
) -> list[list[list[list[int]]]]:
    """Every rank's batch of every step, ``plan[step][rank]``: the same in every process.

    A fixed batch size: the seeded batches of ``make_batches`` dealt rank-strided, step s of rank
    r being batch ``s * world_size + r`` (one process: ``make_batches``' batches as they are). A
    token budget: ``seqpack.TokenBudgetBatchSampler``'s plan (at most ``token_budget`` real tokens
    in a rank's batch, the ranks of a step balanced), epoch after epoch from ``seed``.

    Raises:
        ValueError: the token budget cannot hold these examples (the message names the options).
    """
    if token_budget is None:
        batches = make_batches(
            data, batch_size=batch_size, num_batches=num_steps * world_size, seed=seed, max_length=max_length
        )
        return [batches[s * world_size : (s + 1) * world_size] for s in range(num_steps)]
    from seqpack import TokenBudgetBatchSampler

    pool = _pool(data, max_length)
    longer = [len(e) for e in pool if len(e) > token_budget]
    if longer and oversized == "error":
        raise ValueError(
            f"{len(longer):,} of {len(pool):,} examples are longer than the budget (the longest has "
            f"{max(longer)} tokens); raise it, cut the examples with --max-length {token_budget}, or pass "
            "--oversized alone (each then makes a batch of its own, over the budget)"
        )
    # drop_last: the steps are taken from the front of each epoch, so leaving out what its last,
    # partial step would hold costs nothing, and every budget that holds the longest example runs.
    sampler = TokenBudgetBatchSampler(
        [len(e) for e in pool],
        max_tokens=token_budget,
        num_replicas=world_size,
        seed=seed,
        drop_last=True,
        oversized=oversized,
    )
    plan: list[list[list[list[int]]]] = []
    epoch = 0
    while len(plan) < num_steps:
        plan += [[[pool[i] for i in batch] for batch in step] for step in sampler.plan(epoch)]
        epoch += 1
    return plan[:num_steps]


def fold_vocab(plan: list[list[list[list[int]]]], vocab_size: int) -> list[list[list[list[int]]]]:
    """Map a plan's ids into a smaller model vocab (id % vocab_size): keeps lengths and prompts,
    loses meaning."""
    return [
        [[with_ids(example, [t % vocab_size for t in example]) for example in batch] for batch in step]
        for step in plan
    ]
