"""The benchmark command on the CPU with the `tiny` preset: arguments, data, JSON, the loss check.

One three-mode run (module fixture, a few tiny steps) feeds the output tests; the loss-check and
failure tests add cheap padded-only modes to the registry for their duration. The tests of
``--nproc`` launch two CPU processes (gloo), each on one of the two cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import statistics
import sys
import time

import pytest
import torch

from seqpack.bench import cli, data, modes, parallel, presets, report, run, synthetic

TINY_RUN = ["--model", "tiny", "--batch-size", "3", "--max-length", "100", "--steps", "2", "--warmup", "1"]
RECORD_KEYS = {
    "model": str,
    "mode": str,
    "attn_implementation": str,
    "steps": int,
    "warmup_steps": int,
    "warmup_time_s": float,
    "time_s": float,
    "step_time_median_s": float,
    "tokens_per_s": float,
    "peak_mem_mb": float,
    "held_mem_mb": float,
    "activation_mem_mb": float,
    "mem_method": str,
    "real_tokens": int,
    "padded_tokens": int,
    "first_loss": float,
    "losses": list,
    "loss_rel_diff": float,
    "loss_mismatch": bool,
    "speedup": float,
    "world_size": int,
    "shard": str,
    "tokens_per_s_per_process": float,
    "token_imbalance_max": float,
    "token_imbalance_mean": float,
    "busy_imbalance_max": float,
    "busy_imbalance_mean": float,
    "rank_real_tokens": list,
    "rank_step_times_s": list,
    "rank_busy_s": list,
    "device": str,
    "device_name": str,
    "torch_version": str,
    "transformers_version": str,
    "seqpack_version": str,
    "batch_size": int,
    "dtype": str,
    "optimizer": str,
    "loss_tolerance": float,
    "command": str,
}


def _tiny_model():
    """The tiny preset as every mode builds it (seed 0, fp32, CPU), unpatched."""
    return presets.load_model(
        "tiny",
        attn_implementation="sdpa",
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=0,
        random_init=False,
    )


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- arguments


def test_defaults_are_the_cpu_main_job():
    args = cli.parse_args(["--device", "cpu"])
    assert args.model == ["tiny"]
    assert args.modes == ["padding", "hf-packing", "seqpack"]
    assert (args.batch_size, args.optimizer, args.data) == (16, "adamw", "gsm8k")
    assert (args.device.type, args.dtype, args.steps, args.warmup) == ("cpu", "fp32", 4, 1)


def test_on_cuda_the_tuned_padded_path_runs_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = cli.parse_args([])
    assert args.device.type == "cuda"
    assert args.modes == ["padding", "padding-no-cudnn", "hf-packing", "seqpack"]
    assert (args.dtype, args.steps, args.warmup) == ("bf16", 10, 3)
    assert cli.parse_args(["--modes", "seqpack"]).modes == ["seqpack"]


def test_arguments_parse():
    args = cli.parse_args(
        [
            "--model",
            "llama-3.2-1b,mistral-7b",
            "--modes",
            "padding,seqpack",
            "--batch-size",
            "8",
            "--steps",
            "5",
        ]
        + ["--warmup", "0", "--optimizer", "sgd", "--dtype", "bf16", "--device", "cpu", "--strict-loss"]
        + ["--hf-attn", "eager", "--loss-tol", "0.5", "--json", "x.json", "--max-length", "64"]
    )
    assert args.model == ["llama-3.2-1b", "mistral-7b"]
    assert args.modes == ["padding", "seqpack"]
    assert (args.batch_size, args.steps, args.warmup, args.optimizer, args.dtype) == (8, 5, 0, "sgd", "bf16")
    assert (args.hf_attn, args.loss_tol, args.json, args.max_length, args.strict_loss) == (
        "eager",
        0.5,
        "x.json",
        64,
        True,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "padding,nope"], "unknown ['nope']"),
        (["--optimizer", "lion"], "invalid choice"),
        (["--batch-size", "0"], "must be >= 1"),
        (["--data", "my.jsonl"], "--data needs --tokenizer"),
        (["--nproc", "0"], "argument --nproc: must be >= 1, got 0"),
        (["--shard", "fsdp2"], "--shard needs --nproc N (1 or more) or a torchrun launch"),
        (["--nproc", "2", "--shard", "zero3"], "invalid choice: 'zero3'"),
        (
            ["--token-budget", "512", "--batch-size", "4"],
            "--batch-size and --token-budget exclude each other",
        ),
        (["--token-budget", "0"], "argument --token-budget: must be >= 1"),
        (["--oversized", "alone"], "--oversized needs --token-budget"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_several_processes_on_cuda_need_a_gpu_each(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for argv, message in [
        (["--nproc", "2"], "--nproc 2: only 1 CUDA device(s) here, one per process"),
        (["--nproc", "2", "--device", "cuda:0"], "each process takes the GPU of its rank"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_under_torchrun_the_world_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = cli.parse_args(["--device", "cpu"])
    assert (args.launched, args.world_size, args.several, args.shard) == (True, 2, True, "ddp")
    assert cli.parse_args(["--device", "cpu", "--nproc", "2", "--shard", "fsdp2"]).shard == "fsdp2"
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--nproc", "4"])
    assert "torchrun started this process with WORLD_SIZE=2; leave --nproc out" in capsys.readouterr().err
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    # --nproc 1 (no torchrun): one rank in a process group, the wrapper's overhead on one device
    one = cli.parse_args(["--device", "cpu", "--nproc", "1", "--shard", "fsdp2"])
    assert (one.world_size, one.several, one.shard) == (1, True, "fsdp2")


def test_a_token_budget_below_the_longest_example_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--token-budget", "300", "--modes", "padding"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--token-budget 300: " in err and "examples are longer than the budget (the longest has 560" in err
    assert "--max-length 300, or pass --oversized alone" in err


def test_list_names_presets_and_modes(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in [
        "tiny",
        "llama-3.2-1b",
        "llama-2-7b",
        "mistral-7b",
        "qwen2.5-0.5b",
        "qwen2.5-7b",
        "gemma-2-2b",
    ]:
        assert name in out
    for name in modes.DEFAULT_MODES:
        assert name in out


# --------------------------------------------------------------------------- data


def test_embedded_gsm8k_has_real_lengths_and_ids():
    d = data.load_default()
    lengths = [len(e) for e in d.examples]
    assert (len(lengths), d.vocab_size) == (7473, 32000)
    assert (min(lengths), max(lengths), sorted(lengths)[len(lengths) // 2]) == (74, 560, 185)
    assert sum(lengths) / len(lengths) == pytest.approx(198.91, abs=0.01)
    assert all(e[0] == 1 and e[-1] == 2 for e in d.examples)  # BOS ... EOS
    assert max(max(e) for e in d.examples) < d.vocab_size
    # "Question:" opens every example: the same leading ids everywhere.
    assert len({tuple(e[:3]) for e in d.examples}) == 1


def test_batches_are_seeded_and_cut():
    d = data.load_default()
    a = data.make_batches(d, batch_size=4, num_batches=3, seed=1)
    assert a == data.make_batches(d, batch_size=4, num_batches=3, seed=1)
    assert a != data.make_batches(d, batch_size=4, num_batches=3, seed=2)
    assert [len(b) for b in a] == [4, 4, 4]
    cut = data.make_batches(d, batch_size=4, num_batches=3, seed=1, max_length=80)
    assert all(len(e) <= 80 for b in cut for e in b)
    assert [[e[:80] for e in b] for b in a] == cut


def test_token_file_rejects_garbage():
    with pytest.raises(ValueError, match="bad magic"):
        data.decode_token_file(b"not a token file", "x")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


RECORDS = [
    {"question": "How many apples are left?", "answer": "Two apples."},
    {
        "question": "What is seven times six?",
        "answer": "It is forty two, because seven sixes make forty two.",
    },
    {"question": "Why?", "answer": "Because."},
]


def test_user_jsonl_with_a_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in RECORDS] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=40, minloglevel=2
    )
    (tmp_path / "tok.model").write_bytes(model.getvalue())
    _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    got = data.load_text_data(
        str(tmp_path / "data.jsonl"),
        tokenizer=str(tmp_path / "tok.model"),
        template="Question: {question}\nAnswer: {answer}",
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert got.vocab_size == 40
    assert got.examples == [[sp.bos_id(), *sp.encode(text)] for text in corpus[:3]]


def test_user_jsonl_with_an_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in RECORDS for w in r["answer"].split()})
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    _write_jsonl(tmp_path / "data.jsonl", [{"text": r["answer"]} for r in RECORDS])
    got = data.load_text_data(
        str(tmp_path / "data.jsonl"), tokenizer=str(tmp_path / "tok"), text_field="text"
    )
    assert got.examples == [[vocab[w] for w in r["answer"].split()] for r in RECORDS]
    assert got.vocab_size == len(vocab)
    with pytest.raises(SystemExit, match="no field 'body'"):
        data.load_text_data(str(tmp_path / "data.jsonl"), tokenizer=str(tmp_path / "tok"), text_field="body")


@pytest.mark.parametrize("random_init", [True, False], ids=["random-init", "pretrained"])
def test_a_local_model_on_user_data(tmp_path, random_init):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = sorted({w for r in RECORDS for w in r["answer"].split()})
    backend = Tokenizer(
        models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "model")
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    if random_init:
        config.save_pretrained(tmp_path / "model")
    else:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    _write_jsonl(tmp_path / "data.jsonl", [{"text": r["answer"]} for r in RECORDS])
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "data.jsonl"),
        "--json",
        str(tmp_path / "o.json"),
    ]
    argv += ["--modes", "padding,hf-packing", "--batch-size", "2", "--steps", "2", "--warmup", "0"]
    code, out, err = _main(argv + (["--random-init"] if random_init else []))
    assert code == 0, err
    records = json.loads((tmp_path / "o.json").read_text())
    assert [r["mode"] for r in records] == ["padding", "hf-packing"]
    assert records[0]["first_loss"] == pytest.approx(records[1]["first_loss"], rel=1e-4)
    assert records[0]["data"] == "data.jsonl (model)"


# --------------------------------------------------------------------------- one real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.json"
    code, out, err = _main([*TINY_RUN, "--json", str(path)])
    return code, out, err, json.loads(path.read_text())


def test_run_prints_the_table(tiny_run):
    code, out, err, _ = tiny_run
    assert code == 0, err
    assert "| Model | Data Process" in out
    assert "| Time (s) | Throughput (token/s) | Memory (MB) | Speed-up |" in out
    for line in ["padding (sdpa)", "hf-packing (sdpa)", "seqpack ("]:
        assert line in out
    assert f"torch {torch.__version__}" in out and "transformers " in out
    assert "First-step loss agreement" in out and ": OK" in out
    assert "command: seqpack-bench --model tiny --batch-size 3" in out
    assert "tiny / seqpack" in err  # the progress report goes to stderr
    # One process: the table of the main job, no columns of several processes.
    assert "batch 3 ·" in out and "Per process" not in out and "imbalance" not in out
    assert "processes:" not in out


def test_json_has_one_record_per_model_and_mode(tiny_run):
    _, _, _, records = tiny_run
    assert [(r["model"], r["mode"]) for r in records] == [("tiny", m) for m in modes.DEFAULT_MODES]
    for r in records:
        for key, kind in RECORD_KEYS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["error"] is None
        assert (r["steps"], r["warmup_steps"], len(r["losses"])) == (2, 1, 3)
        assert r["first_loss"] == r["losses"][0]
        assert r["time_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["real_tokens"] / r["time_s"])
        assert r["peak_mem_mb"] > 0 and r["held_mem_mb"] > 0
        assert r["activation_mem_mb"] == pytest.approx(r["peak_mem_mb"] - r["held_mem_mb"])
    # Same batches for every mode, and they hold padding.
    assert len({(r["real_tokens"], r["padded_tokens"]) for r in records}) == 1
    assert records[0]["real_tokens"] < records[0]["padded_tokens"]
    assert records[0]["speedup"] == 1.0
    for r in records:
        assert (r["world_size"], r["shard"], r["token_budget"], r["rank_busy_s"]) == (1, "", None, [])
        assert r["tokens_per_s_per_process"] == r["tokens_per_s"]
        assert r["token_imbalance_max"] == r["busy_imbalance_max"] == 1.0
        assert [sum(step) for step in r["rank_real_tokens"]] and sum(map(sum, r["rank_real_tokens"])) == (
            r["real_tokens"]
        )


def test_every_mode_starts_from_the_same_loss(tiny_run):
    _, _, _, records = tiny_run
    first = [r["first_loss"] for r in records]
    assert math.log(32000) * 0.9 < first[0] < math.log(32000) * 1.1  # random init: about ln(vocab)
    for r in records:
        assert r["loss_rel_diff"] <= 1e-4 and not r["loss_mismatch"]
        torch.testing.assert_close(r["first_loss"], first[0], rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- the loss check


def _skew(model, options):
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # a "speed-up" that changes the function
    return model


def _broken(model, options):
    raise RuntimeError("this mode cannot run")


@pytest.fixture
def extra_modes(monkeypatch):
    padding = modes.MODES["padding"]
    for name, prepare in [("skewed", _skew), ("broken", _broken)]:
        monkeypatch.setitem(
            modes.MODES,
            name,
            modes.Mode(name, "test", padding.attn_implementation, padding.collate, prepare=prepare),
        )


CHEAP = ["--batch-size", "2", "--max-length", "16", "--steps", "1", "--warmup", "0"]


def test_a_mode_that_changes_the_loss_is_flagged(extra_modes, tmp_path):
    path = tmp_path / "out.json"
    code, out, err = _main([*CHEAP, "--modes", "padding,skewed", "--json", str(path)])
    assert code == 0
    assert "WARNING: first-step losses disagree across modes: tiny/skewed" in err
    assert ": MISMATCH" in out
    by_mode = {r["mode"]: r for r in json.loads(path.read_text())}
    assert by_mode["skewed"]["loss_mismatch"] and not by_mode["padding"]["loss_mismatch"]
    assert by_mode["skewed"]["loss_rel_diff"] > 1e-2

    code, _, _ = _main([*CHEAP, "--modes", "padding,skewed", "--strict-loss"])
    assert code == cli.EXIT_LOSS_MISMATCH


def test_a_failing_mode_is_reported_and_the_others_run(extra_modes, tmp_path):
    path = tmp_path / "out.json"
    code, out, err = _main([*CHEAP, "--modes", "broken,padding", "--json", str(path)])
    assert code == cli.EXIT_MODE_FAILED
    assert "RuntimeError: this mode cannot run" in out and "RuntimeError: this mode cannot run" in err
    broken, padding = json.loads(path.read_text())
    assert broken["error"] == "RuntimeError: this mode cannot run" and broken["first_loss"] is None
    assert padding["error"] is None and padding["tokens_per_s"] > 0


def test_loss_check_tolerance_and_non_finite():
    def result(mode, loss):
        return run.Result("m", mode, first_loss=loss)

    check = run.check_first_losses(
        [result("padding", 2.0), result("a", 2.0001), result("b", 2.1)], tolerance=1e-3
    )
    assert check.mismatched == [("m", "b")]
    assert check.max_rel_diff == pytest.approx(0.05)
    check = run.check_first_losses([result("padding", 2.0), result("a", math.nan)], tolerance=1e-3)
    assert check.mismatched == [("m", "a")] and not check.ok
    # The reference is 'padding' wherever it sits in the list.
    check = run.check_first_losses([result("a", 2.2), result("padding", 2.0)], tolerance=1e-3)
    assert check.mismatched == [("m", "a")]


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    env = report.environment(torch.device("cpu"))
    with pytest.raises(SystemExit, match="pip install"):
        report.write_plot("x.png", [], env)


def test_memory_budget_reaches_patch_and_explain_counts_graphs(monkeypatch):
    seen = {}
    import seqpack

    real_patch = seqpack.patch

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real_patch(model, **{**kwargs, "compile": False, "memory_budget": None})

    monkeypatch.setattr(seqpack, "patch", spy)
    code, out, _ = _main([*TINY_RUN, "--modes", "seqpack", "--memory-budget", "0.5", "--explain"])
    assert code == 0
    assert seen["memory_budget"] == 0.5
    assert "torch.compile per mode" in out and "tiny / seqpack:" in out and "graph breaks" in out
    assert "(0 in the timed steps)" in out  # compile is off here: nothing compiles at all


def test_padding_without_cudnn_runs_every_step_with_cudnn_attention_off(monkeypatch, tmp_path):
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    path = tmp_path / "out.json"
    code, out, _ = _main([*CHEAP, "--modes", "padding-no-cudnn,padding", "--json", str(path)])
    assert code == 0
    assert "padding-no-cudnn (sdpa, no cuDNN)" in out
    tuned, default = json.loads(path.read_text())
    assert tuned["first_loss"] == pytest.approx(default["first_loss"], rel=1e-5)
    half = len(seen) // 2  # the tuned mode ran first: its sdpa calls had cuDNN attention off
    assert half > 0 and not any(seen[:half]) and all(seen[half:])
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and the setting did not leak


def test_timed_steps_free_the_gradients_as_trainer_does():
    model = torch.nn.Linear(4, 2)

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def forward(input_ids, use_cache):
        return Out(model(input_ids).sum())

    wrapper = torch.nn.Module()
    wrapper.forward = forward
    wrapper.zero_grad = model.zero_grad
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    run._train_step(wrapper, optimizer, {"input_ids": torch.ones(3, 4)}, torch.device("cpu"))
    assert not torch.equal(model.weight, before)  # the optimizer stepped
    assert all(p.grad is None for p in model.parameters())


def test_a_memory_step_out_of_memory_keeps_the_timings(monkeypatch, tmp_path):
    def out_of_memory(self, run_step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(run._RssMemory, "activation", out_of_memory)
    path = tmp_path / "out.json"
    code, out, err = _main([*CHEAP, "--modes", "padding", "--json", str(path)])
    assert code == 0
    assert "memory step out of memory" in err
    assert "n/a" in out  # the table says there is no memory figure
    (record,) = json.loads(path.read_text())
    assert record["error"] is None and record["tokens_per_s"] > 0
    assert record["peak_mem_mb"] is None and record["activation_mem_mb"] is None  # NaN, written as null


# --------------------------------------------------------------------------- long sequences


def test_long_data_follows_its_documented_length_distribution():
    d = synthetic.load_long(seed=0)
    lengths = [len(e) for e in d.examples]
    assert len(lengths) > 800 and d.vocab_size == 32000
    assert "synthetic" in d.name and "median 1.2k, max 8192" in d.name
    assert statistics.median(lengths) == pytest.approx(1200, rel=0.1)
    assert 2 <= min(lengths) and max(lengths) <= 8192
    assert sum(n == 8192 for n in lengths) >= 1  # the cap is reached, and holds
    # log-normal with sigma 0.8: the log lengths' spread (the cap trims a little of the top)
    assert statistics.stdev(math.log(n) for n in lengths) == pytest.approx(0.8, abs=0.08)
    # Consecutive cuts of the GSM8K stream, in file order: real text, BOS/EOS inside the documents.
    stream = [t for e in data.load_default().examples for t in e]
    assert [t for e in d.examples for t in e] == stream[: sum(lengths)]
    assert sum(lengths) > 0.99 * len(stream)
    # --max-length still cuts them.
    batches = data.make_batches(d, batch_size=8, num_batches=4, seed=0, max_length=256)
    assert all(len(e) <= 256 for b in batches for e in b) and max(len(e) for b in batches for e in b) == 256


@pytest.mark.parametrize("load", [synthetic.load_long, synthetic.load_rl], ids=["long", "rl"])
def test_synthetic_lengths_are_seeded(load):
    a, b, other = load(seed=1), load(seed=1), load(seed=2)
    assert a == b
    assert [len(e) for e in a.examples] != [len(e) for e in other.examples]


def _rl_batch(max_length: int | None = None) -> list[list[int]]:
    """Four RL examples, the first two cut by max_length when given."""
    examples = synthetic.load_rl(seed=0).examples[:4]
    if max_length:
        examples = [data.with_ids(e, e[:max_length]) for e in examples[:2]] + examples[2:]
    return examples


def test_rl_data_is_question_prompts_and_long_completions():
    d = synthetic.load_rl(seed=0)
    gsm8k = data.load_default().examples
    assert len(d.examples) > 300 and "synthetic" in d.name and "loss on completions only" in d.name
    prompts = [e.prompt_length for e in d.examples]
    completions = [len(e) - e.prompt_length for e in d.examples]
    for e, question in zip(d.examples, gsm8k, strict=False):
        assert isinstance(e, data.Prompted)
        assert list(e[: e.prompt_length]) == question[: e.prompt_length]  # BOS "Question: ...\nAnswer:"
        assert tuple(e[e.prompt_length - 4 : e.prompt_length]) == synthetic._ANSWER_IDS
    assert 50 < statistics.median(prompts) < 100 and max(prompts) < 256
    assert statistics.median(completions) == pytest.approx(2000, rel=0.15)
    assert max(completions) <= 8192 and min(completions) >= 2


def test_rl_labels_are_ignored_on_prompts_and_padding_only():
    examples = _rl_batch(max_length=300)
    assert len(examples[0]) == 300 and examples[0].prompt_length < 300
    padded = modes.pad_batch(examples, 0)
    for row, e in enumerate(examples):
        positions = torch.arange(padded["labels"].shape[1])
        ignored = (positions < e.prompt_length) | (positions >= len(e))
        assert torch.equal(padded["labels"][row] == modes.IGNORE_INDEX, ignored)
        real = ~ignored
        assert torch.equal(padded["labels"][row][real], padded["input_ids"][row][real])
    flat = modes.flatten_batch(examples, 0)
    assert flat["input_ids"][0].tolist() == [t for e in examples for t in e]
    expected = []
    for e in examples:
        expected += [modes.IGNORE_INDEX] * e.prompt_length + list(e[e.prompt_length :])
    assert flat["labels"][0].tolist() == expected
    # Both collates leave the same targets: the same loss.
    assert int((padded["labels"] != modes.IGNORE_INDEX).sum()) == int(
        (flat["labels"] != modes.IGNORE_INDEX).sum()
    )


def test_plain_examples_collate_as_before():
    from transformers import DataCollatorWithFlattening

    examples = data.load_default().examples[:3]
    padded = modes.pad_batch(examples, 0)
    assert torch.equal(
        padded["labels"], padded["input_ids"].masked_fill(padded["attention_mask"] == 0, modes.IGNORE_INDEX)
    )
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=modes.IGNORE_INDEX)
    before = collator([{"input_ids": e} for e in examples], return_tensors="pt")
    after = modes.flatten_batch(examples, 0)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key])), key


def test_a_prompt_survives_cuts_folds_and_pickling():
    e = data.Prompted([1, 5, 6, 7, 8], prompt_length=3)
    assert data.with_ids(e, e[:4]).prompt_length == 3 and data.with_ids(e, e[:2]).prompt_length == 2
    assert data.with_ids([1, 2, 3], [1, 2]) == [1, 2] and data.prompt_length([1, 2]) == 0
    (((folded,),),) = data.fold_vocab([[[e]]], 6)
    assert folded == [1, 5, 0, 1, 2] and folded.prompt_length == 3
    copy = pickle.loads(pickle.dumps(e))  # how --nproc hands the plan to its processes
    assert copy == e and copy.prompt_length == 3
    # A cut that leaves no completion token leaves no target: the example is dropped.
    d = data.TokenData("x", [e, data.Prompted([1, 5, 6, 7], prompt_length=2)], 10)
    assert data._pool(d, max_length=3) == [[1, 5, 6]]
    pool = data._pool(synthetic.load_rl(seed=0), max_length=64)
    assert pool and all(len(e) <= 64 and e.prompt_length < len(e) for e in pool)


def test_stalls_count_steps_over_one_and_a_half_medians():
    times = [0.10] * 7 + [0.15, 0.16, 0.40]  # 0.15 is exactly 1.5x: not a stall
    result = run.Result(
        "tiny", "padding", steps=10, step_times_s=times, step_time_median_s=statistics.median(times)
    )
    assert run.count_stalls(result) == 2
    assert run.count_stalls(run.Result("tiny", "padding")) == 0  # no timed steps
    # Per real token: the 0.40 s step carried 4x the tokens, so it is no stall; the 0.16 s one is.
    tokens = [[1000]] * 9 + [[4000]]
    by_token = run.Result("tiny", "padding", step_times_s=times, rank_real_tokens=tokens)
    assert run.count_stalls(by_token) == 1
    # A fixed cost per step (the optimizer's): the smallest batch is slow per token, and no stall.
    # mistral-7b on long data (H200, benchmarks/h200_2026-12-01/mistral-7b_long_b2.json).
    tokens = [2186, 5554, 1510, 1561, 3345, 2407, 3536, 1621, 7430, 2027, 5126, 7242, 3358, 2694, 2426, 866]
    times = [0.203, 0.473, 0.16, 0.154, 0.287, 0.22, 0.324, 0.163, 0.65, 0.189, 0.438, 0.651, 0.291, 0.24]
    times += [0.219, 0.138]
    line = run.Result("m", "seqpack", step_times_s=times, rank_real_tokens=[[n] for n in tokens])
    assert run.count_stalls(line) == 0
    line.step_times_s = [*times[:-1], 6.5]  # that step before the fix: every layer recompiled
    assert run.count_stalls(line) == 1
    result.stalled_steps = run.count_stalls(result)
    env = report.environment(torch.device("cpu"))
    run_info = {"data": "d", "batch_size": 2, "steps": 10, "warmup": 0, "dtype": "fp32"}
    run_info |= {"optimizer": "adamw", "seed": 0, "command": "seqpack-bench"}
    out = report.format_report([result], run.LossCheck(0.0, 1e-4, []), env, run_info)
    lines = out.splitlines()
    at = next(
        i for i, line in enumerate(lines) if "Stalls (>1.5x time for its tokens)" in line
    )  # the details table

    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]

    assert cells(lines[at + 2])[cells(lines[at]).index("Stalls (>1.5x time for its tokens)")] == "2"
    (record,) = report.records([result], env, run_info)
    assert record["stalled_steps"] == 2


def test_the_real_run_records_its_stalls(tiny_run):
    _, out, _, records = tiny_run
    assert "| Stalls (>1.5x time for its tokens) |" in out
    for r in records:
        assert isinstance(r["stalled_steps"], int)
        again = run.Result(
            "m", r["mode"], step_times_s=r["step_times_s"], rank_real_tokens=r["rank_real_tokens"]
        )
        assert r["stalled_steps"] == run.count_stalls(again)
        assert r["graphs_in_timed_steps"] == 0, r["mode"]  # seqpack's layers: one graph, from warm-up


def test_long_and_rl_data_default_to_more_steps_on_gpu(monkeypatch):
    assert cli.parse_args(["--device", "cpu", "--data", "rl"]).steps == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ["long", "rl"]:
        args = cli.parse_args(["--data", name])  # embedded ids: no --tokenizer needed
        assert (args.steps, args.warmup, args.tokenizer) == (20, 3, None)
        assert cli.parse_args(["--data", name, "--steps", "5"]).steps == 5
    assert cli.parse_args([]).steps == 10


def test_long_data_runs_end_to_end():
    argv = ["--data", "long", "--modes", "padding,hf-packing", "--max-length", "256"]
    code, out, err = _main([*argv, "--steps", "1", "--warmup", "0", "--batch-size", "2"])
    assert code == 0, err
    assert "data: gsm8k-long (synthetic: log-normal lengths, median 1.2k, max 8192, over GSM8K text)" in out
    assert "First-step loss agreement" in out and ": OK" in out


def test_rl_data_runs_end_to_end_with_the_loss_on_completions(tmp_path):
    path = tmp_path / "out.json"
    argv = ["--data", "rl", "--max-length", "256", "--steps", "1", "--warmup", "0", "--batch-size", "2"]
    code, out, err = _main([*argv, "--json", str(path)])
    assert code == 0, err
    assert "data: gsm8k-rl (synthetic: GSM8K question prompts" in out
    assert "First-step loss agreement" in out and ": OK" in out
    records = json.loads(path.read_text())
    assert [r["mode"] for r in records] == list(modes.DEFAULT_MODES)
    (batch,) = data.make_plan(synthetic.load_rl(seed=0), num_steps=1, seed=0, batch_size=2, max_length=256)[0]
    for r in records:
        assert r["real_tokens"] == sum(map(len, batch))  # every input token counts, prompts included
        assert r["stalled_steps"] == 0  # one timed step is its own median
    # The unpatched model's mean cross-entropy over the completions' targets only, by hand.
    model = _tiny_model()
    inputs = modes.pad_batch(batch, 0)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    losses = []
    for row, e in enumerate(batch):
        targets = torch.tensor(e[e.prompt_length :])  # (C,): each predicted from the token before
        losses.append(
            torch.nn.functional.cross_entropy(
                logits[row, e.prompt_length - 1 : len(e) - 1], targets, reduction="sum"
            )
        )
    by_hand = float(sum(losses)) / sum(len(e) - e.prompt_length for e in batch)
    assert records[0]["first_loss"] == pytest.approx(by_hand, rel=1e-5)


# --------------------------------------------------------------------------- several processes

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def test_a_token_budget_on_one_process_keeps_the_table():
    path_args = ["--token-budget", "600", "--modes", "padding", "--steps", "2", "--warmup", "0"]
    code, out, err = _main(path_args)
    assert code == 0, err
    assert "token budget 600 a batch (TokenBudgetBatchSampler)" in out
    assert "| Time (s) | Throughput (token/s) | Memory (MB) | Speed-up |" in out and "imbalance" not in out
    plan = data.make_plan(data.load_default(), num_steps=2, seed=0, token_budget=600)
    assert all(len(step) == 1 and 0 < sum(map(len, step[0])) <= 600 for step in plan)


def _global_first_loss(plan: list) -> float:
    """The unpatched model's loss on the first step's batches of every rank, as one padded batch."""
    model = _tiny_model()
    with torch.no_grad():
        return float(model(**modes.pad_batch([e for batch in plan[0] for e in batch], 0)).loss)


@needs_gloo
def test_two_processes_train_each_mode_with_ddp(tmp_path):
    """padding and (compiled) seqpack under DDP on two processes: each rank its rank-strided batches,
    the loss that of the global batch, the new columns printed and recorded."""
    path = tmp_path / "out.json"
    argv = [
        "--nproc",
        "2",
        "--modes",
        "padding,seqpack",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    code, out, err = _main([*argv, "--json", str(path)])
    assert code == 0, err
    assert "(2 processes x 1 thread)" in out  # the CPU, split between the processes
    assert "batch 2 per process" in out and "processes: 2 (gloo) · DDP" in out
    assert (
        "| Throughput (token/s) | Per process (token/s) | Memory (MB) | Speed-up | Token imbalance |" in out
    )
    assert "Busy imbalance |" in out and "Token imbalance: per step, the largest rank's real tokens" in out
    assert "First-step loss agreement" in out and ": OK" in out

    plan = data.make_plan(data.load_default(), num_steps=3, seed=0, world_size=2, batch_size=2)
    tokens = [[sum(map(len, batch)) for batch in step] for step in plan[1:]]  # the timed steps
    ratios = [max(step) / (sum(step) / 2) for step in tokens]
    records = json.loads(path.read_text())
    assert [r["mode"] for r in records] == ["padding", "seqpack"]
    first = _global_first_loss(plan)
    for r in records:
        assert r["error"] is None
        assert (r["world_size"], r["shard"], r["backend"], r["batch_size"]) == (2, "ddp", "gloo", 2)
        assert r["rank_real_tokens"] == tokens and r["real_tokens"] == sum(map(sum, tokens))
        assert r["token_imbalance_max"] == pytest.approx(max(ratios))
        assert r["token_imbalance_mean"] == pytest.approx(sum(ratios) / len(ratios))
        assert r["tokens_per_s"] == pytest.approx(r["real_tokens"] / r["time_s"])
        assert r["tokens_per_s_per_process"] == pytest.approx(r["tokens_per_s"] / 2)
        assert [len(step) for step in r["rank_busy_s"]] == [2, 2] and [
            len(s) for s in r["rank_step_times_s"]
        ] == [2, 2]
        busy = [t for step in r["rank_busy_s"] for t in step]
        assert all(0 < t for t in busy) and 1.0 <= r["busy_imbalance_mean"] <= r["busy_imbalance_max"] < 3
        assert r["step_times_s"] == [max(step) for step in r["rank_step_times_s"]]
        assert len(r["losses"]) == 3 and r["peak_mem_mb"] > r["held_mem_mb"] > 0
        # num_items_in_batch counted every rank's targets: the loss of the global batch
        assert r["first_loss"] == pytest.approx(first, rel=1e-5)
    assert records[0]["token_imbalance_max"] > 1.01  # two examples a rank: the ranks differ


@needs_gloo
def test_a_token_budget_balances_the_ranks_under_fsdp2(tmp_path):
    path = tmp_path / "out.json"
    argv = ["--nproc", "2", "--shard", "fsdp2", "--token-budget", "600", "--modes", "padding,seqpack-eager"]
    code, out, err = _main([*argv, "--steps", "3", "--warmup", "1", "--json", str(path)])
    assert code == 0, err
    assert "token budget 600 per process and step" in out and "FSDP2 (fully_shard per decoder layer" in out
    assert "First-step loss agreement" in out and ": OK" in out
    plan = data.make_plan(data.load_default(), num_steps=4, seed=0, world_size=2, token_budget=600)
    records = json.loads(path.read_text())
    for r in records:
        assert (r["error"], r["shard"], r["token_budget"]) == (None, "fsdp2", 600)
        assert r["rank_real_tokens"] == [[sum(map(len, batch)) for batch in step] for step in plan[1:]]
        assert all(n <= 600 for step in r["rank_real_tokens"] for n in step)
        assert 1.0 <= r["token_imbalance_mean"] <= r["token_imbalance_max"] <= 1.02  # GSM8K lengths
        assert r["first_loss"] == pytest.approx(_global_first_loss(plan), rel=1e-5)
    # A fixed count instead, three examples a rank (about as many tokens): far more uneven.
    fixed = data.make_plan(data.load_default(), num_steps=50, seed=0, world_size=2, batch_size=3)
    tokens = [[sum(map(len, batch)) for batch in step] for step in fixed]
    assert max(max(step) / (sum(step) / 2) for step in tokens) > 1.2


@needs_gloo
def test_a_mode_failing_in_its_setup_is_a_row_and_the_others_run(tmp_path, capfd):
    path = tmp_path / "out.json"
    argv = ["--nproc", "2", "--modes", "hf-packing,padding", "--hf-attn", "no-such-attention"]
    argv += ["--batch-size", "2", "--max-length", "32", "--steps", "1", "--warmup", "0", "--json", str(path)]
    code, out, _ = _main(argv)
    assert code == cli.EXIT_MODE_FAILED
    assert "no-such-attention" in out and "| tiny  | padding (sdpa) |" in out
    failed, ran = json.loads(path.read_text())
    assert "no-such-attention" in failed["error"] and ran["error"] is None and ran["tokens_per_s"] > 0
    # Both ranks failed the same way: the first failing one (rank 0) prints the traceback, once.
    assert capfd.readouterr().err.count("Traceback (most recent call last)") == 1


def _fail_on_rank_1(local_rank: int, init_method: str, result_path: str) -> None:
    if local_rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    time.sleep(600)  # rank 0 as it would wait in a collective for rank 1


@needs_gloo
def test_a_failing_process_stops_the_others():
    start = time.monotonic()
    with pytest.raises(parallel.LaunchFailed, match="rank 1 failed on purpose"):
        parallel.launch(_fail_on_rank_1, 2, ())
    assert time.monotonic() - start < 60  # rank 0 was stopped, not waited for


# --------------------------------------------------------------------------- vision-language models


def test_images_attach_to_the_placeholder_runs():
    from seqpack.bench import media

    spec = media.ImageSpec(image_token=250, start_token=251, end_token=252, merge=2, patch_features=12)
    plan = media.with_images([[[[5, 250, 6], [7, 8]]]], spec, seed=0)  # a text 250 would read as an image
    (batch,) = plan[0]
    assert all(e[0] == 251 and 252 in e for e in batch) and batch[0][-3:] == [5, 0, 6]
    inputs = media.attach(modes.pad_batch(batch, pad_id=0), spec, seed=0)
    runs = [(e.index(252) - 1) for e in batch]  # image tokens of each example
    grids = [next(g for g in media.GRIDS if g[0] * g[1] == n) for n in runs]
    assert inputs["image_grid_thw"].tolist() == [[1, 2 * h, 2 * w] for h, w in grids]
    assert inputs["pixel_values"].shape == (sum(4 * h * w for h, w in grids), 12)
    is_image = inputs["input_ids"] == 250
    assert (inputs["labels"][is_image] == -100).all() and (
        inputs["labels"][~is_image & (inputs["attention_mask"] == 1)] != -100
    ).all()
    again = media.attach(modes.pad_batch(batch, pad_id=0), spec, seed=0)
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])  # every mode sees the same pixels
    assert presets.model_config("qwen2.5-vl-7b") and media.image_spec(presets.model_config("qwen2.5-vl-7b"))
    assert media.image_spec(presets.model_config("tiny")) is None


def test_a_vision_language_model_trains_with_images(tmp_path):
    """A tiny Qwen2.5-VL: padded and seqpack modes on the same image batches, first losses equal;
    transformers' packing is refused with the reason, not run wrong."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_vlms import vlm_case

    vlm_case("qwen2_5_vl").model.config.save_pretrained(tmp_path / "vl")
    argv = ["--model", str(tmp_path / "vl"), "--random-init", "--modes", "padding,hf-packing,seqpack-eager"]
    code, out, err = _main(
        [*argv, "--steps", "1", "--warmup", "0", "--batch-size", "3", "--json", str(tmp_path / "r.json")]
    )
    assert "one synthetic image per example" in err
    assert "mode 'hf-packing' collates no images" in out
    records = {r["mode"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert records["padding"]["model"].endswith(" + images") and records["seqpack-eager"]["error"] is None
    assert (
        abs(records["seqpack-eager"]["first_loss"] - records["padding"]["first_loss"])
        <= 1e-4 * records["padding"]["first_loss"]
    )
    assert code == cli.EXIT_MODE_FAILED  # the refused mode is a failed row


@pytest.mark.parametrize(
    "installed, exact",
    [((), False), (("fla",), False), (("causal_conv1d",), False), (("fla", "causal_conv1d"), True)],
)
def test_hf_packing_of_a_hybrid_is_marked_not_exact_without_its_kernels(monkeypatch, installed, exact):
    """transformers' packing leaks across sequences through any mixer fallback left (#46093)."""
    import importlib.util

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_models import build_tiny_model

    model = build_tiny_model("qwen3_5_text")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            object()
            if name in installed
            else None
            if name in ("fla", "causal_conv1d", "mamba_ssm")
            else real(name, *a)
        ),
    )
    label = modes._describe_hf_packing(model, modes.ModeOptions(device=torch.device("cpu")))
    assert ("NOT EXACT" not in label) == exact, label
    if not exact:
        assert "GatedDeltaNet leaks across sequences" in label
        assert ("causal-conv1d" in label) == ("causal_conv1d" not in installed), label
    assert "NOT EXACT" not in modes._describe_hf_packing(
        _tiny_model(), modes.ModeOptions(device=torch.device("cpu"))
    )


def test_explain_names_compile_time_per_mode():
    """--explain's compile time is each mode's own: dynamo's timers add up over the process."""
    from seqpack.bench import cli

    cli._compile_phases()  # what earlier tests compiled
    torch.compile(lambda x: x.sin() + 1, backend="aot_eager")(torch.randn(3))
    first = cli._compile_phases()
    assert first["all"] > 0 and "tracing" in first
    assert cli._compile_phases()["all"] == 0  # nothing compiled since
