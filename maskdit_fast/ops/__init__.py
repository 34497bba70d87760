"""Autograd-aware ops with a plain PyTorch reference (the spec) for each, and back-ends
selected by `maskdit_fast.backend` (per call with `backend=`)."""
from maskdit_fast.ops.attention import (attention, attention_qkvpacked, attention_ref, varlen_attention,
                                        varlen_attention_qkvpacked, varlen_attention_ref)
from maskdit_fast.ops.gather_scatter import (gather_tokens, gather_tokens_ref, gather_tokens_varlen,
                                             gather_tokens_varlen_ref, sample_index, scatter_tokens,
                                             scatter_tokens_ref, scatter_tokens_varlen, scatter_tokens_varlen_ref)
from maskdit_fast.ops.modulate import gated_residual, gated_residual_ref, layernorm_modulate, layernorm_modulate_ref
from maskdit_fast.ops.residual_modulate import residual_layernorm_modulate, residual_layernorm_modulate_ref

__all__ = [
    "attention", "attention_qkvpacked", "attention_ref", "varlen_attention", "varlen_attention_qkvpacked",
    "varlen_attention_ref",
    "gather_tokens", "gather_tokens_ref", "scatter_tokens", "scatter_tokens_ref",
    "gather_tokens_varlen", "gather_tokens_varlen_ref", "scatter_tokens_varlen", "scatter_tokens_varlen_ref",
    "sample_index",
    "gated_residual", "gated_residual_ref", "layernorm_modulate", "layernorm_modulate_ref",
    "residual_layernorm_modulate", "residual_layernorm_modulate_ref",
]
