"""Long-sequence data shapes over the embedded GSM8K text: real tokens, synthetic lengths.

GSM8K examples are short (median 185 tokens, max 560), too short to show what long and uneven
sequences do to a training step (a padded batch growing with its longest row, a kernel re-planned
for a new length). These shapes keep the embedded token ids (``data.load_default``: GSM8K train,
Mistral-7B tokenizer), so they run offline with no tokenizer, and draw only the lengths:

- ``long`` (``--data long``): every example's ids (BOS and EOS included), in file order, as one
  stream, cut into consecutive documents of ``LONG_LENGTHS`` tokens: log-normal, median 1,200,
  sigma 0.8 (mean about 1,650; about 1 in 120 reaches the cap), cut at 8,192. A document therefore
  spans several GSM8K examples, their BOS/EOS inside it, as packed pre-training text does.
- ``rl`` (``--data rl``): a GSM8K question as the prompt ("Question: ...\\nAnswer:", BOS first;
  median 66 tokens, max 239), and a completion of ``RL_COMPLETION_LENGTHS`` tokens (log-normal,
  median 2,000, sigma 0.8, about 1 in 25 at the cap of 8,192) cut consecutively from the stream
  of every example's answer ids (EOS included), as a policy's long sampled completion. Each
  example is a ``data.Prompted``: the loss is on the completion only.

Each shape uses its stream once, with no text repeated (about 900 documents, about 360 RL
examples); the last, partial cut is dropped. The lengths come from ``random.Random(seed)``, so
``--seed`` picks them, the same in every process; ``--max-length`` still cuts each example.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import NamedTuple

from .data import Prompted, TokenData, load_default

# "\nAnswer:" in the Mistral-7B ids of build_gsm8k.py's template: "\n", "Ans", "wer", ":"; once in
# every example, so the prompt is everything up to and including it.
_ANSWER_IDS = (13, 2820, 16981, 28747)


class LogNormal(NamedTuple):
    """A length distribution: ``exp(N(ln median, sigma^2))``, rounded, kept within [2, cap]."""

    median: float
    sigma: float
    cap: int

    def draw(self, rng: random.Random) -> int:
        return min(self.cap, max(2, round(rng.lognormvariate(math.log(self.median), self.sigma))))


LONG_LENGTHS = LogNormal(median=1200, sigma=0.8, cap=8192)
RL_COMPLETION_LENGTHS = LogNormal(median=2000, sigma=0.8, cap=8192)


def _cuts(stream: list[int], lengths: LogNormal, rng: random.Random) -> list[list[int]]:
    """Consecutive pieces of ``stream`` with drawn lengths; the last, partial one dropped."""
    pieces, start = [], 0
    while True:
        length = lengths.draw(rng)
        if start + length > len(stream):
            return pieces
        pieces.append(stream[start : start + length])
        start += length


def _prompt_length(example: list[int]) -> int:
    """Index just past the example's "\\nAnswer:" ids."""
    n = len(_ANSWER_IDS)
    for i in range(len(example) - n + 1):
        if tuple(example[i : i + n]) == _ANSWER_IDS:
            return i + n
    raise ValueError("an embedded GSM8K example has no '\\nAnswer:' ids: the data file changed")


def load_long(*, seed: int) -> TokenData:
    """Documents of log-normal length (``LONG_LENGTHS``) cut from the GSM8K token stream.

    Returns:
        TokenData: about 900 plain examples (lists of ids), 2 to 8,192 ids each.
    """
    base = load_default()
    stream = [t for example in base.examples for t in example]
    documents = _cuts(stream, LONG_LENGTHS, random.Random(seed))
    name = "gsm8k-long (synthetic: log-normal lengths, median 1.2k, max 8192, over GSM8K text)"
    return TokenData(name, documents, base.vocab_size)


def load_rl(*, seed: int) -> TokenData:
    """GSM8K questions as prompts, each followed by a long completion cut from the answers' stream.

    Returns:
        TokenData: about 360 ``Prompted`` examples, question ``i`` (in file order) with the
        ``i``-th completion; ``prompt_length`` is the question's ids, BOS to "Answer:".
    """
    base = load_default()
    splits = [_prompt_length(e) for e in base.examples]
    answers = [t for e, split in zip(base.examples, splits, strict=True) for t in e[split:]]
    completions = _cuts(answers, RL_COMPLETION_LENGTHS, random.Random(seed))
    examples = [
        Prompted(e[:split] + completion, prompt_length=split)
        for e, split, completion in zip(base.examples, splits, completions, strict=False)
    ]
    name = (
        "gsm8k-rl (synthetic: GSM8K question prompts, log-normal completions, median 2k, max 8192, "
        "over GSM8K answer text; loss on completions only)"
    )
    return TokenData(name, examples, base.vocab_size)


SHAPES: dict[str, Callable[..., TokenData]] = {"long": load_long, "rl": load_rl}
