"""Reference causal trace: one whole-model forward per cell, with hooks (slow, obviously right).

Used by the tests and the benchmark as the independent computation the fast engine must match.
"""

from __future__ import annotations

import numpy as np
import torch


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def naive_trace(lm, prompt, noised, kind="hidden", noise=0.4, samples=3, seed=0, window=3,
                convention="input", corruption="gaussian", sigma=None, replacement=None, target=None,
                cells=None, sever=None):
    """p(target) per (token, layer) cell, each by its own hooked forward of the whole model.

    ``cells`` limits the work to some (token, layer) pairs (others stay NaN). ``sever="mlp"|"attn"``
    (hidden kind): in each cell's forward, that part's output at the restored token in every block
    after the restored state is overwritten with its value from a plain corrupted forward.
    Returns (scores [n_tokens, n_layers], low, high, target id).
    """
    model, adapter = lm.model, lm.adapter
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    n = ids.shape[1]
    embed = model.get_submodule(adapter.token_embedding)
    blocks = model.get_submodule(adapter.blocks)
    n_layers = len(blocks)
    with torch.no_grad():
        clean_emb = embed(ids)
        if corruption == "replace":
            corrupt_emb = embed(torch.tensor([lm.tokenizer(replacement)["input_ids"]]))
        else:
            g = torch.Generator().manual_seed(seed)
            shape = (samples, len(noised), lm.d_model)
            unit = torch.randn(shape, generator=g) if corruption == "gaussian" else torch.rand(shape, generator=g) * 2 - 1
            scale = noise * (sigma if sigma is not None else 1.0)
            corrupt_emb = clean_emb.repeat(samples, 1, 1)
            corrupt_emb[:, noised] += unit * scale

        # clean values: block inputs, block outputs, module outputs
        inputs, outputs, modules = {}, {}, {"mlp": {}, "attn": {}}
        handles = []
        for l, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, l=l: inputs.__setitem__(l, (args[0] if args else kwargs["hidden_states"]).clone()),
                with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, o, l=l: outputs.__setitem__(l, _first(o).clone())))
            for part in ("mlp", "attn"):
                sub = block.get_submodule(adapter.mlp if part == "mlp" else adapter.attn)
                handles.append(sub.register_forward_hook(
                    lambda m, a, o, l=l, part=part: modules[part].__setitem__(l, _first(o).clone())))
        try:
            clean_logits = model(inputs_embeds=clean_emb).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        target_id = int(clean_logits.argmax()) if target is None else target

        def score(hooks):
            handles = [register(fn) for register, fn in hooks]
            try:
                logits = model(inputs_embeds=corrupt_emb).logits[:, -1]
            finally:
                for h in handles:
                    h.remove()
            return float(torch.softmax(logits, -1)[:, target_id].mean())

        corrupted_modules = {}
        if sever is not None:
            subs = [b.get_submodule(adapter.mlp if sever == "mlp" else adapter.attn) for b in blocks]
            handles = [sub.register_forward_hook(lambda m, a, o, k=k: corrupted_modules.__setitem__(k, _first(o).clone()))
                       for k, sub in enumerate(subs)]
            try:
                model(inputs_embeds=corrupt_emb)
            finally:
                for h in handles:
                    h.remove()

        low = score([])
        scores = np.zeros((n, n_layers))
        scores[:] = np.nan
        todo = cells if cells is not None else [(t, l) for t in range(n) for l in range(n_layers)]
        for t, l in todo:
            hooks = []
            if kind == "hidden" and convention == "input":
                def pre(m, args, kwargs, l=l, t=t):
                    h = (args[0] if args else kwargs["hidden_states"]).clone()
                    h[:, t] = inputs[l][0, t]
                    if args:
                        return (h, *args[1:]), kwargs
                    kwargs["hidden_states"] = h
                    return args, kwargs
                hooks.append((lambda fn, b=blocks[l]: b.register_forward_pre_hook(fn, with_kwargs=True), pre))
            elif kind == "hidden":
                def post(m, a, o, l=l, t=t):
                    _first(o)[:, t] = outputs[l][0, t]
                hooks.append((lambda fn, b=blocks[l]: b.register_forward_hook(fn), post))
            if kind == "hidden" and sever is not None:
                first_severed = l if convention == "input" else l + 1
                for k in range(first_severed, n_layers):
                    def keep(m, a, o, k=k, t=t):
                        _first(o)[:, t] = corrupted_modules[k][:, t]
                    hooks.append((lambda fn, s=subs[k]: s.register_forward_hook(fn), keep))
            if kind != "hidden":
                lo, hi = max(0, l - window // 2), min(n_layers, l - (-window // 2))
                for k in range(lo, hi):
                    sub = blocks[k].get_submodule(adapter.mlp if kind == "mlp" else adapter.attn)
                    def patch(m, a, o, k=k, t=t):
                        _first(o)[:, t] = modules[kind][k][0, t]
                    hooks.append((lambda fn, s=sub: s.register_forward_hook(fn), patch))
            scores[t, l] = score(hooks)
        high = float(torch.softmax(clean_logits, -1)[target_id])
    return scores, low, high, target_id
