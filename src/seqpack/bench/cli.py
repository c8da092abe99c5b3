"""``seqpack-bench``: padding vs transformers' packing vs seqpack, one command, one table.

    seqpack-bench                                   # tiny model, GSM8K, all modes: CPU, < 2 min
    seqpack-bench --model llama-3.2-1b              # on a GPU: bf16, batch 16
    seqpack-bench --model mistral-7b --batch-size 8 --json out.json --plot out.png
    seqpack-bench --model ./my-model --data my.jsonl --text-field text --tokenizer ./my-model
    seqpack-bench --model llama-3.2-1b --data rl      # long RL-like completions, 20 timed steps
    seqpack-bench --model llama-3.2-1b --nproc 8 --token-budget 4096    # DDP over 8 GPUs
    seqpack-bench --nproc 2 --shard fsdp2 --batch-size 4                 # 2 CPU processes (gloo)
    torchrun --nproc-per-node 8 -m seqpack.bench --model mistral-7b     # launched by torchrun

On a GPU keep at least 2 warm-up steps (the default is 3): transformers' flex_attention compiles
for the first packed length and again, shape-dynamic, for the second, and seqpack's first step has
one-off costs too. Warm-up time is reported apart; each mode's slowest timed step is shown next to
its median, with the count of stalls (timed steps over 1.5x the median).

``--data long`` and ``--data rl`` are synthetic lengths over the embedded GSM8K ids (synthetic.py):
long documents, or short prompts with long completions and the loss on the completions only.

``--nproc N`` spawns N processes and prints rank 0's table from the parent (parallel.py says
how and why); under torchrun the command runs as the rank torchrun made it, and rank 0 prints.

Exit status: 0; 1 when a mode failed (its row says why) or a process failed (its traceback is
printed); 2 for bad arguments; 3 when first-step losses disagree and ``--strict-loss`` is given
(without it the disagreement is a loud warning and a JSON flag).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from . import data as data_lib
from . import media, parallel, synthetic
from .modes import CUDA_DEFAULT_MODES, DEFAULT_MODES, MODES
from .parallel import SHARDS, Parallel
from .presets import PRESETS, model_config, vocab_size
from .report import Environment, environment, format_report, warn_mismatch, write_json, write_plot
from .run import LOSS_TOLERANCE, BenchConfig, Result, check_first_losses, run_mode, set_speedups

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXIT_MODE_FAILED = 1
EXIT_LOSS_MISMATCH = 3


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqpack-bench",
        description="Train a model for a few steps with padded batches, transformers' packing and seqpack, "
        "on the same batches, and print time, real-token throughput, peak memory and the speed-up.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: "
        + ", ".join(PRESETS)
        + "\nmodes:\n"
        + "\n".join(f"  {m.name}: {m.summary}" for m in MODES.values()),
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--model",
        type=_csv,
        default=["tiny"],
        help="preset name(s), hub id or local path; comma-separated (default: tiny)",
    )
    what.add_argument(
        "--layers",
        type=_positive,
        default=None,
        metavar="N",
        help="build the model with its first N decoder layers, each at its published width (random "
        "weights), for a model whose full depth with AdamW does not fit; the table says 'N of L layers'",
    )
    what.add_argument(
        "--random-init", action="store_true", help="hub id / path: build from its config with random weights"
    )
    what.add_argument(
        "--modes",
        type=_csv,
        help=f"comma-separated (default: {','.join(DEFAULT_MODES)}; on CUDA {','.join(CUDA_DEFAULT_MODES)})",
    )
    what.add_argument(
        "--hf-attn",
        default=None,
        help="attention for hf-packing (default: flash_attention_3/2 > flex_attention on GPU > sdpa)",
    )
    what.add_argument("--seqpack-backend", default="auto", help="seqpack.patch(backend=...) (default: auto)")
    what.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="seqpack.patch(memory_budget=...) in [0, 1] for the compiled seqpack mode: recompute "
        "activations instead of storing them (default: torch's, 1.0)",
    )
    what.add_argument(
        "--explain",
        action="store_true",
        help="log torch.compile graph breaks and recompiles, and count them per mode after the table",
    )
    what.add_argument("--list", action="store_true", help="list presets and modes, then exit")

    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        default=data_lib.DEFAULT_DATA,
        help="'gsm8k' (embedded, default); 'long' or 'rl', synthetic lengths over the embedded GSM8K ids "
        "(long: log-normal documents, median 1.2k tokens, max 8192; rl: GSM8K question prompts with "
        "log-normal completions, median 2k, max 8192, loss on completions only); a .jsonl file; or a hub "
        "dataset (online, needs `datasets`)",
    )
    data.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    data.add_argument(
        "--template",
        default=None,
        help="format string over the record's fields instead, e.g. 'Question: {question}\\nAnswer: {answer}'",
    )
    data.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model or AutoTokenizer path/id (default: the --model path)",
    )
    data.add_argument("--split", default="train", help="hub dataset split (default: train)")
    data.add_argument(
        "--max-length",
        type=_positive,
        default=None,
        help="cut examples to this many tokens (default: no cut)",
    )

    train = p.add_argument_group("training")
    train.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="examples per batch, per process under --nproc (default: 16)",
    )
    train.add_argument(
        "--token-budget",
        type=_positive,
        default=None,
        metavar="T",
        help="instead of --batch-size: batches from seqpack.TokenBudgetBatchSampler, at most T real tokens "
        "each (per process and step under --nproc, the ranks balanced)",
    )
    train.add_argument(
        "--oversized",
        choices=["error", "alone"],
        default=None,
        help="with --token-budget, an example longer than T: an error (default), or a batch of its own",
    )
    train.add_argument(
        "--steps",
        type=_positive,
        help="timed steps per mode (default: 10 on GPU, 20 with --data long or rl; 4 on CPU)",
    )
    train.add_argument(
        "--warmup",
        type=_non_negative,
        help="warm-up steps before them, timed apart (default: 3 on GPU, 1 on CPU)",
    )
    train.add_argument(
        "--optimizer", choices=["adamw", "sgd", "none"], default="adamw", help="(default: adamw)"
    )
    train.add_argument("--lr", type=float, default=1e-5, help="(default: 1e-5)")
    train.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    train.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    train.add_argument(
        "--seed", type=int, default=0, help="seeds the batches and every mode's initial weights (default: 0)"
    )

    dp = p.add_argument_group("several processes (data-parallel)")
    dp.add_argument(
        "--nproc",
        type=_positive,
        default=None,
        metavar="N",
        help="train every mode data-parallel in N processes, one device each (NCCL on CUDA, gloo on the "
        "CPU); each rank its own batches, the loss over every rank's tokens. Under torchrun leave it out",
    )
    dp.add_argument(
        "--shard",
        choices=SHARDS,
        default=None,
        help="with several processes: ddp (default), or fsdp2 (fully_shard per decoder layer, then the "
        "root; seqpack modes are patched first)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="PATH", help="write one record per (model, mode)")
    out.add_argument(
        "--plot", default=None, metavar="PATH.png", help="throughput and memory bars (needs matplotlib)"
    )
    out.add_argument(
        "--loss-tol",
        type=float,
        default=None,
        help="relative first-loss tolerance (default: 2e-2 bf16, 1e-2 fp16, 1e-4 fp32)",
    )
    out.add_argument(
        "--strict-loss",
        action="store_true",
        help=f"exit {EXIT_LOSS_MISMATCH} when first-step losses disagree",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.modes is None:
        args.modes = list(CUDA_DEFAULT_MODES if args.device.type == "cuda" else DEFAULT_MODES)
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    gpu = args.device.type != "cpu"
    if args.steps is None:
        # Long, uneven lengths: more steps, so that the median and the stall count rest on more than
        # a handful of lengths.
        args.steps = (20 if args.data in synthetic.SHAPES else 10) if gpu else 4
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    embedded = args.data == data_lib.DEFAULT_DATA or args.data in synthetic.SHAPES  # ids, no tokenizer
    if not embedded and args.tokenizer is None:
        local_models = [m for m in args.model if m not in PRESETS]
        if not local_models:
            parser.error("--data needs --tokenizer (a preset has no tokenizer)")
        args.tokenizer = local_models[0]
    if args.token_budget is not None and args.batch_size is not None:
        parser.error(
            "--batch-size and --token-budget exclude each other: a batch is a number of examples or a budget"
        )
    if args.oversized is not None and args.token_budget is None:
        parser.error("--oversized needs --token-budget")
    args.oversized = args.oversized or "error"
    if args.token_budget is None and args.batch_size is None:
        args.batch_size = 16
    _parse_parallel(parser, args)
    return args


def _parse_parallel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set world_size, launched (by torchrun), several and shard; refuse what cannot run."""
    launched = parallel.torchrun_world()
    if launched is not None and args.nproc not in (None, launched):
        parser.error(
            f"--nproc {args.nproc}: torchrun started this process with WORLD_SIZE={launched}; "
            "leave --nproc out under torchrun"
        )
    args.launched = launched is not None
    args.world_size = launched if launched is not None else (args.nproc or 1)
    # --nproc 1 is one spawned rank in a process group of one: the sharded or DDP path and its
    # overhead on a single device, against the same mode run without --nproc.
    args.several = args.launched or args.nproc is not None
    if not args.several:
        if args.shard is not None:
            parser.error("--shard needs --nproc N (1 or more) or a torchrun launch")
        return
    args.shard = args.shard or "ddp"
    what = f"--nproc {args.world_size}" if not args.launched else f"WORLD_SIZE={args.world_size}"
    if args.device.type not in ("cpu", "cuda"):
        parser.error(
            f"{what}: several processes run on CUDA (NCCL) or the CPU (gloo), not {args.device.type}"
        )
    if args.device.type == "cuda" and not args.launched:
        if args.device.index is not None:
            parser.error(
                f"--device {args.device}: under --nproc each process takes the GPU of its rank; "
                "choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if args.world_size > torch.cuda.device_count():
            parser.error(f"{what}: only {torch.cuda.device_count()} CUDA device(s) here, one per process")
    why = parallel.unavailable(args.device, args.shard)
    if why:
        parser.error(f"{what}: {why}")


def _load_data(args: argparse.Namespace) -> data_lib.TokenData:
    if args.data == data_lib.DEFAULT_DATA:
        return data_lib.load_default()
    if args.data in synthetic.SHAPES:
        return synthetic.SHAPES[args.data](seed=args.seed)
    return data_lib.load_text_data(
        args.data,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        template=args.template,
        split=args.split,
    )


def _list() -> str:
    lines = ["presets:"]
    lines += [f"  {p.name:<14} {p.config['model_type']:<8} {p.source}" for p in PRESETS.values()]
    lines += ["modes:"] + [f"  {m.name:<14} {m.summary}" for m in MODES.values()]
    return "\n".join(lines)


def _compile_summary(model: str, mode: str, result) -> str:
    """Graphs, recompiles and graph breaks dynamo counted during one mode's run."""
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    reasons = "; ".join(f"{reason} (x{n})" for reason, n in counters["graph_break"].most_common(3))
    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    line = (
        f"  {model} / {mode}: {graphs} graphs ({result.graphs_in_timed_steps} in the timed steps), "
        f"{breaks} graph breaks, {recompiles} recompiles"
    )
    spent = _compile_phases()
    if spent:
        line += "; compile time: " + ", ".join(f"{name} {t:.1f}s" for name, t in spent.items())
    if torch.cuda.is_available():
        # A stall's other usual suspect: the caching allocator, out of cached blocks, frees them
        # all and retries (a device-wide sync). Counts since the process started.
        stats = torch.cuda.memory_stats()
        line += (
            f"; allocator so far: {stats.get('num_alloc_retries', 0)} retries, "
            f"{stats.get('num_device_alloc', 0)} cudaMalloc, {stats.get('num_device_free', 0)} cudaFree"
        )
    return line + (f": {reasons}" if reasons else "")


# torch.compile's phases worth naming in a warm-up (dynamo's own timer names; absent ones skipped):
# everything, dynamo tracing Python, AOT autograd (forward/backward split), inductor's code
# generation, and the wait on the compiled kernels (Triton on CUDA, C++ on the CPU).
_PHASES = {
    "_compile.compile_inner": "all",
    "bytecode_tracing": "tracing",
    "create_aot_dispatcher_function": "AOT",
    "GraphLowering.codegen": "codegen",
    "async_compile.wait": "kernels",
}
_phases_seen: dict[str, float] = {}


def _compile_phases() -> dict[str, float]:
    """Seconds each phase took since the last call (dynamo's timers add up over the process)."""
    try:
        names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    except Exception:  # a torch without the timers, or with another signature: say nothing
        return {}
    total = {name: float(v) for name, v in zip(names, values, strict=False) if name in _PHASES}
    spent = {_PHASES[name]: t - _phases_seen.get(name, 0.0) for name, t in total.items()}
    _phases_seen.update(total)
    return spent


def _make_plan(args: argparse.Namespace, token_data: data_lib.TokenData) -> list:
    try:
        return data_lib.make_plan(
            token_data,
            num_steps=args.warmup + args.steps,
            seed=args.seed,
            world_size=args.world_size,
            batch_size=args.batch_size,
            token_budget=args.token_budget,
            oversized=args.oversized,
            max_length=args.max_length,
        )
    except ValueError as e:  # only a token budget raises it
        build_parser().error(f"--token-budget {args.token_budget}: {e}")


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def _run_all(
    args: argparse.Namespace, data_vocab: int, plan: list, device: torch.device, par: Parallel | None
) -> tuple[list[Result], list[str]]:
    """Every (model, mode) in this process; under several processes, every rank runs this."""
    quiet = par is not None and par.rank != 0
    cfg = BenchConfig(
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        optimizer=args.optimizer,
        lr=args.lr,
        dtype=DTYPES[args.dtype],
        device=device,
        random_init=args.random_init,
        hf_attn=args.hf_attn,
        seqpack_backend=args.seqpack_backend,
        memory_budget=args.memory_budget,
        parallel=par,
        layers=args.layers,
    )
    if args.explain and not quiet:
        torch._logging.set_logs(graph_breaks=True, recompiles=True)
    results = []
    explained = []
    for model in args.model:
        model_vocab = vocab_size(model)
        model_plan = plan
        if data_vocab > model_vocab:
            if not quiet:
                print(
                    f"note: {model} has a {model_vocab}-token vocab, smaller than the data's {data_vocab}: "
                    "token ids are folded (id % vocab); lengths are unchanged.",
                    file=sys.stderr,
                )
            model_plan = data_lib.fold_vocab(plan, model_vocab)
        spec = media.image_spec(model_config(model, args.layers))
        if spec is not None:  # a vision-language model: an image in front of every example
            model_plan = media.with_images(model_plan, spec, args.seed)
            if not quiet:
                print(f"note: {model}: {media.describe(spec)}", file=sys.stderr)
        for mode in args.modes:
            if args.explain:
                torch._dynamo.utils.counters.clear()
            results.append(run_mode(model, mode, model_plan, cfg))
            if args.explain:
                explained.append(_compile_summary(model, mode, results[-1]))
    return results, explained


def _spawned(
    local_rank: int,
    init_method: str,
    result_path: str,
    args: argparse.Namespace,
    data_vocab: int,
    plan: list,
    parent_threads: int,
) -> None:
    """One process of ``--nproc N`` (parallel.launch): rank 0 hands its results to the parent."""
    if args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N processes share the parent's cores, as torchrun's OMP_NUM_THREADS=1 default intends
        torch.set_num_threads(max(1, parent_threads // args.world_size))
    par = Parallel(local_rank, args.world_size, local_rank, parallel.backend_for(args.device), args.shard)
    device = _rank_device(args.device, local_rank)
    parallel.start(par, device, init_method)
    # A failure raises out of here and ends this process; the launcher stops the others.
    results, explained = _run_all(args, data_vocab, plan, device, par)
    if local_rank == 0:
        parallel.write_result(result_path, (results, explained, environment(device, args.world_size)))
    parallel.stop(device)


def _finish(
    args: argparse.Namespace,
    command: str,
    data_name: str,
    results: list[Result],
    explained: list[str],
    env: Environment,
    *,
    report: bool = True,
) -> int:
    """Check the losses, print the table, write the JSON and plot (``report``); the exit status."""
    tolerance = args.loss_tol if args.loss_tol is not None else LOSS_TOLERANCE[DTYPES[args.dtype]]
    check = check_first_losses(results, tolerance)
    set_speedups(results)
    if report:
        run = {
            "command": command,
            "data": data_name,
            "batch_size": args.batch_size,
            "token_budget": args.token_budget,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": args.dtype,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "seed": args.seed,
            "max_length": args.max_length,
            "loss_tolerance": tolerance,
            "world_size": args.world_size,
            "shard": args.shard or "",
            "backend": parallel.backend_for(args.device) if args.several else None,
        }
        if not check.ok:
            warn_mismatch(check)
        print(format_report(results, check, env, run), flush=True)
        if explained:
            print("\ntorch.compile per mode (graphs after warm-up and timed steps):")
            print("\n".join(explained))
        if args.json:
            write_json(args.json, results, env, run)
        if args.plot:
            write_plot(args.plot, results, env)
    if not check.ok and args.strict_loss:
        return EXIT_LOSS_MISMATCH
    return EXIT_MODE_FAILED if any(r.error for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(_list())
        return 0
    command = shlex.join(["seqpack-bench", *(sys.argv[1:] if argv is None else argv)])
    token_data = _load_data(args)
    plan = _make_plan(args, token_data)

    if args.several and not args.launched:  # --nproc N: spawn the ranks, report here
        try:
            results, explained, env = parallel.launch(
                _spawned, args.world_size, (args, token_data.vocab_size, plan, torch.get_num_threads())
            )
        except parallel.LaunchFailed as e:
            print(
                f"seqpack-bench: a process failed; the others were stopped.\n{e}", file=sys.stderr, flush=True
            )
            return EXIT_MODE_FAILED
        return _finish(args, command, token_data.name, results, explained, env)

    par = None
    device = args.device
    if args.launched:  # torchrun made this process one rank: join its process group
        local_rank = int(os.environ["LOCAL_RANK"])
        rank = int(os.environ["RANK"])
        par = Parallel(rank, args.world_size, local_rank, parallel.backend_for(device), args.shard)
        device = _rank_device(device, local_rank)
        parallel.start(par, device)
    # Under torchrun a failure raises out of here and ends this rank; torchrun stops the others.
    results, explained = _run_all(args, token_data.vocab_size, plan, device, par)
    if par is not None:
        parallel.stop(device)
    env = environment(device, args.world_size)
    return _finish(
        args, command, token_data.name, results, explained, env, report=par is None or par.rank == 0
    )
