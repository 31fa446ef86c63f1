"""A/B of two changes of the twelfth session (issue 28), in one process, interleaved: the
per-layer linear JVP (U on the narrower side, the bias through g summed over positions) and
the twin's cached binding, against the functions they replaced, re-created here.

    python benchmarks/ab_linear_jvp.py --model bert --rounds 30

Each variant is the benchmark's full training step (``meta_step.py``) on its own model copy;
before each step the old or the new functions are put in place. Prints each variant's median
and × floor, and per method the median over rounds of new/old.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import meta_step as ms

import reweight.jvp.layers as layers
from reweight.meta.modules import to_meta
from reweight.meta.twins import TwinCache, signature

NEW = {
    "inner": layers.LayerCall.inner,
    "weighted_grads": layers.LayerCall.weighted_grads,
    "bound": TwinCache.bound,
}


def old_inner(self, u_w, u_b):
    """The linear JVP before: U x + u_b by one fused op, then the product with g summed."""
    if self.kind != "linear" or self.per_example is not None or self.transposed:
        return NEW["inner"](self, u_w, u_b)
    if u_w is not None:
        t = torch.nn.functional.linear(self.x, u_w.to(self.g.dtype), u_b)
    else:
        t = u_b.expand(*self.x.shape[:-1], -1)
    return (t * self.g).flatten(1).sum(1)


def old_weighted_grads(self, seeds):
    """The bias's weighted gradient before: g summed over positions on every call."""
    if self.kind != "linear" or self.per_example is not None or self.bias is None:
        return NEW["weighted_grads"](self, seeds)
    bias, self.bias = self.bias, None
    try:
        gw, _ = NEW["weighted_grads"](self, seeds)
    finally:
        self.bias = bias
    b = self.g.shape[0]
    return gw, seeds.to(self.g.dtype) @ self.g.reshape(b, -1, self.g.shape[-1]).sum(1)


def old_bound(self, model):
    """The twin bound before: names resolved on every bind."""
    sig = signature(model)
    entry = self._twins.get(model)
    if entry is None or entry[0] != sig:
        twin = to_meta(model)
        entry = (sig, twin, twin.binding(model))
        self._twins[model] = entry
    entry[1].bind(model)
    return entry[1]


def use(new: bool) -> None:
    layers.LayerCall.inner = NEW["inner"] if new else old_inner
    layers.LayerCall.weighted_grads = NEW["weighted_grads"] if new else old_weighted_grads
    TwinCache.bound = NEW["bound"] if new else old_bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert", choices=sorted(ms.CASES))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = ms.CASES[args.model][0]
    data = ms.batches(case)
    names = ["plain", "floor", "l2rw/fast", "mwnet/fast"]
    steps = {}
    for tag, new in (("old", False), ("new", True)):
        use(new)
        built, *_ = ms.build_variants(case, torch.device("cpu"), False, data, False, names)
        for name, step in built.items():
            if name in ("plain", "floor"):
                if new:
                    steps[name] = step
                continue
            steps[f"{name}:{tag}"] = lambda step=step, new=new: (use(new), step())
    times = ms.time_interleaved(steps, torch.device("cpu"), 3, args.rounds)
    floor = statistics.median(times["floor"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{args.model} {name:18s} {m * 1e3:8.1f} ms  × floor {m / floor:5.3f}")
    for name in ("l2rw/fast", "mwnet/fast"):
        ratios = [a / b for a, b in zip(times[f"{name}:new"], times[f"{name}:old"], strict=True)]
        print(f"{name}: new/old, median over rounds {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
