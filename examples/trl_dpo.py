r"""Preference optimisation with TRL's DPOTrainer, padding-free through seqpack.

DPO runs the policy and the reference model on padded [chosen; rejected] batches and compares the
log-probabilities of the completions. seqpack packs those batches inside both models; TRL's
collator, loss and logged metrics stay as they are. With no arguments it trains the ``tiny``
preset (random weights, the Mistral-7B vocab) on preference pairs cut from the GSM8K token ids
that ship with seqpack (prompt: the first half of an example; chosen: its second half;
rejected: the second half of another example), on a CPU, in seconds. On a GPU:

    python examples/trl_dpo.py
    python examples/trl_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data trl-lib/ultrafeedback_binarized \
        --bf16 --max-steps 500 --batch-size 8 --max-length 1024

Prints one JSON line: the loss of each step, the chosen log-probs, and whether every batch reached
both models packed.
"""

import argparse
import json

import torch
from datasets import Dataset, load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

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


def load_model(name: str, dtype: torch.dtype):
    """A preset (random weights, the same for every call) or a hub id / local path."""
    if name in PRESETS:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(build_config(name), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


def gsm8k_pairs(n: int, tokenizer) -> Dataset:
    """Text preference pairs from the shipped token ids (the stand-in tokenizer maps them back)."""
    examples = load_default().examples[: n + 1]
    rows = []
    for this, other in zip(examples[:-1], examples[1:], strict=True):
        cut, other_cut = len(this) // 2, len(other) // 2
        rows.append({
            "prompt": tokenizer.decode(this[1:cut]),  # without BOS: no template here adds one
            "chosen": " " + tokenizer.decode(this[cut:-1]),  # without EOS: DPOTrainer appends it
            "rejected": " " + tokenizer.decode(other[other_cut:-1]),
        })  # fmt: skip
    return Dataset.from_list(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a hub id / path")
    parser.add_argument(
        "--data", help="a hub dataset or .jsonl with prompt/chosen/rejected (default: GSM8K pairs)"
    )
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-patch", action="store_true", help="train unpatched, to compare")
    parser.add_argument("--output-dir", default="out/examples/trl_dpo")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, ref_model = load_model(args.model, dtype), load_model(args.model, dtype)
    tokenizer = (
        ids_as_words(model.config.vocab_size)
        if args.model in PRESETS
        else AutoTokenizer.from_pretrained(args.model)
    )
    if not args.no_patch:
        patch(model, compile=cuda)  # compiling pays off on a GPU; on a CPU it outlasts a short run
        patch(ref_model, compile=cuda)

    # A packed batch reaches the embeddings as one (1, T) row; a padded one as (B, L).
    packed = []
    for m in (model, ref_model):
        m.get_input_embeddings().register_forward_hook(
            lambda mod, inputs, out: packed.append(inputs[0].shape[0] == 1)
        )

    if args.data is None:
        dataset = gsm8k_pairs(args.max_steps * args.batch_size, tokenizer)
    elif args.data.endswith(".jsonl"):
        dataset = load_dataset("json", data_files=args.data, split="train")
    else:
        dataset = load_dataset(args.data, split="train")

    config = DPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        bf16=args.bf16,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({
        "losses": [h["loss"] for h in logs],
        "logps_chosen": [h["logps/chosen"] for h in logs],
        "patched": not args.no_patch,
        "packed": bool(packed) and all(packed),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
