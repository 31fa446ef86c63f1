"""Milliseconds and peak memory of one training step: plain SGD, ERM, L2RW and MW-Net.

Why one file of ~520 lines: a benchmark is run by hand as one script, variants and report
together.

Every variant is a callable doing one *full* training step on its own copy of the model (the
method's step, the real weighted backward, the optimizer step), on fixed pre-generated random
batches. All variants live in one process and are run interleaved, one step each per round
(the order rotates every round), so a slow patch of a shared machine hits them alike; the
median over the timed rounds is reported with its ratio to the plain step.

    plain            forward, mean loss, backward, SGD step: the unit every ratio divides by
    floor            the least an exact meta step can cost (issue 28): the plain step, the
                     meta batch's forward and backward, and one more forward of the training
                     batch (without graph); fast rows are also given × floor: the ratio
                     of the medians, and paired (the median over rounds of the step over the
                     floor of the same round, which a machine slowing down for minutes moves
                     far less)
    erm              the Trainer's path with ERM (method.step, then Σ wᵢℓᵢ as the loss)
    l2rw/unrolled    virtual step through the meta twin with a double backward (the reference)
    l2rw/fast        the exact forward-mode identity, by the engine the planner picks
                     (reweight.jvp.planner; with --policy cuda, what it picks on a GPU)
    l2rw/fast-E      l2rw/fast with the engine forced to E (method.engine=E): tape, dual,
                     dual_twin, per_layer; no row where E cannot run the model
    mwnet/unrolled   likewise for Meta-Weight-Net
    mwnet/fast, mwnet/fast-E   likewise (E: tape, dual_twin, per_layer)
    mwnet/fast-chunksK  mwnet/fast with method.meta_chunks=K (less memory; models without BatchNorm)
    l2rw/fast-head, mwnet/fast-head   the virtual step over the last layer only (meta_params=head)
    mwnet/fast-every10  the meta step on every 10th batch (meta_every=10): its row is the *mean*
                     over the timed steps (the amortised cost), not the median
    cmwnet/fast      CMW-Net (the class-aware weighting net), as mwnet/fast
    l2rw/higher      peer: the usual `higher.innerloop_ctx` L2RW step (when higher imports)

Each fast row also says which engine computed its JVPs (the planner's ``last_engine``).

Peak memory is the highest amount of tensor memory the step holds above what was live when it
started (model, optimizer state and batches excluded): on CUDA from the caching allocator's
counters, on CPU from the allocation events of ``torch.profiler`` (``profile_memory=True``),
one profiled step per variant after the timing.

Usage:
    python benchmarks/meta_step.py                       # CPU at 1 thread and all cores (+ CUDA)
    python benchmarks/meta_step.py --threads 1 --steps 30 --json out.json
    python benchmarks/meta_step.py --models lenet --device cpu
    python benchmarks/meta_step.py --threads 1 --models resnet32 --policy cuda --variants \
        l2rw/fast,mwnet/fast,l2rw/unrolled        # on CPU, the engines a GPU would run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reweight import ERM, L2RW, CMWNet, MWNet, normalize_l2rw
from reweight.core.malloc import MALLOC_CHOICES, tune_malloc
from reweight.methods import Method, StepInputs
from reweight.models import build_model

log = logging.getLogger("meta_step")

VARIANTS = (
    "plain",
    "floor",
    "erm",
    "l2rw/unrolled",
    "l2rw/fast",
    "l2rw/fast-tape",
    "l2rw/fast-dual",
    "l2rw/fast-dual_twin",
    "l2rw/fast-per_layer",
    "mwnet/unrolled",
    "mwnet/fast",
    "mwnet/fast-tape",
    "mwnet/fast-dual_twin",
    "mwnet/fast-per_layer",
    "mwnet/fast-chunks1",
    "mwnet/fast-chunks2",
    "mwnet/fast-chunks4",
    "l2rw/fast-head",
    "mwnet/fast-head",
    "mwnet/fast-every10",
    "cmwnet/fast",
    "l2rw/higher",
)
ENGINE_VARIANTS = ("tape", "dual", "dual_twin", "per_layer")


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    meta_batch: int
    shape: tuple[int, ...]
    num_classes: int


CASES = {
    "lenet": [
        Case("lenet", 100, 100, (1, 28, 28), 2),
        Case("lenet", 100, 10, (1, 28, 28), 2),
    ],
    "resnet32": [Case("resnet32", 100, 100, (3, 32, 32), 10)],
    # the same network where per-op host work dominates the step (batch 2, 8×8 images), as
    # for a small model on a GPU: the cuda policy's candidates compared where the tape's
    # Python work per op shows
    "resnet32_tiny": [Case("resnet32", 2, 2, (3, 8, 8), 10)],
    # the sequence-model demos' networks (model=lstm, model=vit_tiny) on MNIST-sized images
    "lstm": [Case("lstm", 100, 100, (1, 28, 28), 10)],
    "vit_tiny": [Case("vit_tiny", 100, 100, (1, 28, 28), 10)],
    # a tiny BERT (HuggingFace, random weights; width 64 like vit_tiny, 2 layers, 4 heads) on
    # token sequences of 32, padded from 16-32 tokens
    "bert": [Case("bert", 100, 100, (32,), 2)],
    # the same with HuggingFace's default dropout (0.1 on hidden states and attention weights)
    "bert_dropout": [Case("bert_dropout", 100, 100, (32,), 2)],
    # the tiny BERT where per-op host work dominates (batch 2), as for a small model on a GPU
    "bert_tiny": [Case("bert", 2, 2, (32,), 2)],
    # torch's own nn.TransformerEncoder, sequence first (its default), BERT's sizes, on the same
    # token ids (no padding mask)
    "encoder": [Case("encoder", 100, 100, (32,), 2)],
    # the same with the padding as src_key_padding_mask: torch's own attention code, read under
    # the watch (the tangent tape before)
    "encoder_masked": [Case("encoder_masked", 100, 100, (32,), 2)],
    # torchvision's ResNet-18 (11 M weights) at batch 8 on 16-pixel crops, as the real-noise
    # recipes' replica runs: a step bound by per-weight work, not by the batch
    "resnet18_small": [Case("resnet18", 8, 8, (3, 16, 16), 10)],
}


# ---------------------------------------------------------------------------------------------
# One training step per variant


def _trainer_step(
    method: Method,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: tuple[Tensor, ...],
    autocast: Callable[[], contextlib.AbstractContextManager],
    counter: Iterator[int] | None = None,
) -> None:
    """Steps 2–3 of ``Trainer.fit``: the method's weights, then the real update on Σ wᵢℓᵢ
    (``counter``: the step count a method reads, e.g. for meta_every)."""
    x, y, mx, my = data
    model.train()
    lr = float(opt.param_groups[0]["lr"])
    step = next(counter) if counter is not None else 0
    batch = StepInputs(model, x, y, mx, my, lr, F.cross_entropy, opt, step)
    with autocast():
        out = method.step(batch)
        losses = out.losses
        if losses is None:
            losses = F.cross_entropy(model(x), y, reduction="none")
    loss = (out.weights.to(losses.dtype) * losses).sum()
    float(loss.detach())  # the Trainer's one sync per step
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _plain_step(model, opt, data, autocast) -> None:
    x, y, _, _ = data
    model.train()
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = F.cross_entropy(model(x), y)
    float(loss.detach())
    loss.backward()
    opt.step()


def _floor_step(model, opt, data, autocast) -> None:
    """The floor of an exact meta step: one forward of the training batch (no graph), the meta
    batch's forward and backward (its weight gradients), then the plain step."""
    x, _, mx, my = data
    model.train()
    weights = [p for p in model.parameters() if p.requires_grad]
    with autocast():
        with torch.no_grad():
            model(x)
        meta = F.cross_entropy(model(mx), my)
    torch.autograd.grad(meta, weights)
    _plain_step(model, opt, data, autocast)


def tiny_bert(num_classes: int, length: int, dropout: float = 0.0) -> nn.Module:
    """The benchmark's tiny BERT: random weights, nothing downloaded."""
    from transformers import BertConfig, BertForSequenceClassification

    from reweight.models.hf import SequenceClassifier

    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=length,
        num_labels=num_classes,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return SequenceClassifier(BertForSequenceClassification(config))


class SeqFirstEncoder(nn.Module):
    """Token ids (B, T) through an ``nn.TransformerEncoder`` with ``batch_first=False``:
    embeddings plus learned positions, 2 layers of width 64, 4 heads, a final norm; the class
    from the mean token. Dropout 0, like the ``bert`` case. ``masked``: the padding (id 0) is
    the encoder's ``src_key_padding_mask``."""

    def __init__(self, num_classes: int, length: int, masked: bool = False) -> None:
        super().__init__()
        self.masked = masked
        self.embed = nn.Embedding(1000, 64, padding_idx=0)
        self.position = nn.Embedding(length, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, nn.LayerNorm(64), enable_nested_tensor=False)
        self.head = nn.Linear(64, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device)[None])
        pad = ids == 0 if self.masked else None
        return self.head(self.encoder(h.transpose(0, 1), src_key_padding_mask=pad).mean(0))


def tokens(n: int, length: int, gen: torch.Generator) -> dict[str, Tensor]:
    """A padded batch of token ids (n, length): 16 to ``length`` real tokens each."""
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    real = torch.randint(16, length + 1, (n, 1), generator=gen)
    mask = (torch.arange(length) < real).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _higher_step(higher, model, opt, data, autocast) -> None:
    """L2RW as usually written with ``higher``: a functional copy per step, a differentiable
    inner SGD step on Σ εᵢℓᵢ, the meta loss, ∂/∂ε; then a separate real forward and backward."""
    x, y, mx, my = data
    model.train()
    lr = float(opt.param_groups[0]["lr"])
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    with autocast():
        with higher.innerloop_ctx(model, inner) as (fmodel, diffopt):
            losses = F.cross_entropy(fmodel(x), y, reduction="none")
            eps = torch.zeros_like(losses, requires_grad=True)
            diffopt.step((eps * losses).sum())
            meta_loss = F.cross_entropy(fmodel(mx), my)
            (grad,) = torch.autograd.grad(meta_loss, eps)
        w = normalize_l2rw(grad)
        losses = F.cross_entropy(model(x), y, reduction="none")
    loss = (w.to(losses.dtype) * losses).sum()
    float(loss.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def make_method(name: str, policy: str = "auto") -> Method:
    """The method of a variant: ``l2rw/fast-tape`` is ``L2RW(meta_grad="fast", engine="tape")``.

    ``policy`` is the planner's device policy for the fast rows that leave the engine to it.
    """
    if name == "erm":
        return ERM()
    method, _, mode = name.partition("/")
    mode, _, option = mode.partition("-")
    kwargs: dict = {"meta_grad": mode}
    if mode == "fast":
        if option in ENGINE_VARIANTS:
            kwargs["engine"] = option
        else:
            kwargs["engine_policy"] = policy
        if option.startswith("chunks"):
            kwargs["meta_chunks"] = int(option.removeprefix("chunks"))
        if option == "head":
            kwargs["meta_params"] = "head"
        if option.startswith("every"):
            kwargs["meta_every"] = int(option.removeprefix("every"))
    return {"l2rw": L2RW, "mwnet": MWNet, "cmwnet": CMWNet}[method](**kwargs)


def build_variants(
    case: Case,
    device: torch.device,
    bf16: bool,
    data: tuple[Tensor, ...],
    channels_last: bool = False,
    variants: Sequence[str] = VARIANTS,
    policy: str = "auto",
) -> tuple[
    dict[str, Callable[[], None]],
    dict[str, torch.optim.Optimizer],
    dict[str, Method],
    str | None,
]:
    """One step callable per variant (each on its own copy of one initial model)."""
    torch.manual_seed(0)
    if case.model.startswith("bert"):
        base = tiny_bert(case.num_classes, case.shape[0], 0.1 if "dropout" in case.model else 0.0)
    elif case.model.startswith("encoder"):
        base = SeqFirstEncoder(case.num_classes, case.shape[0], masked="masked" in case.model)
    elif case.model == "resnet18":
        base = build_model("torchvision", case.num_classes, case.shape[0], arch="resnet18")
    else:
        base = build_model(
            case.model,
            num_classes=case.num_classes,
            in_channels=case.shape[0],
            input_shape=case.shape,
        )
    base = base.to(device)
    if channels_last:  # as trainer.channels_last=true does: NHWC weights (the batches are NHWC)
        base = base.to(memory_format=torch.channels_last)

    def autocast() -> contextlib.AbstractContextManager:
        if bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    steps: dict[str, Callable[[], None]] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    methods: dict[str, Method] = {}
    skipped = None
    for name in variants:
        model = copy.deepcopy(base)
        opt = sgd(model)
        opts[name] = opt
        if name == "plain":
            steps[name] = lambda m=model, o=opt: _plain_step(m, o, data, autocast)
            continue
        if name == "floor":
            steps[name] = lambda m=model, o=opt: _floor_step(m, o, data, autocast)
            continue
        if name == "l2rw/higher":
            try:
                import higher  # the optional peer

                _higher_step(higher, copy.deepcopy(base), sgd(copy.deepcopy(base)), data, autocast)
            except Exception as err:  # the peer row is optional: say why it is missing
                skipped = f"l2rw/higher skipped: {type(err).__name__}: {err}"
                del opts[name]
                continue
            steps[name] = lambda m=model, o=opt, h=higher: _higher_step(h, m, o, data, autocast)
            continue
        try:
            method = make_method(name, policy)
            method.setup(
                model=model, train_labels=data[1], num_classes=case.num_classes, device=device
            )
            step = functools.partial(
                _trainer_step, method, model, opt, data, autocast, itertools.count()
            )
            step()  # a first step: a forced engine that cannot run the model says so here
            metastep = getattr(method, "metastep", None)
            planner = metastep.planner if metastep is not None else None
            for _ in range(20):  # the cuda policy first times its candidates: untimed here
                if planner is None or planner.current is None or not planner.current.timing:
                    break
                step()
        except ValueError as err:  # no row: meta_chunks or a forced engine refuses the model
            log.info("%s skipped for %s: %s", name, case.model, err)
            del opts[name]
            continue
        steps[name] = step
        methods[name] = method
    return steps, opts, methods, skipped


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {
    # seconds that pass; or seconds this process ran on a CPU (``time.process_time``: time spent
    # waiting for a core on a busy machine is not counted, so runs differ far less; on one
    # thread it is the step's own work; all threads' work is summed, and a GPU's not counted)
    "wall": time.perf_counter,
    "cpu": time.process_time,
}


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step for every variant by ``clock``, one step each per round, order
    rotating."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = clock()
            steps[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(clock() - t0)
    return times


def peak_memory(
    step: Callable[[], None], opt: torch.optim.Optimizer, device: torch.device
) -> float:
    """Peak tensor bytes a step holds above the bytes live when it starts (gradients freed)."""
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


# ---------------------------------------------------------------------------------------------
# Runs and the table


def batches(case: Case) -> tuple:
    """The case's fixed random batches (x, y, meta x, meta y), on the CPU: images, or token ids
    for a BERT."""
    gen = torch.Generator().manual_seed(1)

    def inputs(n: int):
        if case.model.startswith("bert"):
            return tokens(n, case.shape[0], gen)
        if case.model.startswith("encoder"):
            return tokens(n, case.shape[0], gen)["input_ids"]
        return torch.randn(n, *case.shape, generator=gen)

    x = inputs(case.batch)
    y = torch.randint(0, case.num_classes, (case.batch,), generator=gen)
    mx = inputs(case.meta_batch)
    my = torch.randint(0, case.num_classes, (case.meta_batch,), generator=gen)
    return x, y, mx, my


def run_case(
    case: Case,
    device: torch.device,
    threads: int | None,
    bf16: bool,
    warmup: int,
    rounds: int,
    memory: bool,
    channels_last: bool = False,
    variants: Sequence[str] = VARIANTS,
    policy: str = "auto",
    clock: str = "wall",
) -> list[dict]:
    data = tuple(
        {k: v.to(device) for k, v in t.items()} if isinstance(t, dict) else t.to(device)
        for t in batches(case)
    )
    if channels_last:
        data = tuple(
            t.contiguous(memory_format=torch.channels_last)
            if isinstance(t, Tensor) and t.dim() == 4
            else t
            for t in data
        )
    steps, opts, methods, skipped = build_variants(
        case, device, bf16, data, channels_last, variants, policy
    )
    if skipped:
        log.warning("%s", skipped)
    times = time_interleaved(steps, device, warmup, rounds, CLOCKS[clock])
    peaks = {n: peak_memory(steps[n], opts[n], device) if memory else float("nan") for n in steps}
    base_t = statistics.median(times["plain"])
    floor_t = statistics.median(times["floor"]) if "floor" in times else float("nan")
    rows = []
    for name in steps:
        ts = sorted(times[name])
        if "-every" in name:  # a meta step on every k-th batch: the amortised (mean) cost
            ts = [statistics.fmean(ts)] * len(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows.append(
            {
                "model": case.model,
                "batch": case.batch,
                "meta_batch": case.meta_batch,
                "device": device.type,
                "threads": threads,
                "dtype": ("bf16-autocast" if bf16 else "fp32")
                + (", NHWC" if channels_last else ""),
                "variant": name,
                "policy": policy,
                "clock": clock,
                "engine": _engine_of(methods.get(name)),
                "median_ms": statistics.median(ts) * 1e3,
                "p25_ms": q[0] * 1e3,
                "p75_ms": q[2] * 1e3,
                "ratio": statistics.median(ts) / base_t,
                "floor_ratio": statistics.median(ts) / floor_t,
                "floor_paired": _paired(times[name], times.get("floor"), "-every" in name),
                "peak_mb": peaks[name] / 2**20,
                "peak_ratio": peaks[name] / peaks["plain"] if peaks["plain"] else float("nan"),
                "steps": len(ts),
            }
        )
    if skipped:
        rows.append({**rows[0], "variant": "l2rw/higher", "skipped": skipped})
    return rows


def _paired(ts: list[float], floor: list[float] | None, amortised: bool) -> float:
    """The median over rounds of a step's time over the floor's in the same round (the
    variants of a round run within a second of each other, so a machine that slows down for
    minutes slows both); for a meta step on every k-th batch, the mean over the mean."""
    if floor is None:
        return float("nan")
    if amortised:
        return statistics.fmean(ts) / statistics.fmean(floor)
    return statistics.median(t / f for t, f in zip(ts, floor, strict=True))


def _engine_of(method: Method | None) -> str:
    """The engine that computed a fast row's last JVP, or what the row is."""
    step = getattr(method, "metastep", None)
    if step is None or step.meta_grad != "fast":
        return "-"
    return step.planner.last_engine or "-"


def format_table(rows: list[dict]) -> str:
    head = (
        "| model | batch / meta | device | threads | dtype | policy | variant | engine "
        "| ms / step (median) | p25–p75 ms | × plain | × floor | × floor, paired | peak MB "
        "| × plain |\n"
        "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        where = f"| {r['model']} | {r['batch']} / {r['meta_batch']} | {r['device']} | "
        where += f"{r['threads'] if r['threads'] is not None else '-'} | {r['dtype']} | "
        where += f"{r.get('policy', 'auto')} | "
        if "skipped" in r:
            lines.append(where + f"{r['variant']} | - | {r['skipped']} | | | | | | |")
            continue
        lines.append(
            where + f"{r['variant']} | {r.get('engine', '-')} | {r['median_ms']:.1f} "
            f"| {r['p25_ms']:.1f}–{r['p75_ms']:.1f} "
            f"| {r['ratio']:.2f} | {r.get('floor_ratio', float('nan')):.2f} "
            f"| {r.get('floor_paired', float('nan')):.2f} "
            f"| {r['peak_mb']:.1f} | {r['peak_ratio']:.2f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    info: dict[str, str | int] = {
        "cpu": cpu,
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,all", help="CPU threads: 1, all, or 1,all")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (>= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument(
        "--models",
        default="lenet,resnet32",
        help="comma-separated: " + ",".join(CASES),
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="NHWC model and batches for every variant (as trainer.channels_last=true)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of the variants (plain, the unit, is always run)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated batch/meta pairs to keep, e.g. 100/100 (default: all)",
    )
    parser.add_argument(
        "--policy",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="the planner's device policy for the fast rows (cuda: on a CPU, what a GPU runs)",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="wall: seconds that pass; cpu: seconds this process ran (CPU rows: a busy machine "
        "inflates them far less; with --threads all, every thread's are summed)",
    )
    parser.add_argument(
        "--malloc",
        default="system",
        choices=list(MALLOC_CHOICES),
        help="glibc's malloc: system (its defaults) or tuned (as the CLI runs: "
        "reweight.core.malloc)",
    )
    parser.add_argument("--json", default=None, help="write the rows and the machine here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log.info("malloc: %s", tune_malloc(args.malloc))
    if args.steps < 20:
        parser.error(f"--steps must be >= 20, got {args.steps}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(CASES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(CASES)}")
    variants = ["plain"] + [v.strip() for v in args.variants.split(",") if v.strip() != "plain"]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        parser.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    cases = None if args.cases is None else {c.strip() for c in args.cases.split(",")}
    thread_settings = []
    for t in args.threads.split(","):
        t = t.strip()
        if t not in ("1", "all"):
            parser.error(f"--threads must be 1, all or 1,all, got {args.threads!r}")
        thread_settings.append(1 if t == "1" else os.cpu_count() or 1)

    runs: list[tuple[torch.device, int | None, bool]] = []
    if args.device in ("auto", "cpu"):
        runs += [(torch.device("cpu"), n, False) for n in thread_settings]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        if args.clock == "cpu":
            parser.error("--clock cpu times CPU rows only (a GPU's work is not the process's)")
        runs += [(torch.device("cuda"), None, False), (torch.device("cuda"), None, True)]
    else:
        log.info("no CUDA device: CPU rows only")

    info = {**machine(), "malloc": args.malloc}
    log.info("machine: %s", info)
    rows: list[dict] = []
    for device, threads, bf16 in runs:
        if threads is not None:
            torch.set_num_threads(threads)
        for model in models:
            for case in CASES[model]:
                if cases is not None and f"{case.batch}/{case.meta_batch}" not in cases:
                    continue
                log.info(
                    "%s batch %d meta %d on %s%s%s, policy %s ...",
                    case.model,
                    case.batch,
                    case.meta_batch,
                    device.type,
                    f" ({threads} threads)" if threads else "",
                    " bf16" if bf16 else "",
                    args.policy,
                )
                case_rows = run_case(
                    case,
                    device,
                    threads,
                    bf16,
                    args.warmup,
                    args.steps,
                    not args.no_memory,
                    args.channels_last,
                    variants,
                    args.policy,
                    args.clock,
                )
                print(format_table(case_rows), flush=True)
                rows += case_rows
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
