"""LRP engine: exactness against zennit (on the BN-folded network), conservation, hand-computed cases,
no side effects on the model, and clear errors."""


import pytest
import torch
from torch import nn
from zennit_oracle import import_zennit

from scripts.lrp import LRP, AlphaBeta, Composite, Epsilon, Flat, UnsupportedModuleError, WSquare, ZBox, get_composite
from scripts.lrp.layers import bn_folded_copy
from scripts.runtime.network import PretermCNN


def _randomise_bn(net):
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return net


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = PretermCNN(spatial_shape=(32, 24, 24), channels=(4, 8, 8), hidden=16).double()
    return _randomise_bn(net).eval()


def _zennit_relevance(net, x, composite, target):
    zennit = import_zennit()
    if zennit is None:
        pytest.skip("zennit is not installed")
    from zennit.attribution import Gradient

    with Gradient(model=net, composite=composite) as attributor:
        _, relevance = attributor(x, lambda out: torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None])))
    return relevance


def _zennit_composite(name):
    import_zennit()
    from zennit.composites import EpsilonAlpha2Beta1, LayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta as ZAlphaBeta
    from zennit.types import Convolution, Linear

    if name == "epsilon_a2b1":
        return EpsilonAlpha2Beta1()
    alpha, beta = {"a1b0": (1, 0), "a2b1": (2, 1), "a3b2": (3, 2)}[name]
    rule = ZAlphaBeta(alpha, beta)
    return LayerMapComposite(layer_map_base() + [(Convolution, rule), (Linear, rule)])


@pytest.mark.parametrize("preset", ["a1b0", "a2b1", "a3b2", "epsilon_a2b1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_zennit_on_bn_folded_network(small_net, preset, dtype):
    net = small_net.to(dtype)
    x = torch.randn(3, 1, 32, 24, 24, dtype=dtype, generator=torch.Generator().manual_seed(4))
    ours = LRP(net).trace(x).relevance(preset)
    reference = _zennit_relevance(bn_folded_copy(net), x.clone(), _zennit_composite(preset), ours.target)
    scale = reference.abs().max()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert float((ours.relevance - reference).abs().max() / scale) < tol
    small_net.double()


def test_conservation_on_a_bias_free_network():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool3d(2),
                        nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool3d(2), nn.Flatten(),
                        nn.Linear(4 * 16, 6, bias=False), nn.ReLU(), nn.Linear(6, 2, bias=False)).double().eval()
    with torch.no_grad():  # larger weights keep activations >> 1e-6, where the stabiliser is negligible
        for m in net:
            if hasattr(m, "weight"):
                m.weight.mul_(4.0)
    x = 10 * torch.rand(2, 1, 8, 8, 16, dtype=torch.float64)  # non-negative input: every term of the rules conserves
    trace = LRP(net).trace(x)
    for preset in ("a1b0", "a2b1", "a3b2", "epsilon", "epsilon_a2b1"):
        result = trace.relevance(preset)
        assert torch.allclose(result.conservation, torch.ones(2, dtype=torch.float64), atol=1e-5), preset
        assert torch.equal(result.start, trace.logits.gather(1, result.target[:, None])[:, 0])


def test_hand_computed_alpha_beta_and_epsilon():
    lin = nn.Linear(2, 1, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5]))
    net = nn.Sequential(lin).double().eval()
    x = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    # z = 2 - 3 + 0.5 = -0.5; z+ = 2 + 0.5 = 2.5 (x+ w+ + b+), z- = -3 (x+ w-), R = z = -0.5
    r = LRP(net)(x, "a2b1", target=0)
    expected = torch.tensor([[2 * (-0.5) * 2 / 2.5, -1 * (-0.5) * (-3) / -3]], dtype=torch.float64)
    assert torch.allclose(r.relevance, expected, atol=1e-6)
    r = LRP(net)(x, "a1b0", target=0)
    assert torch.allclose(r.relevance, torch.tensor([[-0.5 * 2 / 2.5, 0.0]], dtype=torch.float64), atol=1e-6)
    r = LRP(net)(x, "epsilon", target=0)
    assert torch.allclose(r.relevance, torch.tensor([[-0.5 * 2 / -0.5, -0.5 * -3 / -0.5]], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(r.conservation, torch.tensor([(2 - 3) / -0.5], dtype=torch.float64), atol=1e-5)


def test_hand_computed_signed_input_and_first_layer_rules():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    net = nn.Sequential(lin).double().eval()
    x = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)  # z = 3; z+ = x+ w+ = 4; z- = x- w+ = -1
    r = LRP(net)(x, "a2b1", target=0).relevance
    assert torch.allclose(r, torch.tensor([[-2 * 3 * (-1) / -1 * 0 - 1 * 3 * (-1.0) / -1 * 1, 2 * 3 * 4 / 4]], dtype=torch.float64))
    # z^B with bounds [-2, 2]: z = xw - L w+ - H w- = 3 + 2 + 4 = 9
    zb = Composite([("*", ZBox(-2.0, 2.0))])
    r = LRP(net)(x, zb, target=0).relevance
    assert torch.allclose(r, torch.tensor([[3 * (-1 + 2) / 9, 3 * (4 + 4) / 9]], dtype=torch.float64))
    r = LRP(net)(x, Composite([("*", WSquare())]), target=0).relevance
    assert torch.allclose(r, torch.tensor([[3 * 1 / 5, 3 * 4 / 5]], dtype=torch.float64))
    r = LRP(net)(x, Composite([("*", Flat())]), target=0).relevance
    assert torch.allclose(r, torch.tensor([[1.5, 1.5]], dtype=torch.float64))


def test_targets_batching_and_reuse(small_net):
    x = torch.randn(4, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    trace = LRP(small_net).trace(x)
    pred = trace.relevance("a2b1")
    assert torch.equal(pred.target, trace.logits.argmax(1))
    assert torch.allclose(pred.start, trace.logits.gather(1, pred.target[:, None])[:, 0])
    one = trace.relevance("a2b1", target=1)
    assert torch.equal(one.target, torch.ones(4, dtype=torch.long))
    diff = trace.relevance("a2b1", target="difference")
    assert torch.allclose(diff.start, trace.logits[:, 1] - trace.logits[:, 0])
    # each sample of a batch equals the sample explained alone; reuse of cached stats changes nothing
    for i in range(4):
        alone = LRP(small_net)(x[i : i + 1], "a2b1", target=1)
        assert torch.allclose(alone.relevance[0], one.relevance[i], atol=1e-12)
    again = trace.relevance("a2b1", target=1)
    assert torch.equal(again.relevance, one.relevance)


def test_composite_selectors_and_presets(small_net):
    x = torch.randn(2, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    trace = LRP(small_net).trace(x)
    custom = Composite([("first", ZBox("auto", "auto")), ("conv", AlphaBeta(2, 1)), ("linear", Epsilon(1e-6))])
    assert torch.allclose(trace.relevance(custom).relevance, trace.relevance("zbox_a2b1").relevance)
    assert get_composite((2, 1)).name == "a2b1" and get_composite("a1.5b0.5").rules[0][1].beta == 0.5
    with pytest.raises(ValueError, match="alpha - beta"):
        AlphaBeta(2, 2)
    with pytest.raises(ValueError, match="unknown LRP composite"):
        get_composite("nope")


def test_model_state_untouched_no_hooks_no_grads(small_net):
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    params = [p.data_ptr() for p in small_net.parameters()]
    x = torch.randn(1, 1, 32, 24, 24, dtype=torch.float64)
    with torch.no_grad():  # how Ignite evaluators and MONAI Deploy call networks
        result = LRP(small_net)(x, "a2b1")
    assert torch.isfinite(result.relevance).all()
    after = small_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert params == [p.data_ptr() for p in small_net.parameters()]
    assert all(p.grad is None for p in small_net.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in small_net.modules())
    assert not result.relevance.requires_grad


def test_repeatable_maps(small_net):
    x = torch.randn(2, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(LRP(small_net)(x).relevance, LRP(small_net)(x).relevance)


def test_maxpool_is_winner_takes_all():
    net = nn.Sequential(nn.MaxPool1d(2), nn.Flatten(), nn.Linear(2, 1, bias=False)).double().eval()
    with torch.no_grad():
        net[2].weight.fill_(1.0)
    x = torch.tensor([[[1.0, 3.0, 5.0, 2.0]]], dtype=torch.float64)
    r = LRP(net)(x, "a1b0", target=0).relevance
    assert torch.allclose(r, torch.tensor([[[0.0, 3.0, 5.0, 0.0]]], dtype=torch.float64))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(self.flat(self.conv(x) + x))


class _ScaledAfterBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm3d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(128, 2)

    def forward(self, x):
        return self.fc(self.flat(self.bn(self.conv(x)) * 2))


def test_unsupported_networks_name_the_module():
    with pytest.raises(UnsupportedModuleError, match=r"flat \(Flatten\)"):
        LRP(_Residual().eval())(torch.randn(1, 1, 4, 4, 4))
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(128, 2)).eval()
    with pytest.raises(UnsupportedModuleError, match=r"1 \(Sigmoid\)"):
        LRP(net)(torch.randn(1, 1, 4, 4, 4))
    scaled = _ScaledAfterBatchNorm().eval()  # a functional op right after a folded BatchNorm names the BatchNorm
    with pytest.raises(UnsupportedModuleError, match=r"flat \(Flatten\) does not take the output of bn \(BatchNorm3d\)"):
        LRP(scaled)(torch.randn(1, 1, 4, 4, 4))
    bn_first = nn.Sequential(nn.BatchNorm3d(1), nn.Flatten(), nn.Linear(64, 2)).eval()
    with pytest.raises(UnsupportedModuleError, match=r"0 \(BatchNorm3d\)"):
        LRP(bn_first)(torch.randn(1, 1, 4, 4, 4))


def test_bad_inputs(small_net):
    with pytest.raises(ValueError, match="5D"):
        LRP(small_net)(torch.randn(1, 32, 24, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="5D"):
        LRP(small_net)(torch.randn(32, 24, dtype=torch.float64))
    x = torch.randn(1, 1, 32, 24, 24, dtype=torch.float64)
    x[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LRP(small_net)(x)
    small_net.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"):
            LRP(small_net)(torch.randn(1, 1, 32, 24, 24, dtype=torch.float64))
    finally:
        small_net.eval()


def test_full_size_network_runs_float32():
    net = PretermCNN().eval()
    x = torch.randn(1, 1, 128, 96, 96)
    trace = LRP(net).trace(x)
    maps = {p: trace.relevance(p) for p in ("a1b0", "a2b1", "a3b2")}
    for result in maps.values():
        assert result.relevance.shape == x.shape and result.relevance.dtype == torch.float32
        assert torch.isfinite(result.relevance).all()


def test_single_map_call_releases_the_trace(small_net):
    from scripts.lrp.propagation import Trace

    x = torch.randn(1, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    once = Trace(small_net, x, cache=False, consume=True)
    result = once.relevance("a2b1")
    assert all(step.x is None for step in once.steps)
    with pytest.raises(RuntimeError, match="single map"):
        once.relevance("a2b1")
    assert torch.allclose(result.relevance, LRP(small_net).trace(x).relevance("a2b1").relevance, atol=1e-12)
