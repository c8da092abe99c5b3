"""Regenerate the benchmark's default data: GSM8K train, tokenised, as compact token ids.

The benchmark must run offline and without a tokenizer, so the package ships the token ids of every
GSM8K train example rather than the text. Each example is formatted as

    "Question: {question}\\nAnswer: {answer}"

and tokenised with the Mistral-7B v0.1 sentencepiece model, with BOS prepended and EOS appended
(the usual supervised fine-tuning layout; it gives mean 198.9 / median 185 / max 560 tokens).

Output (next to this script unless --out says otherwise):
    gsm8k_train.tokens.gz   gzip of: b"SQPTOK01", uint32 n, uint32 vocab_size,
                            n x uint32 lengths, sum(lengths) x uint16 token ids (all little-endian)
    gsm8k_train.json        where it came from: source files and their sha256, tokenizer, template, stats

Needs `sentencepiece` (build time only; the benchmark reads the file with the standard library):

    python src/seqpack/bench/data/build_gsm8k.py \\
        --gsm8k /work/shared/data/gsm8k/train.jsonl \\
        --tokenizer /work/shared/data/tokenizers/mistral-7b-v0.1.model

GSM8K: https://github.com/openai/grade-school-math, MIT licence (copied here as LICENSE-gsm8k).
Tokenizer: mistralai/Mistral-7B-v0.1 `tokenizer.model`, Apache-2.0; only token ids are shipped.
"""

from __future__ import annotations

import argparse
import array
import gzip
import hashlib
import json
import shutil
import statistics
import struct
import sys
from pathlib import Path

MAGIC = b"SQPTOK01"
TEMPLATE = "Question: {question}\nAnswer: {answer}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(gsm8k: Path, tokenizer: Path, out: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    rows = [json.loads(line) for line in gsm8k.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [TEMPLATE.format(question=r["question"], answer=r["answer"]) for r in rows]
    examples = [[sp.bos_id(), *ids, sp.eos_id()] for ids in sp.encode(texts)]
    vocab_size = sp.vocab_size()
    if vocab_size > 1 << 16:
        raise ValueError(f"vocab of {vocab_size} does not fit uint16")

    lengths = array.array("I", [len(ids) for ids in examples])  # uint32
    ids = array.array("H", [t for example in examples for t in example])  # uint16
    if sys.byteorder == "big":
        lengths.byteswap()
        ids.byteswap()
    payload = MAGIC + struct.pack("<II", len(examples), vocab_size) + lengths.tobytes() + ids.tobytes()
    out.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the file byte-identical across rebuilds.
    with (
        open(out / "gsm8k_train.tokens.gz", "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f,
    ):
        f.write(payload)

    n_tokens = [len(e) for e in examples]
    meta = {
        "name": "gsm8k-train",
        "description": "GSM8K train, 'Question: ...\\nAnswer: ...', Mistral-7B v0.1 tokenizer, BOS + EOS",
        "source": "https://github.com/openai/grade-school-math (grade_school_math/data/train.jsonl)",
        "source_sha256": _sha256(gsm8k),
        "license": "MIT (LICENSE-gsm8k)",
        "tokenizer": "mistralai/Mistral-7B-v0.1 tokenizer.model (sentencepiece, Apache-2.0)",
        "tokenizer_sha256": _sha256(tokenizer),
        "template": TEMPLATE,
        "bos": sp.bos_id(),
        "eos": sp.eos_id(),
        "vocab_size": vocab_size,
        "examples": len(examples),
        "tokens": sum(n_tokens),
        "length_mean": round(statistics.mean(n_tokens), 2),
        "length_median": statistics.median(n_tokens),
        "length_min": min(n_tokens),
        "length_max": max(n_tokens),
    }
    (out / "gsm8k_train.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    licence = gsm8k.parent / "LICENSE"
    if licence.exists():
        shutil.copyfile(licence, out / "LICENSE-gsm8k")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", type=Path, default=Path("/work/shared/data/gsm8k/train.jsonl"))
    parser.add_argument(
        "--tokenizer", type=Path, default=Path("/work/shared/data/tokenizers/mistral-7b-v0.1.model")
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    print(json.dumps(build(args.gsm8k, args.tokenizer, args.out), indent=2))


if __name__ == "__main__":
    main()
