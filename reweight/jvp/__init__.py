"""Forward-mode engines behind one interface, and the planner that picks one.

An engine records a training batch's forward and gives the per-example losses (with the real
update's graph) and their Jacobian-vector products ⟨∇θℓᵢ, u⟩, which the exact first-order
meta-gradient identities of ``meta_grad="fast"`` need (``reweight.functional``):

- ``tape``: the forward recorded on a tangent tape, its tangents replayed (``tape``, ``rules``);
- ``dual``: dual numbers through the real model, in its forward (``dual``);
- ``dual_twin``: dual numbers through the model's twin, without graph (``dual``);
- ``per_layer``: per-layer inner products, for models whose examples do not interact
  (``per_layer``).

``Planner`` (``planner``) chooses one per model × device × method, says why, and can be forced;
off CPU it times its two candidates on a model's first steps (``timing``).
"""

from reweight.jvp.base import ENGINES, Recording
from reweight.jvp.planner import POLICIES, Plan, Planner

__all__ = ["ENGINES", "POLICIES", "Plan", "Planner", "Recording"]
