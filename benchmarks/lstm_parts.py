"""Where an LSTM's per-layer meta step spends its time, part by part, against the fused kernel.

The floor of an exact meta step (docs/benchmarks.md) runs oneDNN's fused LSTM: a forward and a
backward of the training batch, the meta batch's forward and backward, one more forward. The
per-layer path (``reweight.jvp.recurrent``) keeps the training batch's fused forward but
replaces its fused backward by what the meta step needs of it: the gate gradients δ (the gates
recomputed in bulk, then backpropagation through time in ATen ops), a JVP and a weighted
gradient over the gates. This script times each part alone, interleaved in one process
(``--rounds`` rounds, each part once per round in a rotating order), for the benchmark's LSTM
(MNIST rows: 28 steps of 28 features, hidden 128, batch 100, float32, 1 thread):

    python benchmarks/lstm_parts.py --rounds 30

and prints the medians and what the meta step costs built from them, × the floor built from
the fused parts. Not a test; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from reweight.jvp import per_layer as ghost
from reweight.jvp import recurrent
from reweight.models import build_model


def parts(batch: int, generator: torch.Generator) -> dict[str, Callable[[], object]]:
    """One callable per part, each on the same model and batch."""
    torch.manual_seed(0)
    model = build_model("lstm", 10, 1, (1, 28, 28))
    x = torch.randn(batch, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    weights = [p for p in model.parameters() if p.requires_grad]
    layers = ghost.ghost_layers(model, weights)

    def losses() -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none")

    def fused_forward() -> object:
        return losses()

    held: dict[str, object] = {}

    def fused_backward() -> object:  # the forward made untimed, just before
        return torch.autograd.grad(held.pop("losses").sum(), weights)

    stash: list = []

    def keep(call):  # the LSTM's recorded call, kept to recompute δ from
        stash.append(call)
        return recurrent.lstm_calls(call)

    ghost.lstm_calls = keep  # type: ignore[attr-defined]
    try:
        with ghost.recording(model, layers, len(y)) as watch:
            out = losses()
        rec = ghost.finish(weights, watch, out)
    finally:
        ghost.lstm_calls = recurrent.lstm_calls  # type: ignore[attr-defined]
    gates = next(c for c in rec.calls if c.kind == "gates")
    u = [torch.randn_like(t) for t in gates.tensors]
    seeds = torch.rand(batch, generator=generator)

    def prepare() -> None:
        held["losses"] = losses()

    w_ih, w_hh = gates.tensors[0].detach(), gates.tensors[1].detach()
    bias = (gates.tensors[2] + gates.tensors[3]).detach()
    steps, width = gates.delta.shape[0], gates.delta.shape[-1]

    def gemms() -> object:  # δ's matrix products alone: the gates, then one a step back
        torch.nn.functional.linear(gates.xh, torch.cat([w_ih, w_hh], 1), bias)
        g = torch.zeros(batch, w_hh.shape[1])
        for t in range(steps - 1, 0, -1):
            g = torch.addmm(g, gates.delta[t].view(batch, width), w_hh)
        return g

    return {
        "fused forward": fused_forward,
        "fused backward": (prepare, fused_backward),  # type: ignore[dict-item]
        "gate gradients δ": lambda: recurrent.lstm_calls(stash[0]),
        "  of which matrix products": gemms,
        "JVP over the gates": lambda: gates.inner_of(u),
        "weighted gradient over the gates": lambda: gates.grads_of(seeds),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = parts(args.batch, torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds + 3):  # 3 untimed rounds first
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step = steps[name]
            if isinstance(step, tuple):
                step[0]()
                step = step[1]
            start = time.perf_counter()
            step()
            if r >= 3:
                times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    for name, v in ms.items():
        print(f"{name:45s} {v:7.2f} ms")
    f, b = ms["fused forward"], ms["fused backward"]
    delta = ms["gate gradients δ"]
    jvp, wg = ms["JVP over the gates"], ms["weighted gradient over the gates"]
    print(
        f"\nδ alone: {delta:.2f} ms; per-layer in place of the fused backward: "
        f"δ + JVP + weighted gradient = {delta + jvp + wg:.2f} ms against {b:.2f} ms + one "
        f"more forward {f:.2f} ms in the floor"
    )


if __name__ == "__main__":
    main()
