"""Tiny random Llama / Qwen2 / Gemma2 models and a character-level tokenizer: no downloads, milliseconds."""
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

ARCHS = ("llama", "qwen2", "gemma2")


def tiny_config(arch: str, *, tied: bool = True, kv_heads: int = 2, layers: int = 3, inter: int = 24,
                max_position_embeddings: int = 1024):
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                  max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tied, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":  # layers >= 1 use a 4-token sliding window: dropping layers must keep each one's type
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if arch == "gemma2":  # alternating sliding (4 tokens) / full attention, soft-capping, GELU-tanh
        return Gemma2Config(**common, sliding_window=4, query_pre_attn_scalar=8,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **kw), attn_implementation="eager").eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Characters are tokens (ids 3..), with <pad>=0, <s>=1, </s>=2; adds <s> in front like Llama."""
    from tokenizers import Tokenizer, models, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def padded_batch(seed: int = 0, lengths=(11, 7, 3), vocab: int = 128) -> dict:
    """Right-padded (B, T) batch of random tokens, as make_batches builds them."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{arch: path} of saved tiny checkpoints with the character tokenizer (4 layers, width 40)."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        tiny_model(arch, layers=4, inter=40).save_pretrained(d)
        char_tokenizer().save_pretrained(d)
        out[arch] = str(d)
    return out


def assert_trained_alike(a: dict, b: dict, *, lr: float, steps: int):
    """Two state dicts trained on the same data and schedule (say 1 rank vs 2) agree to float rounding.

    Summation order differs between the runs, and Adam's g / (sqrt(v) + eps) turns that rounding noise into a
    step of up to ~lr wherever a gradient is ~0; the next steps then carry those few entries' difference into
    every weight, at a small fraction of lr. Seen: GRPO at lr 1e-2, after step 1 two entries of 32K 2.4e-3 apart,
    after step 2 14% of entries more than 1e-5 apart but 0.01% more than lr / 10. So the test counts entries
    more than lr / 10 apart: a real bug (each rank stepping on its own half, a missed all-reduce) moved 83%."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    far = (diff > lr / 10).double().mean().item()
    assert far < 1e-2, f"{far:.2%} of entries differ by more than lr / 10 = {lr / 10:.0e}"
    assert diff.max().item() <= 2 * lr * steps, f"an entry moved {diff.max().item():.2e} apart"
