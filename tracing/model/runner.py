"""An architecture-free forward pass, one block at a time, with no hooks on the shared model.

The library never calls the model's own ``forward`` for its measurements. It runs the blocks itself
so that it can start at any layer, feed only some positions (reusing keys and values of an
untouched prefix), and compute logits only where they are needed. Nothing here is stored on the
model: every per-call setting lives in local objects or in a context variable of the calling thread,
so one cached model can serve many threads at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

if TYPE_CHECKING:
    from .loading import LoadedModel

ATTENTION_IMPLEMENTATION = "causal_tracing"

AttentionRecorder = Callable[[int, torch.Tensor], None]
_attention_recorder: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "attention_recorder", default=None
)


def _attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa by default; the family's own eager attention while this thread records weights."""
    recorder = _attention_recorder.get()
    if recorder is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    recorder(module.layer_idx, weights)
    return output, weights


AttentionInterface.register(ATTENTION_IMPLEMENTATION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def record_attention(recorder: AttentionRecorder) -> Iterator[None]:
    """Within this block, in this thread only, call ``recorder(layer, weights)`` for every attention.

    ``weights`` has shape [batch, heads, queries, keys]. Other threads are not affected.
    """
    token = _attention_recorder.set(recorder)
    try:
        yield
    finally:
        _attention_recorder.reset(token)


class KVRecorder:
    """A cache stand-in that keeps each layer's keys and values (after rotary) as they are made."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class KVPrefix:
    """A cache stand-in that puts fixed keys and values of earlier positions before the new ones.

    ``prefix(layer)`` returns (keys, values) shaped [batch, kv_heads, prefix_len, head_dim].
    """

    def __init__(self, prefix: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.prefix = prefix

    def update(self, key, value, layer_idx, *args, **kwargs):
        old_key, old_value = self.prefix(layer_idx)
        return torch.cat([old_key, key], dim=2), torch.cat([old_value, value], dim=2)


def causal_mask(positions: torch.Tensor, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, queries, n_keys]: query at absolute position p sees keys 0..p."""
    keys = torch.arange(n_keys, device=positions.device)
    allowed = keys[None, :] <= positions[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass(frozen=True)
class BlockContext:
    """What every block needs besides the hidden states, for one set of query positions."""

    mask: torch.Tensor
    position_ids: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None


class Runner:
    """Runs a loaded model block by block. Cheap to build; holds no state on the model."""

    def __init__(self, lm: "LoadedModel") -> None:
        self.lm = lm
        self.adapter = lm.adapter
        model = lm.model
        self.embedding = model.get_submodule(self.adapter.token_embedding)
        self.blocks = model.get_submodule(self.adapter.blocks)
        self.final_norm = model.get_submodule(self.adapter.final_norm)
        self.unembed = model.get_submodule(self.adapter.unembed)
        pos = self.adapter.position_embedding
        self.position_embedding = model.get_submodule(pos) if pos else None
        rot = self.adapter.rotary
        self.rotary = model.get_submodule(rot) if rot else None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Output of the token-embedding module for ids [batch, tokens] (where noise goes)."""
        return self.embedding(ids.to(self.lm.device))

    def block_input(self, token_embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The input of block 0: token embeddings plus learned position embeddings, if any."""
        if self.position_embedding is None:
            return token_embeddings
        return token_embeddings + self.position_embedding(positions)[None]

    def context(self, positions: torch.Tensor, n_prefix: int = 0) -> "BlockContext":
        """Mask, position ids and rotary embeddings for queries at ``positions`` after a prefix."""
        positions = positions.to(self.lm.device)
        mask = causal_mask(positions, n_prefix + positions.numel(), self.lm.dtype)
        position_ids = positions[None]
        rotary = None
        if self.rotary is not None:
            like = torch.empty(0, dtype=self.lm.dtype, device=self.lm.device)
            rotary = self.rotary(like, position_ids)
        return BlockContext(mask, position_ids, rotary)

    def run_block(
        self, layer: int, hidden: torch.Tensor, context: "BlockContext", cache: object | None = None
    ) -> torch.Tensor:
        """One block on ``hidden`` [batch, queries, d_model]."""
        return self.adapter.call_block(
            self.blocks[layer], hidden, context.mask, context.position_ids, context.rotary, cache
        )

    def run(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
        cache: object | None = None,
        n_prefix: int = 0,
        before_block: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start`` .. ``stop - 1`` on ``hidden`` [batch, queries, d].

        ``positions`` are the absolute positions of the queries; ``n_prefix`` earlier positions come
        from ``cache`` (a KVPrefix). ``before_block(layer, hidden)`` may return a replacement input.
        """
        stop = self.n_layers if stop is None else stop
        context = self.context(positions, n_prefix)
        for layer in range(start, stop):
            if before_block is not None:
                replaced = before_block(layer, hidden)
                hidden = hidden if replaced is None else replaced
            hidden = self.run_block(layer, hidden, context, cache)
        return hidden

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding of output states [..., d] (pass only the positions you need)."""
        return self.unembed(self.final_norm(last_hidden)).float()

    def hidden_states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Inputs of every block, then the last block's output (before the final norm): L + 1 tensors."""
        positions = torch.arange(ids.shape[-1], device=self.lm.device)
        hidden = self.block_input(self.token_embeddings(ids), positions)
        states: list[torch.Tensor] = []

        def keep(layer: int, h: torch.Tensor) -> None:
            states.append(h)

        states.append(self.run(hidden, positions, before_block=keep))
        return states
