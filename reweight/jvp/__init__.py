"""Forward-mode engines behind one interface, and the planner that picks one.

An engine records a training batch's forward and gives the per-example losses (with the real
update's graph) and their Jacobian-vector products ⟨∇θℓᵢ, u⟩, which the exact first-order
meta-gradient identities of ``meta_grad="fast"`` need (``reweight.functional``):

- ``tape``: the forward recorded on a tangent tape, its tangents replayed (``tape``, ``rules``);
- ``dual``: dual numbers through the real model, in its forward (``dual``);
- ``dual_twin``: dual numbers through the model's twin, without graph (``dual``);
- ``per_layer``: per-layer inner products, for models whose examples do not interact
  (``per_layer``).

``choose`` (``choice``) picks one from what is known of a model and device and says why (a pure
function); each engine declares what it can run (``base.ENGINE_SPECS``); the ``Planner``
(``planner``) a method owns keeps what it learns of each model, records, and reports; off CPU
it times its two candidates on a model's first steps (``timing``).
"""

from reweight.jvp.base import ENGINE_SPECS, ENGINES, EngineSpec, Recording
from reweight.jvp.choice import POLICIES, Facts, Plan, choose
from reweight.jvp.planner import Planner

__all__ = [
    "ENGINES",
    "ENGINE_SPECS",
    "POLICIES",
    "EngineSpec",
    "Facts",
    "Plan",
    "Planner",
    "Recording",
    "choose",
]
