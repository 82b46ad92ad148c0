"""Tiny randomly initialised LLaMA- and GPT-2-config models with a word-level tokenizer (no hub needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PARAREL = Path(__file__).resolve().parents[2] / "shared" / "pararel"

WORDS = (
    "<pad> <unk> the capital of is city france paris germany berlin italy rome spain madrid "
    "people in speak french german italian spanish language official a country located "
    "new york tower eiffel 's and to it one two three . , history science today when"
).split()


def word_tokenizer(extra_texts=()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``WORDS`` plus every word of ``extra_texts``."""
    words = list(WORDS)
    splitter = pre_tokenizers.Whitespace()
    for t in extra_texts:
        for w, _ in splitter.pre_tokenize_str(t.lower()):
            if w not in words:
                words.append(w)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_llama(seed: int = 0, vocab_size: int = len(WORDS)) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_gemma2(seed: int = 0, vocab_size: int = len(WORDS)):
    """A tiny Gemma-2-config model: logit soft-capping after the head, so attribution takes the autograd path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=8)
    return Gemma2ForCausalLM(cfg)


def jumprelu_sae(d_in: int, d_sae: int, hook_name: str, seed: int = 0):
    """A random JumpReLU SAE in SAELens format (the architecture of Gemma Scope)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.threshold.fill_(0.05)
    return sae


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny random LLaMA and its word tokenizer saved as a model directory (what ``--model`` takes)."""
    tiny_llama(seed).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return Path(path)


def capital_facts():
    """Facts over the word tokenizer's vocabulary: two capitals and a language."""
    from kscope.facts import Fact

    return [Fact("france", "capital", "paris", ["the capital of france is", "france 's capital city is"]),
            Fact("germany", "capital", "berlin", ["the capital of germany is", "germany 's capital city is"]),
            Fact("spain", "language", "spanish", ["people in spain speak", "the official language of spain is"])]
