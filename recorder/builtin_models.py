"""Built-in models that need no download: real transformers MoE architectures with random weights.

`olmoe-tiny` is the default model (seconds on a CPU); `olmoe-1b-7b-random` has the real OLMoE-1B-7B shapes for
GPU benchmarks. The tokenizer is byte-level, built locally with the `tokenizers` library, so nothing reaches
the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BUILTIN_SEED = 1234  # weights are a pure function of this seed and the config

# Byte-level vocabulary: ids 0..255 are bytes, then the special tokens.
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN = "<|pad|>", "<|endoftext|>", "<|bos|>"
BYTE_VOCAB = 256
PAD_ID, EOS_ID, BOS_ID = BYTE_VOCAB, BYTE_VOCAB + 1, BYTE_VOCAB + 2
TINY_VOCAB = 320

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _olmoe_tiny() -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=False,
        max_position_embeddings=1024, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )


def _olmoe_1b_7b() -> Any:
    from transformers import OlmoeConfig

    # allenai/OLMoE-1B-7B-0924 config.json: expert FFN 1024 (OlmoeConfig's default 2048 is wrong for it).
    return OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False,
        max_position_embeddings=4096, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )


def _mixtral_tiny() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )


def _qwen_moe_tiny() -> Any:
    from transformers import Qwen2MoeConfig

    # Every second layer is MoE (decoder_sparse_step=2), with one gated shared expert.
    return Qwen2MoeConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        num_experts=12, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
        max_position_embeddings=1024, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )


def _deepseek_tiny() -> Any:
    from transformers import DeepseekV3Config

    # First layer dense (first_k_dense_replace=1), sigmoid group-limited routing, scaled weights.
    return DeepseekV3Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=None,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=1024,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )


BUILTIN_MODELS: dict[str, Callable[[], Any]] = {
    "olmoe-tiny": _olmoe_tiny,
    "olmoe-1b-7b-random": _olmoe_1b_7b,
    "mixtral-tiny": _mixtral_tiny,
    "qwen-moe-tiny": _qwen_moe_tiny,
    "deepseek-tiny": _deepseek_tiny,
}


def builtin_config(name: str) -> Any:
    return BUILTIN_MODELS[name]()


# The built-in models with a real model's full size (recorded in bf16 on a CPU by default, see resolve_dtype).
FULL_SIZE_BUILTINS = frozenset({"olmoe-1b-7b-random"})
# Built on the target device in the target dtype: a 28 GB fp32 copy on the host would be slow. Its random
# weights therefore depend on the device's random generator; every other built-in model is the same on every
# machine.
BUILT_ON_DEVICE = FULL_SIZE_BUILTINS


def build_builtin_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = BUILTIN_SEED) -> Any:
    """The named built-in model with seeded random weights, on `device` in `dtype`.

    Small models are drawn on the CPU in float32 and then moved and cast, so the same name gives the same
    weights on a CPU and on a GPU (the two random generators differ).
    """
    from transformers import AutoModelForCausalLM

    config = builtin_config(name)
    on_device = name in BUILT_ON_DEVICE
    build_device, build_dtype = (device, dtype) if on_device else (torch.device("cpu"), torch.float32)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(build_dtype)
        with build_device:
            model = AutoModelForCausalLM.from_config(config, dtype=build_dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    if not on_device:
        model = model.to(device=device, dtype=dtype)
    model.config.name_or_path = name
    return model.eval()


def build_builtin_tokenizer() -> Any:
    """A byte-level tokenizer (one token per UTF-8 byte) with pad/eos/bos tokens and a simple chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD_TOKEN, EOS_TOKEN, BOS_TOKEN])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_of(ch: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's printable byte mapping)."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
