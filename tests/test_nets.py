"""Tests for fewstep.nets: shapes, conditioning, gradients, config round trips."""
from __future__ import annotations

import json

import pytest
import torch

from fewstep.errors import UserError
from fewstep.nets import MLP, UNet, build_net, net_config_defaults
from fewstep.nets.embed import SinusoidalEmbedding


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised layers do not hide the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def small_unet(**kw) -> UNet:
    cfg = dict(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1)
    cfg.update(kw)
    return UNet(**cfg)


@pytest.mark.parametrize("shape", [(2,), (12,), (4, 3)])
def test_mlp_shapes(shape):
    dim = torch.Size(shape).numel()
    net = MLP(dim, hidden=32, depth=2, emb_dim=16, num_classes=3, use_cond=True)
    x = torch.randn(5, *shape)
    out = net(x, torch.rand(5), labels=torch.tensor([0, 1, 2, -1, 3]), cond=torch.rand(5))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


@pytest.mark.parametrize("channels,size,mult,attn", [
    (1, 8, (1, 2, 2), (4,)),
    (3, 16, (1, 2), (8,)),
    (1, 28, (1, 2, 2, 2), ()),  # 28 -> 14 -> 7 -> 4 and back
    (3, 32, (1, 2), ()),
])
def test_unet_shapes(channels, size, mult, attn):
    net = randomise(small_unet(in_channels=channels, channel_mult=mult, attn_resolutions=attn,
                               image_size=size, num_classes=10))
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0.3, -1.2]), labels=torch.tensor([3, -1]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_non_square_and_attention_present():
    net = small_unet(attn_resolutions=(12,), image_size=12)
    assert any(m.attn is not None for m in net.down)
    out = randomise(net)(torch.randn(2, 1, 12, 10), torch.zeros(2))
    assert out.shape == (2, 1, 12, 10)


def make_nets():
    return [MLP(3, hidden=32, depth=2, emb_dim=16, num_classes=4, use_cond=True),
            small_unet(num_classes=4, use_cond=True, image_size=8, attn_resolutions=(4,))]


def inputs_for(net):
    x = torch.randn(4, 3) if isinstance(net, MLP) else torch.randn(4, 1, 8, 8)
    return x, torch.tensor([-2.0, 0.1, 5.0, 700.0]), torch.tensor([0, 1, 3, -1]), torch.rand(4)


@pytest.mark.parametrize("index", [0, 1])
def test_gradients_reach_every_parameter(index):
    net = randomise(make_nets()[index]).train()
    x, c, labels, cond = inputs_for(net)
    net(x, c, labels=labels, cond=cond).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("index", [0, 1])
def test_conditioning_changes_output(index):
    net = randomise(make_nets()[index])
    x, c, labels, cond = inputs_for(net)
    base = net(x, c, labels=labels, cond=cond)
    assert not torch.allclose(base, net(x, c + 0.5, labels=labels, cond=cond))
    assert not torch.allclose(base, net(x, c, labels=(labels + 1) % 4, cond=cond))
    assert not torch.allclose(base, net(x, c, labels=labels, cond=cond + 1))
    null = net(x, c, labels=None, cond=cond)
    assert torch.allclose(null, net(x, c, labels=torch.full((4,), -1), cond=cond))
    assert torch.allclose(null, net(x, c, labels=torch.full((4,), 4), cond=cond))
    assert torch.allclose(net(x, c, labels=labels), net(x, c, labels=labels, cond=torch.zeros(4)))
    scalar = net(x, torch.tensor(0.7), labels=labels, cond=cond)
    assert torch.allclose(scalar, net(x, torch.full((4,), 0.7), labels=labels, cond=cond))


def test_conditioning_errors():
    net = MLP(2, hidden=16, depth=1, emb_dim=8)
    x = torch.randn(3, 2)
    with pytest.raises(UserError, match="use_cond"):
        net(x, torch.zeros(3), cond=torch.zeros(3))
    net(x, torch.zeros(3), labels=torch.tensor([0, 1, 2]))  # unconditional nets ignore labels
    with pytest.raises(UserError, match="dim=3"):
        net(torch.randn(3, 3), torch.zeros(3))
    with pytest.raises(UserError, match="noise"):
        net(x, torch.zeros(2))
    labelled = MLP(2, hidden=16, depth=1, emb_dim=8, num_classes=2)
    with pytest.raises(UserError, match="labels"):
        labelled(x, torch.zeros(3), labels=torch.tensor([0, 1, 5]))
    with pytest.raises(UserError, match="channels"):
        small_unet()(torch.randn(2, 3, 8, 8), torch.zeros(2))


def test_noise_embedding_handles_wide_range():
    emb = SinusoidalEmbedding(64)
    c = torch.tensor([-10.0, -0.5, 0.0, 0.25, 999.0, 1000.0])
    e = emb(c)
    assert e.shape == (6, 64) and torch.isfinite(e).all()
    assert torch.cdist(e, e).add(torch.eye(6) * 99).min() > 0.1  # all inputs distinguishable


@pytest.mark.parametrize("index", [0, 1])
def test_build_net_json_round_trip(index):
    net = randomise(make_nets()[index])
    cfg = json.loads(json.dumps(net.config))
    clone = build_net(cfg).eval()
    assert clone.config == net.config
    clone.load_state_dict(net.state_dict())
    x, c, labels, cond = inputs_for(net)
    assert torch.equal(net(x, c, labels, cond), clone(x, c, labels, cond))


@pytest.mark.parametrize("kind,shape", [("points", (2,)), ("points", (128, 3)),
                                         ("image", (1, 8, 8)), ("image", (3, 16, 16)),
                                         ("image", (1, 28, 28)), ("image", (3, 32, 32))])
def test_default_configs_build(kind, shape):
    cfg = net_config_defaults(kind, shape, num_classes=10)
    assert json.loads(json.dumps(cfg)) == cfg
    net = build_net(cfg)
    if max(shape) <= 16:
        x = torch.randn(2, *shape)
        assert net(x, torch.zeros(2), torch.tensor([1, 2])).shape == x.shape


def test_build_net_errors():
    with pytest.raises(UserError, match="did you mean 'mlp'"):
        build_net({"kind": "mpl", "dim": 2})
    with pytest.raises(UserError, match="widht"):
        build_net({"kind": "mlp", "dim": 2, "widht": 3})
    with pytest.raises(UserError, match="dim"):
        build_net({"kind": "mlp"})
    with pytest.raises(UserError, match="data kind"):
        net_config_defaults("video", (3, 8, 8))


@pytest.mark.parametrize("index", [0, 1])
def test_half_precision_nets_run(index):
    net = randomise(make_nets()[index]).to(torch.bfloat16)
    x, c, labels, cond = inputs_for(net)
    out = net(x.bfloat16(), c, labels=labels, cond=cond)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()
