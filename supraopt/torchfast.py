"""Two start-up costs of torch that a suggestion does not need to pay (imported by :mod:`supraopt.surrogate`).

* ``torch.broadcast_shapes`` (called by every GPyTorch kernel's ``batch_shape``) imports
  ``torch.fx.experimental.symbolic_shapes`` and with it SymPy on first use: about a third of a
  second of a ``supraopt suggest`` process, for broadcasting tuples of small integers.
  :func:`broadcast_shapes` does plain integer shapes in Python and hands anything else (symbolic
  sizes, tracing, incompatible shapes for torch's own error) to torch's function.
* torch starts as many threads as cores; the GPs here are small (tens to hundreds of runs), so the
  threads mostly wait for each other, and on a busy machine (several processes, two cores) a
  suggestion took 5-10x longer with them. :func:`threads_for` picks one thread for small problems
  unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_torch_broadcast_shapes = torch.broadcast_shapes

SMALL_PROBLEM_RUNS = 300
"""Up to this many runs in the ledger a suggestion runs on one thread."""


def broadcast_shapes(*shapes: Any) -> torch.Size:
    """``torch.broadcast_shapes`` for integer shapes without importing SymPy; the same result."""
    dims: list[tuple[int, ...]] = []
    for shape in shapes:
        if shape is None:
            continue
        if type(shape) is int:
            shape = (shape,)
        if not isinstance(shape, tuple | list) or not all(type(d) is int and d >= 0 for d in shape):
            return _torch_broadcast_shapes(*shapes)
        dims.append(tuple(shape))
    if torch.jit.is_tracing():
        return _torch_broadcast_shapes(*shapes)
    out = []
    for i in range(1, max((len(s) for s in dims), default=0) + 1):
        sizes = {s[-i] for s in dims if len(s) >= i}
        if len(sizes - {1}) > 1:
            return _torch_broadcast_shapes(*shapes)  # incompatible: torch raises its own error
        out.append(max(sizes - {1}, default=min(sizes)))
    return torch.Size(reversed(out))


def install() -> None:
    """Use :func:`broadcast_shapes` for ``torch.broadcast_shapes`` (idempotent)."""
    torch.broadcast_shapes = broadcast_shapes


def threads_for(runs: int) -> None:
    """One torch thread for a ledger of up to :data:`SMALL_PROBLEM_RUNS` runs, unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" not in os.environ and runs <= SMALL_PROBLEM_RUNS:
        torch.set_num_threads(1)
