"""CMW-Net's parts that test_cmwnet.py's reference comparison does not pin down
(reweight.methods.cmwnet): the weighting net against its formula written out (the reference
there calls the same net), the exact 1-D k-means on its edge cases (one class, one group, a
tie), the defaults of the official code, the options handed to the shared machinery, the
refusals word for word, and the class groups through setup, describe and a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reweight import CMWNet
from reweight.methods.cmwnet import ClassAwareWeightNet, size_groups

DT = torch.float64


def test_the_net_is_a_shared_relu_layer_and_one_sigmoid_head_per_group():
    torch.manual_seed(0)
    net = ClassAwareWeightNet(groups=3, hidden=5).double()
    with torch.no_grad():  # some hidden units negative, so that the ReLU counts
        net.shared[0].bias.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0], dtype=DT))
    loss = torch.tensor([[0.3], [2.0], [0.7], [1.5]], dtype=DT)
    group = torch.tensor([2, 0, 1, 2])
    w1, b1 = net.shared[0].weight.detach(), net.shared[0].bias.detach()
    w2, b2 = net.heads.weight.detach(), net.heads.bias.detach()
    want = torch.stack(
        [
            torch.sigmoid(w2[g] @ torch.clamp(w1[:, 0] * li[0] + b1, min=0) + b2[g])
            for li, g in zip(loss, group.tolist(), strict=True)
        ]
    )[:, None]
    got = net(loss, group)
    assert got.shape == (4, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (w1[:, 0] * loss[1, 0] + b1).min() < 0  # the ReLU cut something


def test_the_defaults_are_the_official_codes():
    net = ClassAwareWeightNet()
    assert (net.shared[0].in_features, net.shared[0].out_features) == (1, 100)
    assert (net.heads.in_features, net.heads.out_features) == (100, 3)
    method = CMWNet()
    assert (method.groups, method.hidden, method.meta_every) == (3, 100, 1)
    assert method.vnet.heads.out_features == 3 and method.vnet.shared[0].out_features == 100
    group = method.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 1e-4)
    assert (method.lr, method.weight_decay) == (1e-4, 1e-4)


def test_its_options_reach_the_net_and_the_meta_step():
    method = CMWNet(
        groups=2, hidden=5, lr=0.02, weight_decay=0.003, normalize="sum", detach_loss=False,
        replay_optimizer=True, meta_every=4, meta_chunks=2, meta_params="head",
        engine="tape", engine_policy="cpu",
    )  # fmt: skip
    assert method.vnet.heads.out_features == 2 and method.vnet.shared[0].out_features == 5
    group = method.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.003)
    assert (method.normalize, method.detach_loss, method.meta_every) == ("sum", False, 4)
    step = method.metastep
    assert (step.replay_optimizer, step.chunks, step.params) == (True, 2, "head")
    assert (step.planner.engine, step.planner.policy) == ("tape", "cpu")
    assert CMWNet(meta_grad="unrolled").metastep.meta_grad == "unrolled"
    assert CMWNet(groups=1).groups == 1  # one group: every class alike, allowed


def test_refusals_word_for_word():
    for groups in (0, -2, True, "3", 2.0):
        with pytest.raises(ValueError) as info:
            CMWNet(groups=groups)
        assert str(info.value) == f"method.groups must be an integer >= 1, got {groups!r}"
    need = (
        "method=cmwnet needs the training labels and the number of classes to group the "
        "classes by size (Trainer(train_labels=..., num_classes=...))"
    )
    cpu, labels = torch.device("cpu"), torch.tensor([0, 1, 1])
    for kw in ({}, {"train_labels": labels}, {"num_classes": 2}):
        with pytest.raises(ValueError) as info:
            CMWNet().setup(model=nn.Linear(2, 2), device=cpu, **kw)
        assert str(info.value) == need
    method = CMWNet()
    assert method.describe()["class_groups"] is None  # before setup: none yet
    with pytest.raises(RuntimeError) as info:
        method.net_output(torch.ones(2), None)
    assert str(info.value) == "CMWNet.setup must run before its first step (it groups the classes)"


def test_size_groups_edge_cases():
    assert size_groups([5]) == [0]  # one class: one group
    assert size_groups([5000, 4800, 50, 60, 500, 450, 5100]) == [2, 2, 0, 0, 1, 1, 2]  # 3 groups
    assert size_groups([5, 500, 50], 1) == [0, 0, 0]  # one group asked for
    # a tie: {1}{2, 3} and {1, 2}{3} both leave 0.5; the earlier split wins
    assert size_groups([1, 2, 3], 2) == [0, 1, 1]
    assert size_groups([3, 1, 2], 2) == [1, 0, 1]


def test_setup_groups_every_class_and_a_checkpoint_keeps_the_groups():
    # classes 0-3 of sizes 50, 5, 40, 0 (the last never seen), in two groups: {0, 5} {40, 50}
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 40, dtype=torch.float64)  # float labels
    method = CMWNet(groups=2, hidden=4)
    method.setup(model=nn.Linear(2, 4), device=torch.device("cpu"), train_labels=labels,
                 num_classes=4)  # fmt: skip
    assert method.class_groups.tolist() == [1, 0, 1, 0]
    assert method.describe()["class_groups"] == [1, 0, 1, 0]
    assert CMWNet(hidden=4).describe()["class_groups"] is None
    three = CMWNet(hidden=4)  # the default: three groups
    three.setup(model=nn.Linear(2, 4), device=torch.device("cpu"), train_labels=labels.long(),
                num_classes=4)  # fmt: skip
    assert three.class_groups.tolist() == [2, 0, 1, 0]  # {0, 5} {40} {50}
    meta = CMWNet(hidden=4)  # the groups live on the run's device
    meta.setup(model=nn.Linear(2, 4), device=torch.device("meta"), train_labels=labels,
               num_classes=4)  # fmt: skip
    assert meta.class_groups.device.type == "meta"
    state = method.state_dict()
    assert state["class_groups"].tolist() == [1, 0, 1, 0]
    torch.manual_seed(5)
    resumed = CMWNet(groups=2, hidden=4)
    resumed.load_state_dict(state)
    assert resumed.class_groups.tolist() == [1, 0, 1, 0]
    for a, b in zip(resumed.vnet.parameters(), method.vnet.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed.load_state_dict({**state, "class_groups": None})  # none saved: the own kept
    assert resumed.class_groups.tolist() == [1, 0, 1, 0]
