"""Sweep specs, the ``aoe ablate`` runner and the ``aoe report`` aggregation.

The runner starts each step (``aoe fit``, ``aoe export``, ``aoe eval``) as a subprocess, so importing this
package does not import Lightning or lm-eval.
"""

from aoe_lightning.ablation.spec import Point, SpecError, Sweep, load_sweep

__all__ = ["Point", "SpecError", "Sweep", "load_sweep"]
