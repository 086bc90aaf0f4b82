"""Suggest -> run -> record, from Python: what a chemist does by hand with `supraopt suggest/record`.

Here the "lab" is supraopt's simulated twin, so the script runs anywhere:

    python examples/suggest_and_record.py [CAMPAIGN_DIR]

Replace ``world.sample(...)`` by your own measurement (SEM sizing of ~100 particles) and this is
the whole workflow. The same steps on the command line:

    supraopt init my-campaign --model cspbbr3-flow-focusing --target-nm 450
    supraopt suggest my-campaign
    supraopt record my-campaign E001 --diameter-nm 431 --pdi 5.2 --n-particles 120
    supraopt record my-campaign E002 --failed "hollow particles"
    supraopt status my-campaign
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from supraopt.campaign import Campaign
from supraopt.records import Measurement
from supraopt.rigs.simulated import World


def main(directory: Path) -> bool:
    campaign = Campaign.create(
        directory, model="cspbbr3-flow-focusing", target_nm=450.0, tolerance=0.03, pdi_max_pct=6.0
    )
    world = World.random(seed=7)  # a lab whose hidden physics differs from supraopt's prior
    rng = np.random.default_rng(0)
    with campaign:
        for _ in range(10):
            [suggestion] = campaign.suggest()
            p = suggestion.prediction
            print(f"{suggestion.experiment_id}: run {suggestion.settings}")
            print(f"      expected {p['diameter_nm']:.0f} ± {p['diameter_sd_nm']:.0f} nm, P(hit) = {p['p_hit']:.2f}")
            result = world.sample(suggestion.settings, rng)  # <- your experiment goes here
            campaign.record(suggestion.experiment_id, result)
            if not isinstance(result, Measurement):
                print(f"      failed: {result.reason}")
                continue
            print(
                f"      measured {result.diameter_nm:.0f} nm, PDI {result.pdi_pct:.1f} % ({result.n_particles} particles)"
            )
            if campaign.spec.target.is_hit(result.diameter_nm, result.pdi_pct):
                print(f"Target hit after {len(campaign.ledger.experiments())} experiments.")
                return True
        print("No hit within 10 experiments; see 'supraopt status'.")
        return False


if __name__ == "__main__":
    if len(sys.argv) > 1:
        hit = main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            hit = main(Path(tmp) / "example-campaign")
    sys.exit(0 if hit else 1)
