"""Static-shape passes captured once per shape (Engine(compile=...), `--compile`): balspec's own CUDA graph
capture ("cuda-graphs") or torch.compile's ("reduce-overhead"). A pass is a function (hidden [1, rows, hidden],
start: 0-d device tensor) -> hidden whose shapes do not depend on the position (Engine._static_pass).
"""

from __future__ import annotations

from typing import Callable

import torch

from balspec.errors import BalspecError

COMPILE_MODES = ("reduce-overhead", "cuda-graphs")  # --compile: torch.compile's, or balspec's own capture (CUDA)
_COMPILED = [0]  # pass shapes handed to torch.compile in this process (they share one code object: _allow_graphs)

Pass = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_compile(mode: str | None) -> None:
    """--compile: None or one of COMPILE_MODES, else BalspecError."""
    if mode not in (None, *COMPILE_MODES):
        raise BalspecError(f"--compile: choose one of {', '.join(COMPILE_MODES)}; got {mode!r}")


def capture(forward: Pass, mode: str, pool=None) -> Pass:
    """`forward` captured as `mode` says; its output is cloned, since a CUDA graph's next replay overwrites it.
    pool: the CUDA graph memory pool shared by an engine's captured passes (cuda-graphs)."""
    if mode == "cuda-graphs":
        return CapturedPass(forward, pool)
    _COMPILED[0] += 1
    _allow_graphs(_COMPILED[0])
    graph = torch.compile(forward, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def run(hidden: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier outputs are clones already
        return graph(hidden, start).clone()

    return run


class CapturedPass:
    """A static pass captured as a CUDA graph on its first call (--compile cuda-graphs), replayed after: its
    inputs are copied into the graph's own buffers, the output cloned out of the shared pool. The first call
    runs the pass on a side stream (warm-up, as torch.cuda.graph asks) and the replay runs it again: both
    write the same K/V at the same indices, so the cache is as after one run."""

    def __init__(self, forward: Pass, pool):
        self.forward, self.pool, self.graph = forward, pool, None

    def __call__(self, hidden: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self.hidden, self.start = hidden.clone(), start.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(self.hidden, self.start)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.out = self.forward(self.hidden, self.start)
        self.hidden.copy_(hidden)
        self.start.copy_(start)
        self.graph.replay()
        return self.out.clone()


def _allow_graphs(count: int) -> None:
    """Every static pass shares one function's code, so torch.compile counts each new shape (exit, k, width, and
    again after the cache grows) as a recompile of it; its default limit (8) would end compiling mid-bench, and
    under fullgraph with an error. Raise the limits to the number of shapes compiled in this process so far."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < 2 * count:
            setattr(config, name, 2 * count)
