"""Architecture adapters: where each model family keeps its parts.

An adapter names the token embedding, the blocks, each block's MLP and attention, the final norm,
the unembedding and (where the family has them) learned position embeddings or a rotary module,
the attention output projection (whose input holds each head's output, head after head), and
knows the keyword names its blocks take. Everything else in the library is architecture-free.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its parts (attribute paths from the causal LM)."""

    family: str
    model_types: tuple[str, ...]
    token_embedding: str
    blocks: str
    final_norm: str
    unembed: str
    mlp: str  # relative to a block
    attn: str  # relative to a block
    attn_out: str  # relative to a block: the output projection; its input is [..., n_heads * head_dim]
    position_embedding: str | None = None  # learned absolute positions (GPT-2)
    rotary: str | None = None  # module computing rotary (cos, sin) for the blocks
    cache_kwarg: str = "cache"

    def call_block(
        self,
        block: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: object | None,
    ) -> torch.Tensor:
        """Run one block on ``hidden`` [batch, query, d_model]; returns its output hidden state."""
        kwargs = {"attention_mask": mask, "position_ids": position_ids, self.cache_kwarg: cache}
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def out_projections(self, blocks: nn.ModuleList) -> dict[int, nn.Module]:
        """Layer -> the attention output projection of that block."""
        return {layer: block.get_submodule(self.attn_out) for layer, block in enumerate(blocks)}


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear projection as [out_features, in_features] (``nn.Linear``, or GPT-2's
    ``Conv1D`` whose weight is stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.T
    raise UnsupportedArchitectureError(f"Unknown projection type {type(module).__name__}.")


GPT2 = Adapter(
    family="GPT-2",
    model_types=("gpt2",),
    token_embedding="transformer.wte",
    position_embedding="transformer.wpe",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    mlp="mlp",
    attn="attn",
    attn_out="attn.c_proj",
)

LLAMA = Adapter(
    family="Llama / SmolLM / Qwen2 / Mistral",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    token_embedding="model.embed_tokens",
    rotary="model.rotary_emb",
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    mlp="mlp",
    attn="self_attn",
    attn_out="self_attn.o_proj",
)

GPT_NEOX = Adapter(
    family="GPT-NeoX / Pythia",
    model_types=("gpt_neox",),
    token_embedding="gpt_neox.embed_in",
    rotary="gpt_neox.rotary_emb",
    blocks="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    mlp="mlp",
    attn="attention",
    attn_out="attention.dense",
    cache_kwarg="layer_past",
)

GPTJ = Adapter(
    family="GPT-J",
    model_types=("gptj",),
    token_embedding="transformer.wte",
    rotary="transformer.rotary_emb",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    mlp="mlp",
    attn="attn",
    attn_out="attn.out_proj",
)

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA, GPT_NEOX, GPTJ)


def supported_families() -> str:
    return "; ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a transformers ``config.model_type``; a clear error if none fits."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"Architecture '{model_type}' is not supported. Supported families: {supported_families()}."
    )

