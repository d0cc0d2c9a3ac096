"""The cost model's inputs: measured seconds of one full decode step, one draft step and one verify pass.

`balspec bench` divides a setting's draft step and verify by the full step (DESIGN.md, cost model) to bound
the speedup it can reach at its acceptance, and reports how close the engine comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from balspec.engine.sampling import Sampling
from balspec.engine.speculative import sync_device


def pass_costs(bm, prompt_ids: list[int], exit_layer: int, draft_len: int, width: int = 1,
               repeats: int = 10) -> dict:
    """Measured seconds of one full decode step, one draft step and one verify of k + width rows (layers 1..e
    on the width rows not yet run, layers e+1..N on all)."""
    engine = bm.engine
    prompt = torch.tensor([prompt_ids], device=engine.device)
    start = len(prompt_ids)
    engine.reset(start + 2 * (draft_len + width))
    with torch.inference_mode():
        engine.prefill(prompt, "speculative", exit_layer)
        token = prompt[:, -1:]

        def full_step():
            engine.step(token, start, "full", None).argmax(-1).tolist()

        def draft_step():
            h = engine.run_layers(engine.embed(token), 0, exit_layer, start)
            engine.pick_draft(engine.draft_logits(engine.run_balcony(exit_layer, h, start, pending=True)), Sampling())

        def verify():
            h = engine.run_layers(engine.embed(token.expand(1, width)), 0, exit_layer, start)
            hidden = h[:, :1].expand(1, draft_len + width, h.shape[-1])  # stands in for the buffered exit states
            engine.full_logits(engine.run_layers(hidden, exit_layer, engine.num_layers, start)).argmax(-1).tolist()

        return median_seconds(engine, {"full_step_s": full_step, "draft_step_s": draft_step, "verify_s": verify},
                              repeats, start)


def median_seconds(engine, calls: dict[str, Callable[[], object]], repeats: int, start: int) -> dict[str, float]:
    """Median seconds of each call over `repeats` rounds, after two untimed rounds; within a round the calls take
    turns, so that a slow spell of the machine touches each alike. Device-synchronised around every call; every
    cache slot is rolled back to `start` after it, so each call runs in the same state."""
    everything = list(range(len(engine.cache.lengths)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats + 2):
        for name, fn in calls.items():
            sync_device(engine.device)
            t0 = time.perf_counter()
            fn()
            sync_device(engine.device)
            times[name].append(time.perf_counter() - t0)
            engine.cache.rollback(everything, start)
    return {name: sorted(t[2:])[len(t[2:]) // 2] for name, t in times.items()}
