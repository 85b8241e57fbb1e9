"""Temporary, thread-owned forward hooks.

A hook registered here acts only on forwards run by the thread that registered it, and is removed
when the ``with`` block ends, even on an error or a cancellation. Other threads sharing the same
cached model run through it untouched, so concurrent sessions never see each other's patches.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

OutputEditor = Callable[[int, torch.Tensor], None]  # (layer, tensor) -> None; may edit in place


@contextlib.contextmanager
def edit_outputs(modules: Mapping[int, nn.Module], edit: OutputEditor) -> Iterator[None]:
    """Call ``edit(layer, output)`` on each module's output (the first element of a tuple).

    ``edit`` may read the output or change it in place. Only this thread's forwards are seen.
    """
    owner = threading.get_ident()
    handles = []

    def make_hook(layer: int):
        def hook(module, args, output):
            if threading.get_ident() == owner:
                edit(layer, output[0] if isinstance(output, tuple) else output)

        return hook

    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_inputs(modules: Mapping[int, nn.Module], edit: OutputEditor) -> Iterator[None]:
    """Call ``edit(layer, input)`` on each module's first positional input (it may change it in
    place), in this thread's forwards only; removed when the block ends (the pre-hook twin of
    ``edit_outputs``)."""
    owner = threading.get_ident()
    handles = []

    def make_hook(layer: int):
        def hook(module, args):
            if threading.get_ident() == owner and args:
                edit(layer, args[0])

        return hook

    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
