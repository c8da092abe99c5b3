"""Shared builders for the CPU tests: tiny models, padded batches, the per-sequence truth."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Eager layers and materialised logits: what the parity tests compare. Compile and the fused loss
# have their own tests.
EAGER = {"compile": False, "keep_logits": True}


def tiny_llama(seed: int = 0, attn: str = "sdpa", **overrides):
    """A 2-layer GQA llama in fp32, train mode, no dropout."""
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        max_position_embeddings=256,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **config), attn_implementation=attn
    )
    return model.train()


def padded_batch(lengths, seq_len, *, left=False, vocab=128, seed=0):
    """Random ids (B, L) with a 0/1 mask of the given real lengths, and labels -100 at padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), seq_len), generator=g)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, seq_len - n :] = 1
        else:
            mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def per_sequence_logits(model, ids, mask):
    """The truth: each sequence run alone, unpadded. Returns a list of (n_b, V)."""
    out = []
    with torch.no_grad():
        for row in range(ids.shape[0]):
            real = ids[row][mask[row].bool()]
            if real.numel() == 0:
                out.append(None)
                continue
            out.append(model(input_ids=real[None]).logits[0])
    return out


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def enable_checkpointing(model, **kwargs):
    """Gradient checkpointing by whichever name this transformers has (5.24 renamed it)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        return enable(activation_checkpointing_kwargs=kwargs or None)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
