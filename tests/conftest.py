"""Shared fixtures: tiny random Hugging Face models of every supported family (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 128


def _seq2seq_kw():
    return dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def make_tiny(family: str, seed: int = 0):
    """A tiny random model of ``family``; every config small enough for a unit test."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "bart":
        cfg = tf.BartConfig(**_seq2seq_kw())
        return tf.BartForConditionalGeneration(cfg)
    if family == "mbart":
        cfg = tf.MBartConfig(**_seq2seq_kw())
        return tf.MBartForConditionalGeneration(cfg)
    if family == "marian":
        kw = _seq2seq_kw()
        kw.update(decoder_start_token_id=1, pad_token_id=1, decoder_vocab_size=VOCAB)
        return tf.MarianMTModel(tf.MarianConfig(**kw))
    if family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                          num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8)
        return tf.T5ForConditionalGeneration(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                            eos_token_id=2, pad_token_id=1)
        return tf.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common))
    raise ValueError(family)


SEQ2SEQ = ("bart", "mbart", "marian", "t5")
CAUSAL = ("gpt2", "llama", "qwen2", "mistral")


@pytest.fixture
def tiny_bart():
    return make_tiny("bart")
