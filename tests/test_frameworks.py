"""seqpack inside the frameworks people train with: the same run patched and unpatched.

Each test trains a tiny random llama (fp32, CPU, dropout 0, seeded) twice, through the framework's
own data collator and loop, once as is and once patched, and compares the per-step losses
(relative 1e-4), the framework's logged metrics and the final parameters. Plain SGD keeps the
parameter comparison tight (Adam divides by the gradient's own scale and amplifies noise on
near-zero gradients). Every patched run also asserts that the batches really reached the model
packed: a patch that a framework silently bypasses is correct and useless, and must fail here.

Collators pad on the right, as they do by default; with left padding the unpatched loss counts one
extra prediction per row (the last pad position predicting the first real token) that seqpack
leaves out, so the two are not comparable term for term (test_core.py covers left padding).

``PATCH_KW`` are the options every patch() call here gets.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import padded_batch, tiny_llama
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from seqpack import is_patched, patch, unpatch

PATCH_KW: dict = {"compile": False}  # CPU tests: eager layers (test_compile.py covers compile)
VOCAB = 128  # tiny_llama's vocab; id 0 is padding
STEPS = 3
LR = 0.5
ROOT = Path(__file__).resolve().parents[1]


def _patch(model):
    return patch(model, **PATCH_KW)


# --------------------------------------------------------------------------- shared builders


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over tiny_llama's vocab: "w5 w17" -> [5, 17]; pad 0, bos 1, eos 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def _sequences(n: int, seed: int, lengths=(1, 24)) -> list[list[int]]:
    """n random token lists of random lengths in [lengths[0], lengths[1]] (ids 3..127, never padding)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (size,), generator=g).tolist() for size in sizes]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _lm_dataset(n=24, seed=0):
    return _ListDataset([{"input_ids": ids} for ids in _sequences(n, seed, lengths=(2, 24))])


def _args(cls=TrainingArguments, tmp_path=None, **overrides):
    """Arguments shared by every trainer here: CPU fp32, SGD at a constant rate, a log every step."""
    values = dict(
        output_dir=str(tmp_path or "unused"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return cls(**values)


class _Probe:
    """Records the (B, L) of every batch that reaches the input embeddings.

    The embedding runs outside any compiled layer, and it is where packing shows: a packed batch
    is (1, T), a padded one (B, L).
    """

    def __init__(self, model):
        self.shapes = []
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.get_input_embeddings().register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.shapes.append(tuple(args[0].shape[:2]))

    def assert_packed(self, ignore_generation=False):
        """Every batch was packed; ``ignore_generation``: calls with a KV cache (generate) may not be."""
        assert self.shapes, "the model never ran"
        if ignore_generation:
            assert any(s[0] == 1 and s[1] > 1 for s in self.shapes), "no batch reached the model packed"
            return
        unpacked = [s for s in self.shapes if s[0] != 1]
        assert not unpacked, f"batches reached the model unpacked: {unpacked[:3]} (seqpack was bypassed)"


def _logged(trainer, *keys):
    """Per-step values of the given logged metrics, from the trainer's log history."""
    rows = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(rows) == STEPS, trainer.state.log_history
    return {key: [row[key] for row in rows] for key in keys}


def _assert_same_run(ref_logs, new_logs, ref_model, new_model, *, exact_keys=()):
    """Equal per-step metrics (relative 1e-4; `exact_keys` bit for bit) and final parameters."""
    assert ref_logs.keys() == new_logs.keys()
    losses = ref_logs["loss"]
    assert len(set(losses)) == len(losses), f"training did not move the loss: {losses}"
    for key in ref_logs:
        if key in exact_keys:
            assert new_logs[key] == ref_logs[key], key
        else:
            assert_close(new_logs[key], ref_logs[key], rtol=1e-4, atol=1e-6, msg=key)
    _assert_same_params(ref_model, new_model)


def _assert_same_params(ref_model, new_model):
    ref = dict(ref_model.named_parameters())
    new = dict(new_model.named_parameters())
    assert ref.keys() == new.keys()
    moved = 0
    for name, p in ref.items():
        assert_close(new[name], p, rtol=1e-4, atol=1e-6, msg=name)
        moved += p.requires_grad
    assert moved, "no trainable parameter"


# --------------------------------------------------------------------------- a plain loop


def test_plain_loop_with_grad_accumulation_and_num_items_in_batch():
    """Two micro-batches per step, the loss summed over tokens and divided by the step's count."""
    micro_batches = [
        padded_batch(lengths, 17, seed=s) for s, lengths in enumerate([[7, 1, 17, 10], [3, 12, 5]])
    ]
    n_items = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in micro_batches)

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        for _ in range(STEPS):
            total = 0.0
            for ids, mask, labels in micro_batches:
                loss = model(
                    input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items
                ).loss
                loss.backward()
                total += loss.item()
            opt.step()
            opt.zero_grad()
            losses.append(total)
        return {"loss": losses}

    reference, patched = tiny_llama(), tiny_llama()
    _patch(patched)
    probe = _Probe(patched)
    _assert_same_run(train(reference), train(patched), reference, patched)
    probe.assert_packed()


def test_logits_read_in_training_with_labels():
    """Code that reads logits in a training step with labels (token accuracy, as TRL < 1.0 did) says
    so with one word, keep_logits=True; by default the fused loss skips them (logits=None)."""
    reference, patched = tiny_llama(), tiny_llama()
    ids, mask, labels = padded_batch([7, 1, 13, 10], 13)
    assert _patch(tiny_llama())(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    patch(patched, **PATCH_KW, keep_logits=True)
    ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None, "logits went missing in training with labels: patch(..., keep_logits=True)"
    real = mask.bool()
    assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    targets = labels[:, 1:] != -100
    accuracy = [(o.logits[:, :-1].argmax(-1) == labels[:, 1:])[targets].float().mean() for o in (ref, out)]
    assert_close(accuracy[1], accuracy[0])


# --------------------------------------------------------------------------- Hugging Face Trainer


def _hf_trainer_run(model, tmp_path, *, patch_it, **overrides):
    if patch_it:
        _patch(model)
    probe = _Probe(model)
    collator = DataCollatorForLanguageModeling(_tokenizer(), mlm=False)  # right padding, -100 at pads
    trainer = Trainer(
        model=model,
        args=_args(tmp_path=tmp_path, **overrides),
        train_dataset=_lm_dataset(),
        data_collator=collator,
    )
    trainer.train()
    if patch_it:
        probe.assert_packed()
    return _logged(trainer, "loss", "grad_norm"), trainer


# The Trainer's checkpointing switch by the name this transformers has (5.24 renamed it).
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)


@pytest.mark.parametrize(
    "overrides",
    [dict(gradient_accumulation_steps=2), {_CHECKPOINTING: True}],
    ids=["grad_accumulation", "grad_checkpointing"],
)
def test_hf_trainer(tmp_path, overrides):
    """Trainer passes num_items_in_batch (the forward takes **kwargs) and sums micro-batch losses."""
    reference, patched = tiny_llama(), tiny_llama()
    ref_logs, _ = _hf_trainer_run(reference, tmp_path, patch_it=False, **overrides)
    new_logs, _ = _hf_trainer_run(patched, tmp_path, patch_it=True, **overrides)
    _assert_same_run(ref_logs, new_logs, reference, patched)


def test_hf_trainer_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")

    def lora_model():
        config = peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_llama(), config)

    reference, patched = lora_model(), lora_model()
    ref_logs, _ = _hf_trainer_run(reference, tmp_path, patch_it=False, gradient_accumulation_steps=2)
    new_logs, _ = _hf_trainer_run(patched, tmp_path, patch_it=True, gradient_accumulation_steps=2)
    assert is_patched(patched)
    _assert_same_run(ref_logs, new_logs, reference, patched)


def test_generate_unchanged_and_save_round_trip(tmp_path):
    """After training patched: generate() is the unpatched one, and save/load gives a plain model."""
    model = tiny_llama()
    _hf_trainer_run(model, tmp_path, patch_it=True)
    model.eval()
    ids, mask, _ = padded_batch([5, 7], 7, left=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    patched_tokens = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        patched_logits = model(input_ids=ids, attention_mask=mask).logits

    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert not is_patched(loaded) and loaded.config._attn_implementation != "seqpack"
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "seqpack" not in json.dumps(saved_config)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, **kwargs), patched_tokens)
    unpatch(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), patched_tokens)
    with torch.no_grad():
        real = mask.bool()
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits[real], patched_logits[real])


def test_deepcopy_of_patched_model_uses_its_own_weights():
    """A copy (a reference model, an EMA) must compute with the copy's weights, not the original's."""
    model = _patch(tiny_llama())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids, mask, _ = padded_batch([5, 3], 6)
    with torch.no_grad():
        expected = unpatch(copy.deepcopy(twin))(input_ids=ids, attention_mask=mask).logits
        got = twin(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- Accelerate


def test_accelerate_loop():
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    def train(model, patch_it):
        set_seed(0)
        if patch_it:
            _patch(model)
        probe = _Probe(model)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        collator = DataCollatorForLanguageModeling(_tokenizer(), mlm=False)
        loader = torch.utils.data.DataLoader(_lm_dataset(), batch_size=4, collate_fn=collator)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        losses, step_loss = [], 0.0
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                step_loss += loss.item() / 2
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                losses.append(step_loss)
                step_loss = 0.0
            if len(losses) == STEPS:
                break
        if patch_it:
            probe.assert_packed()
        return {"loss": losses}

    reference, patched = tiny_llama(), tiny_llama()
    _assert_same_run(train(reference, False), train(patched, True), reference, patched)


# --------------------------------------------------------------------------- TRL

try:
    import trl
except ImportError:  # a test extra; without it only the TRL tests skip
    trl = None
needs_trl = pytest.mark.skipif(trl is None, reason="needs trl (pip install seqpack[test])")

# TRL >= 1.0's trainers replace model.forward at construction with a fused LM head that calls the
# backbone (model.model) directly for the training loss. seqpack wraps the backbone too, so the
# padded batch is packed there whichever of patch() and the trainer comes first.


def _sft_run(tmp_path, *, order, padding_free=False, peft_config=None):
    """order: "unpatched", "patch_first" (patch, then build the trainer) or "trainer_first"."""
    from datasets import Dataset

    model = tiny_llama()
    if order == "patch_first":
        _patch(model)
    args = _args(
        trl.SFTConfig, tmp_path, padding_free=padding_free, max_length=None if padding_free else 64
    )  # TRL's own default gradient_checkpointing=True stays on
    dataset = Dataset.from_list([{"input_ids": ids} for ids in _sequences(24, seed=0, lengths=(2, 24))])
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(), peft_config=peft_config
    )
    if order == "trainer_first":
        _patch(trainer.model)
    probe = _Probe(trainer.model)
    trainer.train()
    if order != "unpatched":
        assert is_patched(trainer.model)
        probe.assert_packed()
    return _logged(trainer, "loss", "mean_token_accuracy", "entropy", "num_tokens"), trainer.model


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    """The unpatched model with TRL's default (right-)padded collator: the truth for every SFT run."""
    return _sft_run(tmp_path_factory.mktemp("sft"), order="unpatched")


@needs_trl
@pytest.mark.parametrize(
    "order, padding_free",
    [
        ("trainer_first", False),
        ("trainer_first", True),
        ("patch_first", False),
        ("patch_first", True),
    ],
    ids=[
        "trainer_first-padded",
        "trainer_first-padding_free",
        "patch_first-padded",
        "patch_first-padding_free",
    ],
)
def test_trl_sft(sft_reference, tmp_path, order, padding_free):
    """Loss, token accuracy, entropy and token count as logged by TRL, and the final weights.

    padding_free=True sends pre-packed batches (position_ids restarting, cu_seq_lens) that seqpack
    passes through; it is compared to the padded unpatched run, which is the truth for both.
    """
    ref_logs, ref_model = sft_reference
    new_logs, new_model = _sft_run(tmp_path, order=order, padding_free=padding_free)
    _assert_same_run(ref_logs, new_logs, ref_model, new_model, exact_keys=("num_tokens",))


def _preference_rows(n, seed):
    """Prompts of 1 to 6 tokens (a 1-token prompt makes the second token a scored completion token)."""
    prompts = _sequences(n, seed, lengths=(1, 6))
    chosen, rejected = _sequences(n, seed + 1, lengths=(1, 12)), _sequences(n, seed + 2, lengths=(1, 12))
    return prompts, chosen, rejected


def _dpo_run(tmp_path, *, order):
    from datasets import Dataset

    def text(ids, lead=""):
        return lead + " ".join(f"w{i}" for i in ids)

    rows = zip(*_preference_rows(16, seed=0), strict=True)
    dataset = Dataset.from_list(
        [dict(prompt=text(p), chosen=text(c, " "), rejected=text(r, " ")) for p, c, r in rows]
    )  # DPOTrainer tokenizes text itself (and appends EOS)
    model, ref_model = tiny_llama(), tiny_llama()
    if order == "patch_first":
        _patch(model)
        _patch(ref_model)
    args = _args(trl.DPOConfig, tmp_path, max_length=None, per_device_train_batch_size=2)
    trainer = trl.DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=_tokenizer()
    )
    if order == "trainer_first":
        _patch(trainer.model)
        _patch(trainer.ref_model)
    probes = [_Probe(trainer.model), _Probe(trainer.ref_model)]
    trainer.train()
    if order != "unpatched":
        for probe in probes:
            probe.assert_packed()
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "entropy")
    return _logged(trainer, *keys), trainer.model


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory):
    return _dpo_run(tmp_path_factory.mktemp("dpo"), order="unpatched")


@needs_trl
@pytest.mark.parametrize(
    "order",
    ["trainer_first", "patch_first"],
)
def test_trl_dpo(dpo_reference, tmp_path, order):
    """Chosen and rejected log-probs of the policy and the reference, step by step, and the weights."""
    ref_logs, ref_model = dpo_reference
    new_logs, new_model = _dpo_run(tmp_path, order=order)
    assert ref_logs["logps/chosen"][0] != 0.0
    _assert_same_run(ref_logs, new_logs, ref_model, new_model)


# TRL's DPO, KTO, GRPO and RLOO build their reference model themselves when none is given:
# from_pretrained(the policy's path, attn_implementation=policy.config._attn_implementation). That
# model is not patched, so the name a patched config shows must compute exactly as the original
# (seqpack's configs name the original attention at rest). At step 1 policy and reference are the
# same weights: DPO's loss is ln 2 and the KL of GRPO/RLOO is 0, whatever the data.


def _saved_policy(tmp_path):
    path = tmp_path / "policy"
    if not path.exists():
        tiny_llama().save_pretrained(path)
    return path


def _own_reference_run(kind, tmp_path, patch_it):
    from datasets import Dataset

    def text(ids, lead=""):
        return lead + " ".join(f"w{i}" for i in ids)

    prompts, chosen, rejected = _preference_rows(8, seed=4)
    model = AutoModelForCausalLM.from_pretrained(_saved_policy(tmp_path), attn_implementation="sdpa").train()
    if patch_it:
        _patch(model)
    probe = _Probe(model)
    common = dict(per_device_train_batch_size=2, report_to="none")
    if kind == "dpo":
        dataset = Dataset.from_list(
            [
                dict(prompt=text(p), chosen=text(c, " "), rejected=text(r, " "))
                for p, c, r in zip(prompts, chosen, rejected, strict=True)
            ]
        )
        args = _args(trl.DPOConfig, tmp_path / kind, max_length=None, **common)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer())
        keys = ("loss", "logps/chosen", "rewards/chosen")
    elif kind == "kto":
        rows = [
            dict(prompt=text(p), completion=text(c, " "), label=i % 2 == 0)
            for i, (p, c) in enumerate(zip(prompts, chosen, strict=True))
        ]
        args = _args(trl.KTOConfig, tmp_path / kind, max_length=None, **common)
        trainer = trl.KTOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=_tokenizer()
        )
        keys = ("loss", "kl")
    else:

        def reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        config = trl.GRPOConfig if kind == "grpo" else trl.RLOOConfig
        args = _args(
            config,
            tmp_path / kind,
            beta=0.04,
            num_generations=2,
            max_completion_length=6,
            temperature=1.0,
            **common,
        )
        trainer_cls = trl.GRPOTrainer if kind == "grpo" else trl.RLOOTrainer
        dataset = Dataset.from_list([dict(prompt=text(p)) for p in prompts])
        trainer = trainer_cls(
            model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=_tokenizer()
        )
        keys = ("loss", "kl")
    assert trainer.ref_model is not None and not is_patched(trainer.ref_model)
    trainer.train()
    if patch_it:
        probe.assert_packed(ignore_generation=kind in ("grpo", "rloo"))
    return _logged(trainer, *keys), model


@needs_trl
@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo", "rloo"])
def test_trl_reference_model_built_from_the_patched_config(kind, tmp_path):
    ref_logs, reference = _own_reference_run(kind, tmp_path, patch_it=False)
    new_logs, patched = _own_reference_run(kind, tmp_path, patch_it=True)
    if kind == "dpo":
        assert_close(new_logs["loss"][0], math.log(2), rtol=1e-6, atol=1e-6)
    elif kind in ("grpo", "rloo"):
        assert abs(new_logs["kl"][0]) < 1e-6, new_logs["kl"]
    for key in ref_logs:
        assert_close(new_logs[key], ref_logs[key], rtol=1e-4, atol=1e-6, msg=key)
    _assert_same_params(reference, patched)


@needs_trl
def test_trl_reward_trainer(tmp_path):
    """TRL's reward trainer: a sequence-classification head that pools the last real token."""
    from datasets import Dataset

    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, num_labels=1,
    )  # fmt: skip
    _, chosen, rejected = _preference_rows(16, seed=3)
    dataset = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})

    def run(patch_it):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        if patch_it:
            _patch(model)
        probe = _Probe(model)
        args = _args(trl.RewardConfig, tmp_path, max_length=None, per_device_train_batch_size=2)
        trainer = trl.RewardTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=_tokenizer()
        )
        trainer.train()
        if patch_it:
            probe.assert_packed()
        return _logged(trainer, "loss", "mean_reward", "margin", "accuracy", "num_tokens"), model

    ref_logs, reference = run(False)
    new_logs, patched = run(True)
    _assert_same_run(ref_logs, new_logs, reference, patched, exact_keys=("num_tokens",))


@needs_trl
def test_trl_sft_peft(tmp_path):
    """SFTTrainer wraps the model with PEFT itself (peft_config); seqpack patches the PEFT model."""
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )

    ref_logs, ref_model = _sft_run(tmp_path, order="unpatched", peft_config=lora())
    new_logs, new_model = _sft_run(tmp_path, order="trainer_first", peft_config=lora())
    _assert_same_run(ref_logs, new_logs, ref_model, new_model, exact_keys=("num_tokens",))


# --------------------------------------------------------------------------- the examples


@pytest.mark.parametrize(
    "script",
    [
        "trainer.py",
        pytest.param("trl_sft.py", marks=needs_trl),
        pytest.param("trl_dpo.py", marks=needs_trl),
        "accelerate_loop.py",
    ],
)
def test_example_runs(script, tmp_path):
    """Each example trains the `tiny` preset for a few steps on a CPU and says it ran packed."""
    command = [sys.executable, str(ROOT / "examples" / script), "--max-steps", "2", "--batch-size", "2"]
    if script != "accelerate_loop.py":
        command += ["--output-dir", str(tmp_path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["patched"] is True and summary["packed"] is True, summary
    assert len(summary["losses"]) == 2 and all(0 < x < 20 for x in summary["losses"]), summary
