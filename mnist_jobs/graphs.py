"""CUDA graphs: a population's step replayed from one captured graph instead of ~100 kernel launches.

On a GPU these models are launch-bound: a logreg step is about 10 kernels, a CNN step about 80 (forward,
backward, dropout), each 5-15 µs to launch against microseconds of work. `Graphed` wraps any population
(`population.make_population`) whose step can be captured. A population's step is `compute(idx, loss_sum)`
(gather, forward, loss, backward - or logreg's closed form - and, for plain SGD at a constant lr, the
fused update) followed by `update()` (the optimizer's step). `Graphed` runs the first WARMUP steps
eagerly (on a side stream, as torch's docs ask: lazy cuBLAS/cuDNN set-up and the gradients' first
allocation happen there), captures `compute` once on a static index buffer, and from then on each step
is: copy the batch's indices into that buffer, replay, update.

The update stays outside the graph, eager: its per-step scalars (the schedule's lr, Adam's bias
corrections) are Python floats that a graph would freeze at their capture-time values. On CUDA it is
torch.optim's fused kernel (one launch for all tensors; `optim.make_optimizer`) or the packed
optimizers' `_foreach_` calls. For the same reason, under a schedule, plain SGD is not fused into the
captured GEMM (`make_population(fuse_sgd=False)`): the lr would be frozen there.

What is captured (`why_not` says why not, and the result records it under env.cuda_graphs):
  lone logreg and lone CNN runs, and logreg packs, on a CUDA device;
  not: DDP (the backward pass all-reduces), CNN packs (each model's dropout comes from its own RNG
  state, set with torch.cuda.set_rng_state around its draws), other devices, $MNIST_JOBS_CUDA_GRAPHS=0.
  An epoch's last, partial batch (another shape) runs eagerly; so does any step before the capture.
  A capture that fails on the GPU (an op a graph cannot hold) warns once and the run goes on eagerly;
  its record then says so in env.cuda_graphs_note.

The CPU twin (`TwinGraph`, `cuda_graphs="twin"`): records the aten calls of one `compute` under a
TorchDispatchMode - Python scalars by value, tensors by identity, as a CUDA graph keeps them by address
- and replays that list each step. It fails where capture would (a host sync inside the step) and
trains wrong where a graph would (a scalar that changes, a tensor replaced after capture), so the
tests can run every graphed path on a CPU against its eager run (tests/test_graphs.py).

No typer, rich or submitit in here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from .population import not_graphable

WARMUP = 3  # eager steps before the capture
ENV = "MNIST_JOBS_CUDA_GRAPHS"  # 0: never capture


def why_not(configs, dist, device: torch.device, mode: bool | str | None = None) -> str | None:
    """None if the steps of `configs` (one run or a pack) on `dist` will be captured, else the reason
    they run eagerly.

    mode: None - on CUDA where the population allows it, unless $MNIST_JOBS_CUDA_GRAPHS=0; False -
    never; "twin" - the CPU twin (tests), on any device."""
    if mode is False or (mode is None and os.environ.get(ENV, "1").strip().lower() in ("0", "off", "no")):
        return f"turned off ({ENV}=0)" if mode is None else "turned off"
    if mode != "twin" and device.type != "cuda":
        return f"not a CUDA device ({device.type})"
    return not_graphable(list(configs), dist)


class CudaGraph:
    """One torch.cuda.CUDAGraph, and the side stream the warm-up steps run on."""

    executes_on_capture = False

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def warmup(self, fn: Callable[[], None]) -> None:
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(self.side)

    def capture(self, fn: Callable[[], None]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class TwinGraph:
    """The CPU twin of CudaGraph: capture records the aten calls (and runs them: this step is done),
    replay calls them again with the same scalars, on the same input tensors."""

    executes_on_capture = True

    def __init__(self, device: torch.device | None = None):
        self.ops: list[tuple] | None = None

    def warmup(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ops: list[tuple] = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in _HOST_SYNCS:
                    raise RuntimeError(f"{func} syncs with the host: a CUDA graph cannot capture it")
                out = func(*args, **kwargs)
                ops.append((func, args, kwargs, out))
                return out

        with Record():
            fn()
        self.ops = ops

    def replay(self) -> None:
        from torch.utils._pytree import tree_flatten, tree_map

        made: dict[int, torch.Tensor] = {}  # id(a captured intermediate) -> this replay's tensor

        def swap(a):
            return made.get(id(a), a) if isinstance(a, torch.Tensor) else a

        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                new = func(*tree_map(swap, args), **tree_map(swap, kwargs))
                for o, t in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                    if isinstance(o, torch.Tensor):
                        made[id(o)] = t


_HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class Graphed:
    """A population whose steps replay one captured graph (see the module docstring); everything else
    (evaluation, weights, checkpoints, the schedule) is the population's own."""

    def __init__(self, pop, batch_shape: tuple[int, int], backend):
        self.pop, self.n, self.batch_shape, self.backend = pop, pop.n, tuple(batch_shape), backend
        self.optimizer = getattr(pop, "optimizer", None)
        self.eager_steps = 0
        self.replays = 0
        self.fallback: str | None = None  # set when the capture failed on the GPU: eager from then on
        self._idx: torch.Tensor | None = None  # the static batch the graph reads
        self._loss_sum: torch.Tensor | None = None  # ... and the accumulator it adds into
        if hasattr(pop, "graph_mode"):
            pop.graph_mode()

    def step(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        if tuple(idx.shape) != self.batch_shape or self.fallback:  # a partial batch: not the graph's
            self.pop.compute(idx, loss_sum)
        elif self.eager_steps < WARMUP and self._idx is None:
            self.backend.warmup(lambda: self.pop.compute(idx, loss_sum))
            self.eager_steps += 1
        elif self._idx is None:
            self._idx, self._loss_sum = idx.clone(), loss_sum
            try:
                self.backend.capture(lambda: self.pop.compute(self._idx, self._loss_sum))
            except RuntimeError as e:
                if self.backend.executes_on_capture:  # (the twin: half a step has run) a test's error
                    raise
                # a CUDA capture runs nothing: the step is still to do, eagerly, as every later one
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                self.fallback = f"the capture failed, so the run went on eagerly ({first})"
                print(f"warning: CUDA graphs: {self.fallback}", file=sys.stderr, flush=True)
                self.pop.compute(idx, loss_sum)
            else:
                if not self.backend.executes_on_capture:
                    self.backend.replay()
                self.replays += 1
        else:
            if loss_sum is not self._loss_sum:
                raise RuntimeError("the loss accumulator was replaced after the capture")
            self._idx.copy_(idx)
            self.backend.replay()
            self.replays += 1
        self.pop.update()

    def set_lr_scale(self, scale: float) -> None:
        self.pop.set_lr_scale(scale)

    def eval_logits(self, xs: torch.Tensor) -> torch.Tensor:
        return self.pop.eval_logits(xs)

    def weights(self, m: int) -> dict[str, torch.Tensor]:
        return self.pop.weights(m)

    def state_dict(self) -> dict:
        return self.pop.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._idx is not None:
            raise RuntimeError("load a checkpoint before the first step: the graph holds the tensors")
        self.pop.load_state_dict(state)


def wrap(pop, batch_shape: tuple[int, int], device: torch.device, mode: bool | str | None = None) -> Graphed:
    """`pop` (for which `why_not` said None) with its steps captured: on the GPU, or in the CPU twin."""
    return Graphed(pop, batch_shape, TwinGraph(device) if mode == "twin" else CudaGraph(device))
