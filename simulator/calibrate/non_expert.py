"""The work outside the routed experts, built from a model's shapes and timed by tokens per GPU and context.

Per decoder layer: input RMSNorm, fused QKV projection, attention (decode: each token over `context` cached
keys; prefill: causal over sequences of `context` tokens; scaled_dot_product_attention with grouped KV heads),
output projection, residual,
post-attention RMSNorm, router, and the shared experts where the model has them. Once per step: final norm and
LM head. Dense FFN layers (DeepSeek's first layers) are timed apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from traces.schema import TraceMetadata

# cached keys per attention call; past that, time is scaled by sequences (linear in them)
MAX_KV_TOKENS = 1 << 21


@dataclass
class NonExpertShapes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int
    shared_ffn: int  # all shared experts of a layer as one FFN (0: none)
    dense_ffn: int  # dense-layer FFN size (0: no dense layers)
    gated: bool

    @classmethod
    def from_metadata(cls, meta: TraceMetadata) -> NonExpertShapes:
        heads = meta.num_attention_heads or max(1, meta.hidden_size // 128)
        head_dim = meta.head_dim or meta.hidden_size // heads
        return cls(meta.hidden_size, heads, meta.num_key_value_heads or heads, head_dim, meta.vocab_size or 0,
                   meta.num_experts, meta.num_shared_experts * meta.shared_expert_intermediate_size,
                   meta.dense_intermediate_size if meta.num_hidden_layers > meta.num_moe_layers else 0,
                   meta.expert_activation == "swiglu")


def _w(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * cols ** -0.5


class NonExpertLayer:
    def __init__(self, s: NonExpertShapes, device: torch.device):
        self.s = s
        self.device = device
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.w_qkv = _w(q + 2 * kv, s.hidden, device)
        self.w_o = _w(s.hidden, q, device)
        self.w_router = _w(s.num_experts, s.hidden, device)
        m = 2 if s.gated else 1
        self.shared = (_w(m * s.shared_ffn, s.hidden, device), _w(s.hidden, s.shared_ffn, device)) \
            if s.shared_ffn else None
        self.dense = (_w(m * s.dense_ffn, s.hidden, device),
                      _w(s.hidden, s.dense_ffn, device)) if s.dense_ffn else None
        self.lm_head = _w(s.vocab, s.hidden, device) if s.vocab else None
        self.norm_w = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)

    def _ffn(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = F.linear(x, w[0])
        if self.s.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return F.linear(h, w[1])

    def layer_items(self, tokens: int, context: int,
                    prefill: bool = False) -> tuple[Callable[[], object], Callable[[], object], float]:
        """(layer, attention, extra): one layer's work at `tokens` tokens per GPU, the attention call alone,
        and how many more attention calls the step would need; layer time = layer + extra x attention.

        Decode: each token is a sequence attending to `context` cached keys; past MAX_KV_TOKENS cached keys
        the extra sequences are added as whole attention calls (attention is linear in sequences). Prefill:
        the tokens form sequences of `context` tokens (one shorter sequence when fewer) under causal
        attention.
        """
        s, dev = self.s, self.device
        x = torch.randn(tokens, s.hidden, device=dev, dtype=torch.bfloat16)
        q_dim = s.heads * s.head_dim
        gqa = s.kv_heads != s.heads
        if prefill:
            length = min(tokens, context)
            seqs = max(1, tokens // length)
            k = torch.randn(seqs, s.kv_heads, length, s.head_dim, device=dev, dtype=torch.bfloat16)
            extra = 0.0
        else:
            length = 1
            seqs = max(1, min(tokens, MAX_KV_TOKENS // max(context, 1)))
            k = torch.randn(seqs, s.kv_heads, context, s.head_dim, device=dev, dtype=torch.bfloat16)
            extra = tokens / seqs - 1.0
        v = torch.randn_like(k)
        rows = seqs * length

        def layer() -> torch.Tensor:
            h = F.rms_norm(x, (s.hidden,), self.norm_w)
            qkv = F.linear(h, self.w_qkv)
            attn = qkv[:, :q_dim].contiguous()
            qs = attn[:rows].reshape(seqs, length, s.heads, s.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=prefill, enable_gqa=gqa)
            attn[:rows] = o.transpose(1, 2).reshape(rows, q_dim)
            y = x + F.linear(attn, self.w_o)
            h2 = F.rms_norm(y, (s.hidden,), self.norm_w)
            probs = F.linear(h2, self.w_router).float().softmax(-1)
            torch.topk(probs, min(8, s.num_experts), dim=-1)
            if self.shared is not None:
                y = y + self._ffn(h2, self.shared)
            return y

        return layer, self.attention_item(seqs, k, v), extra

    def attention_item(self, seqs: int, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
        s = self.s
        q = torch.randn(seqs, s.heads, 1, s.head_dim, device=self.device, dtype=torch.bfloat16)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=s.kv_heads != s.heads)

    def head_item(self, tokens: int) -> Callable[[], object] | None:
        if self.lm_head is None:
            return None
        x = torch.randn(tokens, self.s.hidden, device=self.device, dtype=torch.bfloat16)
        head = self.lm_head
        return lambda: F.linear(F.rms_norm(x, (self.s.hidden,), self.norm_w), head)

    def dense_item(self, tokens: int) -> Callable[[], object] | None:
        if self.dense is None:
            return None
        x = torch.randn(tokens, self.s.hidden, device=self.device, dtype=torch.bfloat16)
        dense = self.dense
        return lambda: self._ffn(x, dense)
