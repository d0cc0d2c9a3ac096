"""The cost model's inputs: measured seconds of one full decode step, one draft step and one verify pass.

`balspec bench` divides a setting's draft step and verify by the full step (DESIGN.md, cost model) to bound
the speedup it can reach at its acceptance, and reports how close the engine comes.
"""

from __future__ import annotations

import time

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
        everything = list(range(len(engine.cache.lengths)))

        def full_step():
            engine.step(token, start, "full", None).argmax(-1).tolist()

        def draft_step():
            h = engine.run_layers(engine.embed(token), 0, exit_layer, start)
            engine.pick_draft(engine.draft_logits(engine.run_balcony(exit_layer, h, start, pending=True)), Sampling())

        def verify():
            h = engine.run_layers(engine.embed(token.expand(1, width)), 0, exit_layer, start)
            hidden = h[:, :1].expand(1, draft_len + width, h.shape[-1])  # stands in for the buffered exit states
            engine.full_logits(engine.run_layers(hidden, exit_layer, engine.num_layers, start)).argmax(-1).tolist()

        costs = {}
        for name, fn in (("full_step_s", full_step), ("draft_step_s", draft_step), ("verify_s", verify)):
            times = []
            for i in range(repeats + 2):
                sync_device(engine.device)
                t0 = time.perf_counter()
                fn()
                sync_device(engine.device)
                times.append(time.perf_counter() - t0)
                engine.cache.rollback(everything, start)
            costs[name] = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up calls
    return costs
