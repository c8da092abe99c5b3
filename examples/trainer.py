r"""Fine-tune a causal LM with the Hugging Face Trainer, padding-free through seqpack.

The Trainer, its padding collator and its loss bookkeeping stay as they are; ``patch(model)`` is
the only change. With no arguments it trains the ``tiny`` preset (random weights, the Mistral-7B
vocab) on the GSM8K token ids that ship with seqpack, on a CPU, in seconds. On a GPU, name a
model and a dataset:

    python examples/trainer.py
    python examples/trainer.py --model Qwen/Qwen2.5-0.5B --data train.jsonl \
        --template "Question: {question}\nAnswer: {answer}" \
        --bf16 --max-steps 500 --batch-size 16 --max-length 1024

Prints one JSON line: the loss of each step, and whether every batch reached the model packed.
"""

import argparse
import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from seqpack import patch
from seqpack.bench.data import load_default, load_text_data
from seqpack.bench.presets import PRESETS, build_config


def ids_as_words(vocab_size: int) -> PreTrainedTokenizerFast:
    """A stand-in for the Mistral tokenizer that made the shipped ids: id i <-> the word "<i>".

    Enough for collators (padding) and trainers that tokenise text themselves, with no download.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<{i}>": i for i in range(3, vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_model_and_tokenizer(name: str, dtype: torch.dtype):
    """A preset (random weights, special tokens only) or a hub id / local path."""
    if name in PRESETS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(name), dtype=dtype)
        tokenizer = ids_as_words(model.config.vocab_size)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def load_examples(args) -> list[list[int]]:
    """Token ids per example: the shipped GSM8K ids, or a JSONL file / hub dataset tokenised here."""
    if args.data is None:
        examples = load_default().examples
    else:
        data = load_text_data(args.data, tokenizer=args.tokenizer or args.model, template=args.template)
        examples = data.examples
    return [ids[: args.max_length] for ids in examples if len(ids) >= 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a hub id / path")
    parser.add_argument(
        "--data", help="a .jsonl file or a hub dataset (default: GSM8K token ids shipped with seqpack)"
    )
    parser.add_argument(
        "--template", help='e.g. "Question: {question}\\nAnswer: {answer}" (default: the "text" field)'
    )
    parser.add_argument("--tokenizer", help="tokenizer for --data (default: --model)")
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-patch", action="store_true", help="train unpatched, to compare")
    parser.add_argument("--output-dir", default="out/examples/trainer")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    model, tokenizer = load_model_and_tokenizer(args.model, torch.bfloat16 if args.bf16 else torch.float32)
    if not args.no_patch:
        patch(model, compile=cuda)  # compiling pays off on a GPU; on a CPU it outlasts a short run

    # A packed batch reaches the embeddings as one (1, T) row; a padded one as (B, L).
    packed = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, inputs, out: packed.append(inputs[0].shape[0] == 1)
    )

    train_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        bf16=args.bf16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        disable_tqdm=True,
        seed=0,
    )
    dataset = [{"input_ids": ids} for ids in load_examples(args)]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # pads; labels -100 at padding
    trainer = Trainer(model=model, args=train_args, train_dataset=dataset, data_collator=collator)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(
        json.dumps({"losses": losses, "patched": not args.no_patch, "packed": bool(packed) and all(packed)})
    )


if __name__ == "__main__":
    main()
