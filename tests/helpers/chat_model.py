"""A small local causal LM with a chat template, built here (random weights, nothing downloaded)."""

from pathlib import Path

# ChatML, the form Qwen2.5-Instruct's template produces for one user turn
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_model(out: Path, max_positions: int = 2048) -> Path:
    """The tiny policy's byte-level BPE tokenizer with a chat template, and a 2-layer Qwen2 (head_dim 64)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gdpo.tasks.tiny_policy import build_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer(0)
    tok.chat_template = CHATML
    tok.model_max_length = max_positions
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
