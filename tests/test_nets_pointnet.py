"""The point-cloud net: permutation equivariance, cross-point context, any N, config."""
import pytest
import torch

from fewstep.errors import UserError
from fewstep.nets import PointNet, build_net, net_config_defaults


def trained_like(seed=0, **kw):
    """A PointNet with every weight random (the zero output layer too), in float64."""
    torch.manual_seed(seed)
    net = PointNet(**{"hidden": 32, "depth": 2, "emb_dim": 16, **kw}).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_permutation_equivariance():
    net = trained_like()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 3, generator=g, dtype=torch.float64)
    c = torch.tensor([0.1, -0.5, 2.0], dtype=torch.float64)
    perm = torch.randperm(50, generator=g)
    out = net(x, c)
    assert out.abs().max() > 1e-3
    # F(P x) = P F(x): equal to the last bits but the mean's summation order
    assert torch.allclose(net(x[:, perm], c), out[:, perm], rtol=0, atol=1e-13)


def test_points_see_each_other_and_any_cloud_size_works():
    net = trained_like()
    x = torch.randn(1, 20, 3, dtype=torch.float64)
    y = x.clone()
    y[0, 0] += 1.0                                   # move one point: the others' outputs move too
    assert (net(x, 0.3)[0, 1:] - net(y, 0.3)[0, 1:]).abs().max() > 1e-4
    assert net(torch.randn(2, 7, 3, dtype=torch.float64), 0.3).shape == (2, 7, 3)


def test_untrained_outputs_zero_and_config_round_trip():
    cfg = net_config_defaults("clouds", (256, 3))
    net = build_net(cfg)
    assert cfg["kind"] == "pointnet" and net.config == {**cfg}
    assert torch.equal(net(torch.randn(2, 9, 3), torch.zeros(2)), torch.zeros(2, 9, 3))
    twin = build_net(net.config)
    twin.load_state_dict(net.state_dict())
    labelled = build_net({**cfg, "num_classes": 3})
    assert labelled(torch.randn(2, 9, 3), torch.zeros(2), labels=torch.tensor([0, 2])).shape == (2, 9, 3)


def test_bad_inputs_are_user_errors():
    net = PointNet(hidden=8, depth=1, emb_dim=8)
    with pytest.raises(UserError, match="clouds"):
        net(torch.randn(2, 9), torch.zeros(2))
    with pytest.raises(UserError, match="dim=2"):
        net(torch.randn(2, 9, 2), torch.zeros(2))
    with pytest.raises(UserError, match="unknown option"):
        build_net({"kind": "pointnet", "width": 3})
