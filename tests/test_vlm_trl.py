"""TRL's SFTTrainer fine-tuning a vision-language model, patched and unpatched: the same run.

A tiny random Qwen2-VL (tiny_vlms.py) trains for a few steps on conversations with images, through
TRL's own vision path: given a processor and a dataset with an "images" column, SFTTrainer skips
dataset preparation and picks DataCollatorForVisionLanguageModeling, which renders each
conversation with the processor's chat template, expands each image into its placeholder tokens
and pads the batch on the right, with pixel_values and image_grid_thw for the whole batch. The run
is done twice, as is and with the default ``seqpack.patch(model)``; the per-step metrics TRL logs
and the final weights must agree, and the patched run must really have packed: every call of the
first decoder layer sees (1, T, H), T the batch's real token count, with the images in the batch.

Batches are taken in order so that each one is known: two image sizes side by side, an image row
beside a text-only one, and two rows of one size. The processor is built offline (a word-level
tokenizer whose special tokens sit at tiny_vlms' ids, and a small image processor).
"""

import numpy as np
import pytest
import torch
from tiny_vlms import END, IMAGE, START, VIDEO, tiny_vlm_config
from torch.testing import assert_close

from seqpack import is_patched, patch
from seqpack.support import _decoder_layers

trl = pytest.importorskip("trl", reason="needs trl (pip install seqpack[test])")
PIL_Image = pytest.importorskip("PIL.Image", reason="needs pillow (pip install seqpack[test])")

STEPS = 3
LR = 0.5
PATCH = 14  # the tiny vision tower's patch, and its 2x2 merge: one image token per 28x28 pixels
SIZES = {"square": (56, 56), "wide": (56, 84)}  # (H, W): 4 and 6 image tokens
SPECIAL = {"<|image_pad|>": IMAGE, "<|vision_start|>": START, "<|vision_end|>": END, "<|video_pad|>": VIDEO}

# Qwen2-VL's own layout (role, content, end of turn), reduced to what a word-level tokenizer reads:
# words split on spaces, the special tokens split out wherever they are.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}</s> {% endfor %}"
)


def _tokenizer():
    """Words "w3".."w199" are their ids; pad 0, bos 1, eos 2 (the end of each turn), roles 200, 201."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 200)}
    vocab |= {"user": 200, "assistant": 201} | SPECIAL
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
        extra_special_tokens=list(SPECIAL),  # split out of "<|vision_start|><|image_pad|>..." unspaced
    )


def _processor():
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor.

        ProcessorMixin checks each sub-processor against its base class, and the video processor's
        (VideoProcessorMixin) only exists with torchvision, which the test extra does not bring;
        with no video in the data the video processor is never called.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    images = Qwen2VLImageProcessor(
        patch_size=PATCH, merge_size=2, min_pixels=(2 * PATCH) ** 2, max_pixels=56 * 84
    )  # images kept to their own few patches: resizing to the default minimum would give hundreds
    return ImageOnlyProcessor(image_processor=images, tokenizer=_tokenizer(), chat_template=CHAT_TEMPLATE)


def _image(size: str, seed: int):
    h, w = SIZES[size]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return PIL_Image.fromarray(pixels)


def _dataset():
    """Six conversations, two per batch in order: square + wide, wide + no image, square + square."""
    from datasets import Dataset

    rows = [
        ("square", 4, 3),
        ("wide", 1, 6),
        ("wide", 3, 2),
        (None, 2, 9),
        ("square", 5, 1),
        ("square", 2, 4),
    ]
    g = np.random.default_rng(0)
    data = []
    for i, (size, n_user, n_reply) in enumerate(rows):
        user, reply = (" ".join(f"w{t}" for t in g.integers(3, 200, n)) for n in (n_user, n_reply))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        data.append({"messages": messages, "images": [] if size is None else [_image(size, seed=i)]})
    return Dataset.from_list(data)


def _model():
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_vlm_config("qwen2_vl"))


def _args(tmp_path):
    """test_frameworks' arguments (CPU fp32, SGD at a constant rate, a log every step), batches of
    two taken in order; TRL's own default gradient_checkpointing=True stays on."""
    from test_frameworks import _args as shared_args

    return shared_args(
        trl.SFTConfig,
        tmp_path,
        max_steps=STEPS,
        learning_rate=LR,
        per_device_train_batch_size=2,
        train_sampling_strategy="sequential",
        max_length=None,
    )


class _Probe:
    """What reached the model: each batch at the backbone, and each call of the first decoder layer
    with the real token count of the batch it ran for.

    TRL's fused LM head calls the backbone (model.model) itself, so that is where the batch shows.
    TRL's default gradient checkpointing recomputes inside the layer's call, past its hooks: one
    hook call per batch.
    """

    def __init__(self, model):
        self.batches, self.layer_calls = [], []
        model.model.register_forward_pre_hook(self._batch, with_kwargs=True)
        # The layer is compiled in place, hooks and all: kept out of the graph, the hook adds no
        # guard on the probe's own lists (a recompile every step) and sees each call as it runs.
        layer_hook = torch.compiler.disable(self._layer)
        _decoder_layers(model.model, None)[0].register_forward_pre_hook(layer_hook, with_kwargs=True)

    def _batch(self, module, args, kwargs):
        self.batches.append(
            dict(
                shape=tuple(kwargs["input_ids"].shape),
                real=int(kwargs["attention_mask"].sum()),
                pixels=kwargs.get("pixel_values") is not None,
                grids=[] if kwargs.get("image_grid_thw") is None else kwargs["image_grid_thw"].tolist(),
            )
        )

    def _layer(self, module, args, kwargs):
        if not torch.is_grad_enabled():  # seqpack's mask probe: 8 tokens through stubbed layers, no batch
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        self.layer_calls.append((tuple(hidden.shape[:2]), self.batches[-1]))


def _train(tmp_path, *, patched: bool):
    model = _model()
    if patched:
        patch(model)
    trainer = trl.SFTTrainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(), processing_class=_processor()
    )
    assert type(trainer.data_collator).__name__ == "DataCollatorForVisionLanguageModeling"
    probe = _Probe(trainer.model)
    trainer.train()
    assert is_patched(trainer.model) == patched
    rows = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(rows) == STEPS, trainer.state.log_history
    keys = ("loss", "mean_token_accuracy", "entropy", "num_tokens")
    return {k: [row[k] for row in rows] for k in keys}, trainer.model, probe


def test_trl_sft_with_images(tmp_path):
    ref_logs, ref_model, ref_probe = _train(tmp_path / "ref", patched=False)
    new_logs, new_model, probe = _train(tmp_path / "new", patched=True)

    batches = probe.batches
    assert len(batches) == STEPS and batches == ref_probe.batches, (batches, ref_probe.batches)
    assert all(b["pixels"] for b in batches)
    assert [len({tuple(g) for g in b["grids"]}) for b in batches] == [2, 1, 1]  # square + wide first
    assert [len(b["grids"]) for b in batches] == [2, 1, 2]  # the text-only row in step 2
    assert all(b["real"] < b["shape"][0] * b["shape"][1] for b in batches[:2])  # padded batches
    for run in (probe, ref_probe):
        assert [id(b) for _, b in run.layer_calls] == [id(b) for b in run.batches], run.layer_calls
    assert [shape for shape, _ in probe.layer_calls] == [(1, b["real"]) for b in batches]
    assert [shape for shape, _ in ref_probe.layer_calls] == [b["shape"] for b in batches]  # it sees padding

    losses = ref_logs["loss"]
    assert len(set(losses)) == len(losses), f"training did not move the loss: {losses}"
    assert new_logs["num_tokens"] == ref_logs["num_tokens"]
    for key in ("loss", "mean_token_accuracy", "entropy"):
        assert_close(new_logs[key], ref_logs[key], rtol=1e-4, atol=1e-6, msg=key)
    ref_params, new_params = dict(ref_model.named_parameters()), dict(new_model.named_parameters())
    assert ref_params.keys() == new_params.keys()
    for name, p in ref_params.items():
        assert_close(new_params[name], p, rtol=1e-4, atol=1e-6, msg=name)
