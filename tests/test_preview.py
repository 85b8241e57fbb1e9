"""The first-order preview (attribution patching) against independent finite differences and
against the exact engine as the noise shrinks; plus its contract (low, identical cells, threads,
no gradients left on the shared model, the ``approximate`` flag)."""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch

import tracing
from tracing.causal import causal_trace
from tracing.preview import preview_trace
from conftest import FAMILIES

EIFFEL = "The Eiffel Tower is located in the city of"
NOISED = [1, 2, 3]
# every family on the hidden kind; the other kinds and conventions spread over the families
FD_CASES = [(family, "hidden", "input", 1) for family in FAMILIES] + [
    ("gpt2", "hidden", "output", 1), ("llama", "mlp", "input", 3), ("gpt_neox", "attn", "input", 2),
    ("gptj", "mlp", "input", 1), ("qwen2", "attn", "input", 3),
]


@pytest.fixture(scope="module")
def tiny64(tiny):
    """tiny(family) as a float64 copy (finite differences and small noise need the precision)."""
    made: dict[str, tracing.LoadedModel] = {}

    def make(family: str) -> tracing.LoadedModel:
        if family not in made:
            lm = tiny(family)
            made[family] = dataclasses.replace(lm, model=copy.deepcopy(lm.model).double(),
                                               dtype=torch.float64, name=f"{lm.name}-f64")
        return made[family]

    return make


def _first(output):
    return output[0] if isinstance(output, tuple) else output


STENCIL = ((2.0, -1.0), (1.0, 8.0), (-1.0, -8.0), (-2.0, 1.0))  # 4-point central difference, / 12


def directional_differences(lm, prompt, noised, cells, kind, convention, window, noise, samples,
                            seed=0, contrast=None, eps=1e-2):
    """Independently of the library: for each (token, layer) cell, the derivative along d = clean -
    corrupted at the cell's state (or at each module output of its window) of each metric (mean
    over samples), by a 4-point central difference (f(h + 2e d) ... f(h - 2e d)); every
    perturbed run is one group of rows of a single hooked whole-model forward."""
    model, adapter = lm.model, lm.adapter
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    embed = model.get_submodule(adapter.token_embedding)
    blocks = model.get_submodule(adapter.blocks)
    n_layers = len(blocks)
    part = adapter.mlp if kind == "mlp" else adapter.attn

    def record(emb):
        """(block inputs, block outputs, module outputs, last logits) of a forward."""
        inputs, outputs, modules = {}, {}, {}
        handles = []
        for l, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, l=l: inputs.__setitem__(l, (args[0] if args else kwargs["hidden_states"]).clone()),
                with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, o, l=l: outputs.__setitem__(l, _first(o).clone())))
            handles.append(block.get_submodule(part).register_forward_hook(
                lambda m, a, o, l=l: modules.__setitem__(l, _first(o).clone())))
        try:
            logits = model(inputs_embeds=emb).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return inputs, outputs, modules, logits

    with torch.no_grad():
        clean_emb = embed(ids)
        unit = torch.randn((samples, len(noised), lm.d_model), generator=torch.Generator().manual_seed(seed))
        corrupt_emb = clean_emb.repeat(samples, 1, 1)
        corrupt_emb[:, noised] += (unit * noise).to(clean_emb.dtype)
        c_in, c_out, c_mod, clean_logits = record(clean_emb)
        k_in, k_out, k_mod, _ = record(corrupt_emb)
        clean_logp = torch.log_softmax(clean_logits[0].double(), -1)
        target = int(clean_logits[0].argmax())

        # groups of `samples` rows: one per (cell, stencil point); edits[(where, layer)] lists
        # (rows, token, delta) to add there
        groups = [(cell, step) for cell in cells for step, _ in STENCIL]
        edits: dict[tuple[str, int], list] = {}
        for g, ((t, l), step) in enumerate(groups):
            rows = slice(g * samples, (g + 1) * samples)
            if kind == "hidden" and convention == "input":
                edits.setdefault(("pre", l), []).append((rows, t, step * eps * (c_in[l][0, t] - k_in[l][:, t])))
            elif kind == "hidden":
                edits.setdefault(("post", l), []).append((rows, t, step * eps * (c_out[l][0, t] - k_out[l][:, t])))
            else:
                for k in range(max(0, l - window // 2), min(n_layers, l - (-window // 2))):
                    edits.setdefault(("module", k), []).append((rows, t, step * eps * (c_mod[k][0, t] - k_mod[k][:, t])))

        def apply(h, where, layer):
            for rows, t, delta in edits.get((where, layer), []):
                h[rows, t] += delta

        def pre(m, args, kwargs, l):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            apply(h, "pre", l)
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        handles = []
        for l, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, k, l=l: pre(m, a, k, l), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, o, l=l: apply(_first(o), "post", l)))
            handles.append(block.get_submodule(part).register_forward_hook(
                lambda m, a, o, l=l: apply(_first(o), "module", l)))
        try:
            # the whole model (its base, with the final norm, then the unembedding) at the last position
            last = model.base_model(inputs_embeds=corrupt_emb.repeat(len(groups), 1, 1)).last_hidden_state[:, -1]
            logits = model.get_output_embeddings()(last)
        finally:
            for h in handles:
                h.remove()
        logits = logits.double().view(len(groups), samples, -1)
        logp = torch.log_softmax(logits, -1)
        values = {"prob": logp[..., target].exp().mean(1), "logprob": logp[..., target].mean(1),
                  "kl": (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean(1)}
        if contrast is not None:
            values["logit_diff"] = (logits[..., target] - logits[..., contrast]).mean(1)
        weights = torch.tensor([w for _, w in STENCIL], dtype=torch.float64)
        out = {}
        for i, cell in enumerate(cells):
            part_values = {k: v[i * len(STENCIL):(i + 1) * len(STENCIL)] for k, v in values.items()}
            out[cell] = {k: float((v * weights).sum() / (12 * eps)) for k, v in part_values.items()}
    return out, target


@pytest.mark.parametrize("family, kind, convention, window", FD_CASES)
def test_preview_is_the_directional_derivative(tiny64, family, kind, convention, window):
    """preview - low equals an independent finite difference along (clean - corrupted), every
    metric, to 1e-3 relative."""
    lm = tiny64(family)
    contrast = int(lm.tokenizer(" London")["input_ids"][0])
    trace = preview_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=3, window=window,
                          convention=convention, contrast=contrast)
    n_tokens = len(trace.tokens)
    cells = [(t, l) for t in range(NOISED[0], n_tokens) for l in range(lm.n_layers)]
    fd, target = directional_differences(lm, EIFFEL, NOISED, cells, kind, convention, window,
                                         noise=0.5, samples=3, contrast=contrast)
    assert trace.target_id == target
    for name in ("prob", "logprob", "kl", "logit_diff"):
        want = np.array([fd[c][name] for c in cells])
        got = np.array([trace.metrics[name][c] - trace.metric_low[name] for c in cells])
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * scale, err_msg=name)


@pytest.mark.parametrize("family, kind, convention", [
    ("gpt2", "hidden", "input"), ("llama", "hidden", "output"), ("gpt_neox", "mlp", "input"),
    ("gpt2", "attn", "input"),
])
def test_preview_converges_to_exact_like_noise_squared(tiny64, family, kind, convention):
    """As the noise shrinks, |preview - exact| falls like noise**2 (log-log slope > 1.5) and stays
    small against the effect itself (exact - low). (mlp / attn with window 1: see
    docs/PREVIEW.md for wider windows.)"""
    lm = tiny64(family)
    levels = [0.005, 0.01, 0.02, 0.04]
    errors, effects = [], []
    for noise in levels:
        kwargs = dict(kind=kind, noise=noise, samples=2, window=1, convention=convention, seed=1)
        exact = causal_trace(lm, EIFFEL, NOISED, **kwargs)
        approx = preview_trace(lm, EIFFEL, NOISED, **kwargs)
        assert approx.low == exact.low and approx.high == exact.high
        errors.append(np.abs(np.log(approx.scores) - np.log(exact.scores)).max())
        effects.append(np.abs(np.log(exact.scores) - np.log(exact.low)).max())
    slope = np.polyfit(np.log(levels), np.log(errors), 1)[0]
    assert slope > 1.5, (slope, errors)
    assert errors[0] < 0.5 * effects[0]


def test_identical_cells_are_exactly_low(tiny):
    lm = tiny("qwen2")
    noised = [3, 5]
    trace = preview_trace(lm, EIFFEL, noised, kind="hidden", noise=0.6, samples=3, contrast=" London")
    for name, cells in trace.metrics.items():
        low = trace.metric_low[name]
        assert np.all(cells[:3] == low), name  # before the first noised token
        assert cells[4, 0] == low and np.all(cells[6:, 0] == low), name  # block-0 input of clean tokens
        assert np.any(cells[3:, 1:] != low), name
    for kind in ("mlp", "attn"):
        other = preview_trace(lm, EIFFEL, noised, kind=kind, samples=2)
        assert np.all(other.scores[:3] == other.low)


def test_same_contract_as_the_exact_trace(tiny):
    lm = tiny("gptj")
    kwargs = dict(kind="mlp", noise=0.3, samples=2, window=2, contrast=" London", target=" Paris")
    exact = causal_trace(lm, EIFFEL, NOISED, **kwargs)
    approx = preview_trace(lm, EIFFEL, NOISED, **kwargs)
    assert approx.metric_low == exact.metric_low and approx.metric_high == exact.metric_high
    assert set(approx.metrics) == set(exact.metrics) == {"prob", "logprob", "kl", "logit_diff"}
    for key in ("tokens", "token_ids", "noised", "kind", "convention", "window", "target_id",
                "target", "settings", "sigma", "noise_std", "clean_top", "corrupted_top"):
        assert getattr(approx, key) == getattr(exact, key), key
    assert approx.scores.shape == exact.scores.shape and np.isfinite(approx.scores).all()
    np.testing.assert_allclose(approx.normalised(), (approx.scores - approx.low) / (approx.high - approx.low))
    settings = tracing.TraceSettings(kind="attn", samples=2, corruption="replace",
                                     replacement="The Colosseum is located in the city of")
    exact = causal_trace(lm, EIFFEL, NOISED, settings=settings)
    approx = preview_trace(lm, EIFFEL, NOISED, settings=settings)
    assert approx.low == exact.low and approx.noise_std == 0.0 and approx.kind == "attn"
    sigma = preview_trace(lm, EIFFEL, NOISED, samples=1, noise=3.0, noise_mode="sigma")
    assert sigma.sigma == causal_trace(lm, EIFFEL, NOISED, samples=1, noise=3.0, noise_mode="sigma").sigma
    with pytest.raises(tracing.TraceCancelled):
        preview_trace(lm, EIFFEL, NOISED, samples=1, progress=lambda done, total: False)
    with pytest.raises(ValueError, match="No tokens to noise"):
        preview_trace(lm, EIFFEL, [], samples=1)


def test_threads_match_serial_and_leave_no_gradients(tiny):
    lm = tiny("llama")
    flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    hooks = {id(m): (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.model.modules()}
    jobs = [(preview_trace, "hidden", 0.3), (causal_trace, "mlp", 0.5), (preview_trace, "attn", 0.7),
            (causal_trace, "hidden", 0.9), (preview_trace, "mlp", 0.45), (preview_trace, "hidden", 0.8)]

    def run(job):
        fn, kind, noise = job
        return fn(lm, EIFFEL, NOISED, kind=kind, noise=noise, samples=2, window=2, contrast=" London").metrics

    serial = [run(job) for job in jobs]
    results: list = [None] * len(jobs)

    def work(i):
        results[i] = run(jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for i in range(4, len(jobs)):
        work(i)  # the main thread as well
    for th in threads:
        th.join()
    for got, want in zip(results, serial):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert all(p.grad is None for p in lm.model.parameters())
    assert {name: p.requires_grad for name, p in lm.model.named_parameters()} == flags
    assert {id(m): (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.model.modules()} == hooks


def test_approximate_flag_survives_records(tiny):
    lm = tiny("gpt2")
    approx = preview_trace(lm, EIFFEL, NOISED, samples=1, contrast=" London")
    exact = causal_trace(lm, EIFFEL, NOISED, samples=1)
    assert approx.approximate is True and exact.approximate is False
    again = tracing.Trace.from_record(*approx.to_record())
    assert again.approximate is True
    np.testing.assert_array_equal(again.metric("logit_diff"), approx.metric("logit_diff"))
    meta, arrays = exact.to_record()
    assert tracing.Trace.from_record(meta, arrays).approximate is False
    meta.pop("approximate")  # a record written before the flag existed
    assert tracing.Trace.from_record(meta, arrays).approximate is False


def test_grad_mode_of_the_caller_is_untouched(tiny):
    lm = tiny("gpt_neox")
    with torch.inference_mode():
        inside = preview_trace(lm, EIFFEL, NOISED, samples=2, noise=0.35)
    with torch.no_grad():
        assert not torch.is_grad_enabled()
        again = preview_trace(lm, EIFFEL, NOISED, samples=2, noise=0.35)
        assert not torch.is_grad_enabled()
    np.testing.assert_array_equal(inside.scores, again.scores)


@pytest.mark.slow
def test_embedded_preview_tracks_the_exact_trace(embedded):
    noised = tracing.subject_positions(embedded, EIFFEL, "Eiffel Tower")
    approx = preview_trace(embedded, EIFFEL, noised, samples=3)
    exact = causal_trace(embedded, EIFFEL, noised, samples=3)
    assert approx.target == exact.target == " Paris" and approx.low == exact.low
    r = np.corrcoef(approx.scores.ravel(), exact.scores.ravel())[0, 1]
    assert r > 0.75
    top = np.unravel_index(approx.scores.argmax(), approx.scores.shape)
    assert top == np.unravel_index(exact.scores.argmax(), exact.scores.shape)
