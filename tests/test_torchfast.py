"""supraopt.torchfast: the SymPy-free broadcast_shapes gives torch's answers; small problems use one thread."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import torch

from supraopt.torchfast import _torch_broadcast_shapes, broadcast_shapes


def outcome(fn, shapes):
    try:
        return fn(*shapes)
    except RuntimeError:
        return "error"


def test_integer_shapes_broadcast_exactly_as_torch_does() -> None:
    rng = random.Random(0)
    for _ in range(500):
        shapes = [tuple(rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(0, 3))]
        shapes += [rng.choice([1, 2])] if rng.random() < 0.2 else []
        shapes = [torch.Size(s) if rng.random() < 0.5 and isinstance(s, tuple) else s for s in shapes]
        assert outcome(broadcast_shapes, shapes) == outcome(_torch_broadcast_shapes, shapes), shapes
    assert broadcast_shapes((2, 1), (3,)) == torch.Size([2, 3])


def test_suggesting_imports_no_sympy_and_a_small_campaign_uses_one_thread(campaign) -> None:
    code = (
        "import sys, torch; from supraopt.campaign import Campaign; from supraopt.torchfast import threads_for\n"
        "n = torch.get_num_threads(); threads_for(301); large = torch.get_num_threads() == n\n"
        f"c = Campaign.open({str(campaign.directory)!r}); threads_for(len(c.ledger.experiments())); c.propose(1)\n"
        "print(large, torch.get_num_threads(), 'sympy' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1", "False"]  # 301 runs keep torch's threads; 0 runs get one
