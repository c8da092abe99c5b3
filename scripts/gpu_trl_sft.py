r"""TRL SFT on one GPU: the llama-3.2-1b shape on GSM8K, unpatched vs seqpack, step by step.

Each mode builds the same random-init model (same seed), trains it with TRL's SFTTrainer on the
same batches in the same order (bf16, AdamW, constant learning rate) and records every step's
loss, wall time and real (non-pad) tokens. Modes:

    padded            unpatched; TRL's default collator pads each batch (what users get by default)
    trl-padding-free  unpatched; TRL's padding_free=True flattens each batch (transformers' own packing)
    seqpack           patched; TRL's default padded collator, packed inside the model

Prints a table (median real tokens/s over the steady steps, the speed-up over `padded`, peak
memory, the warm-up apart, the loss gap to `padded`), and writes gpu_trl_sft.json and, where
matplotlib is installed, gpu_trl_sft.png (loss curves and tokens/s side by side) to --out.

    python3 scripts/gpu_trl_sft.py --data gsm8k/train.jsonl --tokenizer mistral-7b-v0.1.model --out out/

--data takes a GSM8K-style .jsonl ("Question: {question}\nAnswer: {answer}", tokenised with
--tokenizer: a sentencepiece .model or a tokenizer directory); without it the GSM8K token ids
that ship with seqpack are used (the same ids as `seqpack-bench`).

TRL imports `datasets`, `pyarrow` and `pandas` when it loads, and a GPU machine without network
may lack them (pyarrow alone is a 55 MB wheel). This script gives SFTTrainer tokenised examples
and skips TRL's dataset preparation, so none of the three ever runs: a missing one is replaced by
an empty stand-in module before TRL is imported.

On a GPU machine without network, bring trl (and sentencepiece for --tokenizer) as wheels:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl trl==1.16.0 sentencepiece
    # there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:src
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

# The GPU machine has no network: no hub look-ups, no telemetry (set before transformers loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

MODES = ("padded", "trl-padding-free", "seqpack")


# --------------------------------------------------------------------------- TRL without its data stack


def _stand_in_missing_modules() -> list[str]:
    """Empty stand-ins for the data packages TRL imports at load time but this script never uses.

    Every name TRL reads from a stand-in (for type hints and isinstance checks) is a placeholder
    class that nothing is an instance of, except ``datasets.Dataset``: a list of examples, the one
    type SFTTrainer checks its train_dataset against.
    """
    missing = [name for name in ("datasets", "pyarrow", "pandas") if importlib.util.find_spec(name) is None]

    class Dataset(torch.utils.data.Dataset):
        cache_files: list = []  # in memory (TRL's telemetry asks)

        def __init__(self, rows: list[dict]):
            self.rows = rows
            self.column_names = list(rows[0])

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

        @classmethod
        def from_list(cls, rows):
            return cls(rows)

    def stand_in(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # find_spec() must not fail
        placeholders: dict[str, type] = {}

        def __getattr__(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return placeholders.setdefault(attr, type(attr, (), {"__module__": name}))

        module.__getattr__ = __getattr__
        sys.modules[name] = module
        return module

    for name in missing:
        module = stand_in(name)
        if name == "datasets":
            module.Dataset = Dataset
        if name == "pyarrow":
            for sub in ("compute", "types"):
                setattr(module, sub, stand_in(f"pyarrow.{sub}"))
    return missing


# --------------------------------------------------------------------------- data and model


def load_examples(args) -> tuple[list[list[int]], str]:
    """Token ids per example (BOS first), cut to --max-length, and a name for the report."""
    from seqpack.bench.data import load_default, load_text_data

    if args.data is None:
        data = load_default()
    else:
        if args.tokenizer is None:
            raise SystemExit("--data needs --tokenizer (a sentencepiece .model or a tokenizer directory)")
        data = load_text_data(args.data, tokenizer=args.tokenizer, template=args.template)
    examples = [ids[: args.max_length] for ids in data.examples if len(ids) >= 2]
    return examples, data.name


def special_tokens_only():
    """SFTTrainer wants a tokenizer for its pad id; the data is already ids (Mistral's specials)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=specials, unk_token="<unk>", pad_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Wall time of every optimizer step, the device synchronised around it."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.times.append(time.perf_counter() - self._start)


def _patch_options(patch, args, *, keep_logits: bool) -> dict:
    """The patch() options this seqpack has (compile and keep_logits came with the speed work)."""
    accepted = inspect.signature(patch).parameters
    options = {}
    if "compile" in accepted:
        options["compile"] = not args.no_compile
    if "keep_logits" in accepted:
        options["keep_logits"] = keep_logits
    return options


def run_mode(mode: str, examples: list[list[int]], args) -> dict:
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from seqpack import patch
    from seqpack.bench.presets import build_config

    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            build_config(args.model), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    padding_free = mode == "trl-padding-free"
    config = SFTConfig(
        output_dir=str(Path(args.out) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        bf16=True,
        gradient_checkpointing=args.gradient_checkpointing,
        padding_free=padding_free,
        max_length=None,  # cut to --max-length already
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenised here; labels = input_ids
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        seed=args.seed,
    )
    from datasets import Dataset  # the real one, or the stand-in

    dataset = Dataset.from_list([{"input_ids": ids} for ids in examples])
    clock = StepClock()
    if mode == "seqpack" and not args.patch_after:
        patch(model, **_patch_options(patch, args, keep_logits=False))
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=special_tokens_only(),
        callbacks=[clock],
    )
    if mode == "seqpack" and args.patch_after:
        # After the trainer: TRL has swapped in its fused LM head, which seqpack leaves in place and
        # feeds through the packed backbone.
        patch(trainer.model, **_patch_options(patch, args, keep_logits=False))

    # A packed batch reaches the embeddings as one (1, T) row; a padded one as (B, L).
    shapes = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, inputs, out: shapes.append(inputs[0].shape[0])
    )

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    tokens = [int(h["num_tokens"]) for h in logs]  # cumulative real tokens (mask sum, or packed length)
    result = {
        "mode": mode,
        "losses": [h["loss"] for h in logs],
        "token_accuracy": [h.get("mean_token_accuracy") for h in logs],
        "step_tokens": [b - a for a, b in zip([0] + tokens[:-1], tokens, strict=True)],
        "step_seconds": clock.times,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
        "train_seconds": total,
        "packed": bool(shapes) and all(b == 1 for b in shapes),
    }
    del trainer, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- report


def summarize(result: dict, warmup: int) -> dict:
    steady = list(zip(result["step_tokens"], result["step_seconds"], strict=True))[warmup:]
    per_step = [n / s for n, s in steady]
    return {
        "tokens_per_s": statistics.median(per_step),
        "tokens_per_s_mean": sum(n for n, _ in steady) / sum(s for _, s in steady),
        "warmup_s": sum(result["step_seconds"][:warmup]),
        "final_loss": statistics.mean(result["losses"][-10:]),
    }


def print_table(results: list[dict], header: str, warmup: int) -> None:
    base = next((r for r in results if r["mode"] == "padded"), results[0])
    base_tps = summarize(base, warmup)["tokens_per_s"]
    print(header)
    print(
        f"| {'mode':<17}| {'real tok/s':>11} | {'vs padded':>9} | {'peak GiB':>8} | {'warm-up s':>9} "
        f"| {'loss (last 10)':>14} | {'max rel. loss gap':>17} | packed |"
    )
    print(f"|{'-' * 18}|{'-' * 13}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 16}|{'-' * 19}|{'-' * 8}|")
    for r in results:
        s = summarize(r, warmup)
        gap = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"], strict=True))
        print(
            f"| {r['mode']:<17}| {s['tokens_per_s']:>11,.0f} | {s['tokens_per_s'] / base_tps:>8.2f}x "
            f"| {r['peak_gib']:>8.1f} | {s['warmup_s']:>9.1f} | {s['final_loss']:>14.4f} | {gap:>17.2e} "
            f"| {'yes' if r['packed'] else 'no':>6} |"
        )


def plot(results: list[dict], path: Path, warmup: int, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = range(1, len(r["losses"]) + 1)
        ax_loss.plot(steps, r["losses"], label=r["mode"], linewidth=1)
        speed = [n / s for n, s in zip(r["step_tokens"], r["step_seconds"], strict=True)]
        ax_speed.plot(list(steps)[warmup:], speed[warmup:], label=r["mode"], linewidth=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss per step")
    ax_speed.set(xlabel="step", ylabel="real tokens / s", title=f"throughput (after {warmup} warm-up steps)")
    for ax in (ax_loss, ax_speed):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", help="GSM8K-style .jsonl (default: the GSM8K token ids shipped with seqpack)"
    )
    parser.add_argument("--tokenizer", help="sentencepiece .model or tokenizer directory, for --data")
    parser.add_argument("--template", default="Question: {question}\nAnswer: {answer}")
    parser.add_argument("--model", default="llama-3.2-1b", help="a seqpack.bench preset (random init)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--warmup", type=int, default=10, help="steps left out of tokens/s (compile, allocator)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here")
    parser.add_argument("--no-compile", action="store_true", help="seqpack mode without torch.compile")
    parser.add_argument(
        "--patch-after",
        action="store_true",
        help="patch trainer.model after building the trainer (default: patch the model first)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/gpu_trl_sft")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test only")
    parser.add_argument("--plot-from", help="only draw the plot of an earlier run's gpu_trl_sft.json")
    args = parser.parse_args()
    if args.plot_from:
        report = json.loads(Path(args.plot_from).read_text())
        path = Path(args.plot_from).with_suffix(".png")
        if not plot(report["results"], path, report["args"]["warmup"], report["header"]):
            raise SystemExit("--plot-from needs matplotlib")
        print_table(report["results"], report["header"], report["args"]["warmup"])
        print(f"wrote {path}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu --model tiny for a smoke test)")
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    stand_ins = _stand_in_missing_modules()
    import transformers
    import trl

    import seqpack

    examples, data_name = load_examples(args)
    header = (
        f"TRL SFTTrainer, {args.model} (random init), {data_name}, batch {args.batch_size}, bf16, AdamW, "
        f"{args.steps} steps ({args.warmup} warm-up), gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}\n"
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, seqpack {seqpack.__version__}"
        + (f" (stand-ins for {', '.join(stand_ins)})" if stand_ins else "")
    )
    results = []
    for mode in modes:
        results.append(run_mode(mode, examples, args))
        print(f"{mode}: {results[-1]['train_seconds']:.1f} s", flush=True)

    out = Path(args.out)
    report = {"header": header, "args": vars(args), "results": results}
    report["summary"] = {r["mode"]: summarize(r, args.warmup) for r in results}
    (out / "gpu_trl_sft.json").write_text(json.dumps(report, indent=1))
    print_table(results, header, args.warmup)
    plotted = plot(results, out / "gpu_trl_sft.png", args.warmup, header)
    print(f"wrote {out / 'gpu_trl_sft.json'}" + (f" and {out / 'gpu_trl_sft.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
