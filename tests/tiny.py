"""Tiny random models and a byte-level tokenizer with a ChatML template, built from configs.

Tests need real transformers models of each family (Llama, Qwen2, Mistral, Qwen3, Gemma 3, Phi-3, OLMo 2) with no
download: these are small enough to train for a few steps on a CPU in seconds.
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """Byte-level tokenizer: 256 byte tokens plus the ChatML specials, no merges."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_alphabet))}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


FAMILIES = {
    # Grouped-query attention in every family (4 query heads share 2 kv heads); Qwen2 has q/k/v biases.
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    # Qwen3: per-head q/k RMSNorms.
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False),
    # Gemma 3 (text): (1 + weight) norms around attention and MLP, q/k norms, query_pre_attn_scalar unlike head_dim,
    # sqrt(hidden) embedding scale, gelu_pytorch_tanh; local layers 0, 2, ... with an 8-token window and base 1e4,
    # global layers 1, 3, ... with base 1e6.
    "gemma3": dict(model_type="gemma3_text", tie_word_embeddings=True, query_pre_attn_scalar=12, sliding_window=8,
                   sliding_window_pattern=2),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),
    # OLMo 2: no norm before attention or MLP; norms after them, and q/k norms over the whole projection.
    "olmo2": dict(model_type="olmo2", tie_word_embeddings=False),
}


def tiny_config(family="llama", vocab_size=259, **overrides):
    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    kw.update(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              rms_norm_eps=1e-6, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family="llama", seed=0, attn_implementation="eager", **overrides):
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_attn_implementation(attn_implementation)
    # Random init gives near-uniform attention; a larger spread makes sink statistics non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval(), tokenizer


# Three chat-formatted texts of different lengths: a batch of them is right-padded in two rows.
TEXTS = ["<|im_start|>user\nhow do I pick a lock?<|im_end|>\n", "<|im_start|>user\nhi<|im_end|>\n",
         "<|im_start|>user\na longer message that goes on for a while, longer than the others<|im_end|>\n"]


def padded_batch(tokenizer, texts, device="cpu"):
    """The texts tokenised and right-padded as surgery.py pads a reference batch, on `device`."""
    import surgery
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return surgery.to_device(surgery.pad_batch(ids, tokenizer.pad_token_id), device)


def add_random_lora(model, targets=("q_proj", "k_proj", "v_proj")):
    """surgery.py's LoRA adapters (rank 4) with random B, so they change the model and carry gradients."""
    import surgery
    surgery.add_lora(model, set(targets), rank=4, lora_alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in surgery.lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
    return model


def save_tiny(directory, family="llama", dtype=torch.float32, seed=0, **overrides):
    """Write a loadable model folder (model.safetensors, config.json, tokenizer files) and return its path."""
    model, tokenizer = tiny_model(family, seed=seed, **overrides)
    directory = Path(directory)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
