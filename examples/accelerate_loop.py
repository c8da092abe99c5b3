r"""A hand-written training loop with Accelerate, padding-free through seqpack.

The loop is the usual one (prepare, accumulate, backward, step); ``patch(model)`` is the only
change, and the padded batches of an ordinary collator go in as they are. With no arguments it
trains the ``tiny`` preset (random weights, the Mistral-7B vocab) on the GSM8K token ids that ship
with seqpack, on a CPU, in seconds. On a GPU, name a model and a dataset:

    python examples/accelerate_loop.py
    accelerate launch examples/accelerate_loop.py --model Qwen/Qwen2.5-0.5B --data train.jsonl \
        --template "Question: {question}\nAnswer: {answer}" \
        --bf16 --max-steps 500 --batch-size 16 --max-length 1024

Gradient accumulation divides each micro-batch's summed loss by the token count of the whole
step (``num_items_in_batch``), as the HF Trainer does, so every token weighs the same.

Prints one JSON line: the loss of each step, and whether every batch reached the model packed.
"""

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
)

from seqpack import patch
from seqpack.bench.data import load_default, load_text_data
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
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a hub id / path")
    parser.add_argument(
        "--data", help="a .jsonl file or a hub dataset (default: GSM8K token ids shipped with seqpack)"
    )
    parser.add_argument(
        "--template", help='e.g. "Question: {question}\\nAnswer: {answer}" (default: the "text" field)'
    )
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-patch", action="store_true", help="train unpatched, to compare")
    args = parser.parse_args()

    set_seed(0)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, mixed_precision="bf16" if args.bf16 else "no"
    )
    model, tokenizer = load_model_and_tokenizer(args.model, torch.float32)
    if not args.no_patch:
        # compiling pays off on a GPU; on a CPU it outlasts a short run
        patch(model, compile=accelerator.device.type == "cuda")

    # A packed batch reaches the embeddings as one (1, T) row; a padded one as (B, L).
    packed = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, inputs, out: packed.append(inputs[0].shape[0] == 1)
    )

    if args.data is None:
        examples = load_default().examples
    else:
        examples = load_text_data(args.data, tokenizer=args.model, template=args.template).examples
    dataset = [{"input_ids": ids[: args.max_length]} for ids in examples if len(ids) >= 2]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # pads; labels -100 at padding
    micro_batch = args.batch_size
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, shuffle=True, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    losses, window = [], []
    for batch in loader:
        window.append(batch)
        if len(window) < args.grad_accum:
            continue
        # The step's target-token count: labels are shifted by one inside the model.
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        step_loss = 0.0
        for micro in window:
            with accelerator.accumulate(model):
                loss = model(**micro, num_items_in_batch=n_items).loss
                # Accelerate divides by the accumulation steps; the token count already did that.
                accelerator.backward(loss * args.grad_accum)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += loss.item()
        losses.append(step_loss)
        window = []
        if len(losses) == args.max_steps:
            break

    print(
        json.dumps({"losses": losses, "patched": not args.no_patch, "packed": bool(packed) and all(packed)})
    )


if __name__ == "__main__":
    main()
