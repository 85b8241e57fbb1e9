"""Concurrency: one shared model, several threads at once (as several browser sessions do).

Every engine call made from 4 threads at once returns exactly (bit for bit) what it returns when
run alone; afterwards the shared model carries no hooks, no changed settings and unchanged
weights, also after a trace that was cancelled or that failed midway.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

import tracing
from tracing import attention as A
from tracing import causal, hidden
from tracing.causal import TraceCancelled, causal_trace
from tracing.model.runner import Runner

EIFFEL = "The Eiffel Tower is located in the city of"
OTHER = "The capital city of Wales is called"
NOISED = [1, 2, 3]
N_THREADS = 4


# ---------------------------------------------------------------------------------------------
# Jobs: each returns named arrays, so results can be compared exactly


def _trace_numbers(trace) -> dict[str, np.ndarray]:
    out = {f"metric.{k}": np.asarray(v) for k, v in trace.metrics.items()}
    out["low"] = np.array([trace.metric_low[k] for k in sorted(trace.metric_low)])
    out["high"] = np.array([trace.metric_high[k] for k in sorted(trace.metric_high)])
    out["target_id"] = np.array([trace.target_id])
    return out


def trace_job(prompt: str, noised: list[int], **kwargs) -> Callable[[Any], dict[str, np.ndarray]]:
    return lambda lm: _trace_numbers(causal_trace(lm, prompt, noised, **kwargs))


def attention_job(prompt: str, positions: list[int], layer: int) -> Callable:
    def run(lm) -> dict[str, np.ndarray]:
        return {"attention_to": A.attention_to(lm, prompt, positions),
                "pattern": A.attention_pattern(lm, prompt, layer)}
    return run


def hidden_job(prompt: str, target: str | None) -> Callable:
    def run(lm) -> dict[str, np.ndarray]:
        lens = hidden.logit_lens(lm, prompt, k=3, target=target)
        return {"states": hidden.final_token_states(lm, prompt), "lens.target_probs": lens.target_probs,
                "lens.top_ids": lens.top_ids, "lens.top_probs": lens.top_probs}
    return run


def top1_job(prompts_and_answers: list[tuple[str, str]]) -> Callable:
    """The model's own forward (prompts.model_top1 calls ``lm.model(ids)``), next to the runner."""
    def run(lm) -> dict[str, np.ndarray]:
        from tracing.prompts import model_top1

        frame = pd.DataFrame(prompts_and_answers, columns=["prompt", "expected"])
        table = model_top1(lm, frame)
        return {"top1_prob": table["top1_prob"].to_numpy(), "expected_prob": table["expected_prob"].to_numpy()}
    return run


TINY_JOBS: dict[str, Callable] = {
    "trace hidden 0.3": trace_job(EIFFEL, NOISED, kind="hidden", noise=0.3, samples=2),
    "trace mlp 0.5": trace_job(EIFFEL, NOISED, kind="mlp", noise=0.5, samples=2, window=2, contrast=" London"),
    "trace attn uniform 0.7": trace_job(EIFFEL, NOISED, kind="attn", noise=0.7, samples=2, window=2,
                                        corruption="uniform", seed=4),
    "trace hidden output 0.9": trace_job(OTHER, [4], kind="hidden", noise=0.9, samples=2, convention="output"),
    "attention": attention_job(EIFFEL, [0, 3, -1], layer=1),
    "hidden states + lens": hidden_job(OTHER, " Cardiff"),
    "model forward (top-1)": top1_job([(EIFFEL, " Paris"), (OTHER, " Cardiff")]),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def clear_engine_caches() -> None:
    """Forget cached clean / corrupted runs, so threads really compute them at the same time."""
    for cache in (causal._clean_cache, causal._corrupted_cache):
        with cache.lock:
            cache.items.clear()


def model_fingerprint(lm) -> dict[str, Any]:
    """Everything a call must not change on the shared model."""
    model = lm.model
    digest = hashlib.sha256()
    for name, param in model.state_dict(keep_vars=False).items():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "attn_implementation": model.config._attn_implementation,
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "weights": digest.hexdigest(),
    }


HOOK_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def hooks_of(lm) -> dict[str, tuple]:
    """Every hook on the model's modules (and torch's global module hooks), by place.

    Transformers itself installs permanent, inert output-capturing hooks the first time a model's
    own forward is asked for attentions or hidden states (another test may have done that on
    this shared model), so the tests compare with the hooks there were before, not with none.
    """
    from torch.nn.modules import module as torch_module

    found: dict[str, tuple] = {}
    for name, module in lm.model.named_modules():
        for kind in HOOK_KINDS:
            hooks = getattr(module, kind, None)
            if hooks:
                found[f"{name or '<model>'}.{kind}"] = tuple(
                    (key, getattr(value, "__qualname__", repr(value))) for key, value in hooks.items())
    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        hooks = getattr(torch_module, kind, None)
        if hooks:
            found[f"torch.{kind}"] = tuple(hooks)
    return found


def added_hooks(lm, before: dict[str, tuple]) -> dict[str, tuple]:
    """Hooks that are on the model now but were not in ``before`` (and ones that went missing)."""
    now = hooks_of(lm)
    return {place: hooks for place, hooks in now.items() if before.get(place) != hooks} | {
        place: ("missing",) for place in before if place not in now}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], label: str) -> None:
    assert got.keys() == want.keys(), label
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{label}: {key}")


def run_threads(work: list[Callable[[], None]]) -> None:
    """Start every callable in its own thread at the same moment; re-raise the first error."""
    barrier = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=60)
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def serial_results(lm, jobs: dict[str, Callable]) -> dict[str, dict[str, np.ndarray]]:
    clear_engine_caches()
    return {name: job(lm) for name, job in jobs.items()}


# ---------------------------------------------------------------------------------------------
# Tiny models


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_four_threads_mixed_calls_equal_serial(tiny, family):
    lm = tiny(family)
    before, hooks = model_fingerprint(lm), hooks_of(lm)
    serial = serial_results(lm, TINY_JOBS)
    # the jobs give different numbers, so a mix-up between threads would be seen
    assert not np.array_equal(serial["trace hidden 0.3"]["metric.prob"],
                              serial["trace mlp 0.5"]["metric.prob"])
    assert not np.array_equal(serial["trace hidden 0.3"]["low"], serial["trace attn uniform 0.7"]["low"])

    names = list(TINY_JOBS)
    results: list[list[tuple[str, dict]]] = [[] for _ in range(N_THREADS)]

    def worker(i: int) -> Callable[[], None]:
        order = names[i:] + names[:i]  # every thread runs every job, in a different order

        def run() -> None:
            for _ in range(2):
                for name in order:
                    results[i].append((name, TINY_JOBS[name](lm)))
        return run

    clear_engine_caches()  # clean and corrupted runs are computed concurrently too
    run_threads([worker(i) for i in range(N_THREADS)])
    for i, done in enumerate(results):
        assert len(done) == 2 * len(names)
        for name, got in done:
            assert_same(got, serial[name], f"thread {i}, {name}")
    assert added_hooks(lm, hooks) == {}
    assert model_fingerprint(lm) == before


def test_a_thread_cancelling_midway_does_not_disturb_the_others(tiny):
    lm = tiny("qwen2")
    hooks = hooks_of(lm)
    jobs = {k: TINY_JOBS[k] for k in ("trace hidden 0.3", "trace mlp 0.5", "attention")}
    serial = serial_results(lm, jobs)
    seen: list[tuple[int, int]] = []

    def cancelling() -> None:
        def progress(done: int, total: int) -> bool:
            seen.append((done, total))
            return done < 2  # stop after two restoration chunks
        for _ in range(3):
            with pytest.raises(TraceCancelled):
                causal_trace(lm, OTHER, [4], kind="attn", noise=0.6, samples=2, window=2,
                             progress=progress, token_rows_per_batch=1)

    results: dict[str, dict] = {}

    def good(name: str) -> Callable[[], None]:
        return lambda: results.__setitem__(name, jobs[name](lm))

    clear_engine_caches()
    run_threads([cancelling] + [good(name) for name in jobs])
    assert any(0 < done < total for done, total in seen), "the trace was not cancelled midway"
    for name in jobs:
        assert_same(results[name], serial[name], name)
    assert added_hooks(lm, hooks) == {}


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_cancelled_trace_leaves_no_hooks_and_same_numbers_after(tiny, kind):
    lm = tiny("gpt_neox")
    before, hooks = model_fingerprint(lm), hooks_of(lm)
    clear_engine_caches()
    want = _trace_numbers(causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=2, window=2))
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> bool:
        calls.append((done, total))
        return len(calls) < 3

    clear_engine_caches()
    with pytest.raises(TraceCancelled):
        causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=2, window=2,
                     progress=progress, token_rows_per_batch=1)
    done, total = calls[-1]
    assert 0 < done < total, calls
    assert added_hooks(lm, hooks) == {}
    got = _trace_numbers(causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=2, window=2))
    assert_same(got, want, f"{kind} after a cancelled trace")
    assert model_fingerprint(lm) == before


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["clean run", "restoring"])
@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_trace_failing_midway_with_hooks_in_place_leaves_none(tiny, monkeypatch, kind, where):
    """A block raises while the trace's temporary hooks are registered: they are removed, and
    the model gives the same numbers afterwards."""
    lm = tiny("llama")
    before, hooks = model_fingerprint(lm), hooks_of(lm)
    clear_engine_caches()
    want = _trace_numbers(causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=2, window=2))
    if where == "clean run":
        clear_engine_caches()  # the next call recomputes the clean run (which hooks MLP/attention)
    hooked_calls = {"n": 0, "raised_with_hooks": None}
    original = Runner.run_block

    def failing(self, layer, hidden_state, context, cache=None):
        if added_hooks(lm, hooks):  # the trace's temporary hooks are in place
            hooked_calls["n"] += 1
            if hooked_calls["n"] == 2:
                hooked_calls["raised_with_hooks"] = added_hooks(lm, hooks)
                raise Boom(f"block {layer} failed")
        return original(self, layer, hidden_state, context, cache)

    monkeypatch.setattr(Runner, "run_block", failing)
    with pytest.raises(Boom):
        causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=2, window=2)
    monkeypatch.setattr(Runner, "run_block", original)
    assert hooked_calls["raised_with_hooks"], "the failure did not happen while hooks were in place"
    assert added_hooks(lm, hooks) == {}
    got = _trace_numbers(causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=2, window=2))
    assert_same(got, want, f"{kind} after a failure in the {where}")
    assert model_fingerprint(lm) == before


def test_progress_callback_raising_and_bad_target_leave_no_hooks(tiny):
    lm = tiny("gpt2")
    hooks = hooks_of(lm)
    want = _trace_numbers(causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=2, window=2))

    def progress(done: int, total: int) -> None:
        if done > 0:
            raise KeyError("the page went away")

    with pytest.raises(KeyError):
        causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=2, window=2, progress=progress)
    assert added_hooks(lm, hooks) == {}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=2, window=2, target=10**9)
    with pytest.raises(ValueError, match="empty|tokenizes to nothing"):
        causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=2, window=2, target="")
    assert added_hooks(lm, hooks) == {}
    got = _trace_numbers(causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=2, window=2))
    assert_same(got, want, "after failures")


def test_recorded_attention_in_one_thread_does_not_switch_others(tiny):
    """While one thread records attention (eager weights), another thread's plain forward runs
    the default implementation and gets its usual numbers."""
    lm = tiny("llama")
    hooks = hooks_of(lm)
    want_states = hidden.final_token_states(lm, EIFFEL)
    want_attention = A.attention_to(lm, OTHER, [0, -1])
    got: dict[str, list] = {"states": [], "attention": []}

    def states() -> None:
        for _ in range(20):
            got["states"].append(hidden.final_token_states(lm, EIFFEL))

    def attention() -> None:
        for _ in range(20):
            got["attention"].append(A.attention_to(lm, OTHER, [0, -1]))

    run_threads([states, attention, states, attention])
    for value in got["states"]:
        np.testing.assert_array_equal(value, want_states)
    for value in got["attention"]:
        np.testing.assert_array_equal(value, want_attention)
    assert added_hooks(lm, hooks) == {}
    assert lm.model.config._attn_implementation == tracing.model.runner.ATTENTION_IMPLEMENTATION


# ---------------------------------------------------------------------------------------------
# The embedded model, small settings


@pytest.mark.slow
def test_four_threads_on_the_embedded_model_equal_serial(embedded):
    prompt = "The Eiffel Tower is in"
    noised = tracing.subject_positions(embedded, prompt, "Eiffel Tower", which="last")
    jobs = {
        "trace hidden": trace_job(prompt, noised, kind="hidden", noise=0.4, samples=2),
        "trace mlp": trace_job(prompt, noised, kind="mlp", noise=0.6, samples=2, window=10, seed=1),
        "attention": attention_job(prompt, [0, *noised, -1], layer=12),
        "hidden states + lens": hidden_job("The capital city of Wales is called", " Cardiff"),
    }
    before, hooks = model_fingerprint(embedded), hooks_of(embedded)
    serial = serial_results(embedded, jobs)
    assert not np.array_equal(serial["trace hidden"]["metric.prob"], serial["trace mlp"]["metric.prob"])
    results: dict[str, dict] = {}

    def work(name: str) -> Callable[[], None]:
        return lambda: results.__setitem__(name, jobs[name](embedded))

    clear_engine_caches()
    run_threads([work(name) for name in jobs])
    for name in jobs:
        assert_same(results[name], serial[name], name)
    assert added_hooks(embedded, hooks) == {}
    assert model_fingerprint(embedded) == before
    assert torch.is_inference_mode_enabled() is False
