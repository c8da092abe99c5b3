r"""Supervised fine-tuning with TRL's SFTTrainer, padding-free through seqpack.

TRL's default collator pads each batch; seqpack packs it inside the model, so the data pipeline,
the loss and TRL's logged metrics (token accuracy, entropy) stay as they are. With no arguments it
trains the ``tiny`` preset (random weights, the Mistral-7B vocab) on the GSM8K token ids that ship
with seqpack, on a CPU, in seconds. On a GPU, name a model and a dataset:

    python examples/trl_sft.py
    python examples/trl_sft.py --model Qwen/Qwen2.5-0.5B --data trl-lib/Capybara \
        --bf16 --max-steps 500 --batch-size 16 --max-length 1024

Prints one JSON line: the loss of each step, TRL's token accuracy, and whether every batch reached
the model packed.
"""

import argparse
import json

import torch
from datasets import Dataset, load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from seqpack import patch
from seqpack.bench.data import load_default
from seqpack.bench.presets import PRESETS, build_config


def ids_as_words(vocab_size: int) -> PreTrainedTokenizerFast:
    """A stand-in for the Mistral tokenizer that made the shipped ids: id i <-> the word "<i>"."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<{i}>": i for i in range(3, vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", pad_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_model_and_tokenizer(name: str, dtype: torch.dtype):
    """A preset (random weights) or a hub id / local path."""
    if name in PRESETS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(name), dtype=dtype)
        return model, ids_as_words(model.config.vocab_size)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a hub id / path")
    parser.add_argument(
        "--data", help="a hub dataset or .jsonl in a TRL SFT format (default: shipped GSM8K ids)"
    )
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--padding-free", action="store_true", help="TRL's own flattening collator")
    parser.add_argument("--no-patch", action="store_true", help="train unpatched, to compare")
    parser.add_argument("--output-dir", default="out/examples/trl_sft")
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

    if args.data is None:
        examples = load_default().examples[: args.max_steps * args.batch_size]  # what the run consumes
        dataset = Dataset.from_list([{"input_ids": ids[: args.max_length]} for ids in examples])
    elif args.data.endswith(".jsonl"):
        dataset = load_dataset("json", data_files=args.data, split="train")
    else:
        dataset = load_dataset(args.data, split="train")

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        bf16=args.bf16,
        max_length=None if args.padding_free else args.max_length,
        padding_free=args.padding_free,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({
        "losses": [h["loss"] for h in logs],
        "token_accuracy": [h["mean_token_accuracy"] for h in logs],
        "patched": not args.no_patch,
        "packed": bool(packed) and all(packed),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
