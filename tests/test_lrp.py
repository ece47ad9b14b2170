"""LRP engine: exactness against zennit (on the BN-folded network), conservation, hand-computed cases,
no side effects on the model, and clear errors."""

import copy

import pytest
import torch
from torch import nn
from zennit_oracle import import_zennit

from scripts.lrp import (
    LRP,
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    UnsupportedModuleError,
    WSquare,
    ZBox,
    get_composite,
)
from scripts.lrp.layers import bn_folded_copy, linear_op
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
        def one_hot(out):
            return torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))

        _, relevance = attributor(x, one_hot)
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


# -- the tolerance rule for every comparison with zennit ------------------------------------------------------------
# float64: our map and zennit's agree to 1e-12 of the map's largest value (rounding of a few hundred operations).
# float32: no fixed bound holds on every machine -- the CPU kernels (and their summation order) differ between
# machines, and badly conditioned layers amplify rounding. The reference is zennit's float64 map; our float32 map
# may differ from it by at most FLOAT32_K times what zennit's own float32 map differs from it on the same input and
# network (floored at the float32 epsilon), i.e. we are as accurate as the oracle in float32, up to a factor 4.
FLOAT64_TOL = 1e-12
FLOAT32_K = 4
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run a comparison with 1 and with 2 intra-op threads (different reduction splits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _relative(a, b, scale):
    return float((a - b).abs().max() / scale)


def _assert_equals_zennit(net, build, dtype, x=None, check_once=False):
    """Our map of ``net`` against zennit's under the rule above. ``build(x) -> (our composite spec, zennit
    composite)``; the target is the float64 prediction for both dtypes. Returns (our error, zennit's float32
    error), relative to the largest value of the float64 reference."""
    net = copy.deepcopy(net).double()
    x = torch.randn(3, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) \
        if x is None else x.double()
    spec, composite = build(x)
    ours64 = LRP(net).trace(x).relevance(spec)
    target = ours64.target
    reference = _zennit_relevance(bn_folded_copy(net), x.clone(), composite, target)
    scale = reference.abs().max()
    if dtype == torch.float64:
        ours, oracle_error = ours64.relevance, 0.0
    else:
        net32, x32 = net.float(), x.float()
        spec32, composite32 = build(x32)
        ours = LRP(net32).trace(x32).relevance(spec32, target).relevance
        oracle = _zennit_relevance(bn_folded_copy(net32), x32.clone(), composite32, target)
        oracle_error = _relative(oracle.double(), reference, scale)
        spec = spec32
        x = x32
        net = net32
    error = _relative(ours.double(), reference, scale)
    if check_once:  # the single-map path (blocked, nothing cached) gives the same map
        once = LRP(net)(x, spec, target)
        assert torch.allclose(once.relevance, ours, rtol=0, atol=float(scale) * 1e-5)
    bound = FLOAT64_TOL if dtype == torch.float64 else FLOAT32_K * max(oracle_error, FLOAT32_EPS)
    assert error <= bound, f"relative error {error:.3g} > {bound:.3g} (zennit's own float32 error {oracle_error:.3g})"
    return error, oracle_error


@pytest.mark.parametrize("preset", ["a1b0", "a2b1", "a3b2", "epsilon_a2b1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_zennit_on_bn_folded_network(small_net, preset, dtype, threads):
    _assert_equals_zennit(small_net, lambda x: (preset, _zennit_composite(preset)), dtype)


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
    expected = torch.tensor([[-0.5 * 2 / -0.5, -0.5 * -3 / -0.5]], dtype=torch.float64)
    assert torch.allclose(r.relevance, expected, atol=1e-5)
    assert torch.allclose(r.conservation, torch.tensor([(2 - 3) / -0.5], dtype=torch.float64), atol=1e-5)


def test_hand_computed_signed_input_and_first_layer_rules():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    net = nn.Sequential(lin).double().eval()
    x = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)  # z = 3; z+ = x+ w+ = 4; z- = x- w+ = -1
    r = LRP(net)(x, "a2b1", target=0).relevance
    expected = torch.tensor([[-2 * 3 * (-1) / -1 * 0 - 1 * 3 * (-1.0) / -1 * 1, 2 * 3 * 4 / 4]], dtype=torch.float64)
    assert torch.allclose(r, expected)
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
    message = r"flat \(Flatten\) does not take the output of bn \(BatchNorm3d\)"
    with pytest.raises(UnsupportedModuleError, match=message):
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


# -- gamma rule, zennit's named composites, bias-free rules --------------------------------------------------------


def _bounds(x):
    dims = tuple(range(1, x.ndim))
    return x.amin(dim=dims, keepdim=True).expand_as(x).clone(), x.amax(dim=dims, keepdim=True).expand_as(x).clone()


def _named_pair(name, x):
    """(our composite spec, the zennit 0.5.1 composite it must equal) for ``name`` (``<name>_nobias``: our bias-free
    variant against zennit's composite built with ``zero_params='bias'``)."""
    import_zennit()
    from zennit import composites as zc
    from zennit import rules as zr
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.types import Convolution, Linear

    nobias = name.endswith("_nobias")
    base = name[: -len("_nobias")] if nobias else name
    zero = "bias" if nobias else None
    if base.startswith("gamma"):  # the rule alone on every layer: gamma<value>
        gamma = float(base[len("gamma"):])
        ours = Composite([("*", Gamma(gamma, zero_bias=nobias))], name)
        rule = zr.Gamma(gamma, zero_params=zero)
        return ours, LayerMapComposite(layer_map_base() + [(Convolution, rule), (Linear, rule)])
    if base in ("a1b0", "a2b1", "zplus"):
        rule = zr.ZPlus(zero_params=zero) if base == "zplus" else zr.AlphaBeta(*{"a1b0": (1, 0), "a2b1": (2, 1)}[base],
                                                                                zero_params=zero)
        return name, LayerMapComposite(layer_map_base() + [(Convolution, rule), (Linear, rule)])
    if base == "epsilon_gamma_box":
        low, high = _bounds(x)
        return name, zc.EpsilonGammaBox(low=low, high=high, zero_params=zero)
    cls = {"epsilon_plus": zc.EpsilonPlus, "epsilon_plus_flat": zc.EpsilonPlusFlat,
           "flat_a2b1": zc.EpsilonAlpha2Beta1Flat}[base]
    return name, cls(zero_params=zero)


@pytest.mark.parametrize("name", ["gamma0.25", "gamma1", "epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat",
                                  "flat_a2b1", "a1b0_nobias", "a2b1_nobias", "zplus_nobias", "epsilon_plus_nobias",
                                  "epsilon_plus_flat_nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gamma_named_composites_and_bias_free_rules_equal_zennit(small_net, name, dtype, threads):
    """Gamma (on every layer), EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, EpsilonAlpha2Beta1Flat and the
    bias-free (zero_params='bias') alpha-beta / z+ / EpsilonPlus(Flat) against zennit, with the tolerance rule
    above; the single-map path gives the same map."""
    _assert_equals_zennit(small_net, lambda x: _named_pair(name, x), dtype, check_once=True)


def test_float32_rule_catches_a_wrong_rule(small_net):
    """The float32 rule is not vacuous: a map from a slightly different rule (alpha 2.001 instead of 2) fails it."""
    if import_zennit() is None:
        pytest.skip("zennit is not installed")
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta as ZAlphaBeta
    from zennit.types import Convolution, Linear

    rule = ZAlphaBeta(2.0, 1.0)
    composite = LayerMapComposite(layer_map_base() + [(Convolution, rule), (Linear, rule)])
    with pytest.raises(AssertionError, match="relative error"):
        _assert_equals_zennit(small_net, lambda x: ((2.001, 1.001), composite), torch.float32)


def _nonpositive_bias_net(net):
    """A copy of ``net`` with every hidden layer's (folded) bias <= 0 and weights x4 (so activations stay well above
    the biases). Then an output with z_j > 0 has a bias-free gamma denominator >= z_j, and outputs with z_j <= 0 get
    no relevance through the ReLU: the bias-free gamma rule is well conditioned."""
    net = copy.deepcopy(net)
    layers = list(net)
    with torch.no_grad():
        for i, module in enumerate(layers):
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                module.weight.mul_(4.0)
            if isinstance(module, nn.BatchNorm3d):
                folded = linear_op(layers[i - 1], str(i - 1), module).bias
                module.bias.sub_(folded + 0.5 * folded.abs())  # folded bias -> -0.5 |folded bias|
            elif isinstance(module, nn.Linear) and module is not layers[-1]:
                module.bias.copy_(-module.bias.abs())
    return net


@pytest.mark.parametrize("name", ["gamma0.25_nobias", "epsilon_gamma_box_nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bias_free_gamma_equals_zennit(small_net, name, dtype, threads):
    """Bias-free gamma (zennit: Gamma(zero_params='bias')) keeps zennit's choice of case by the sign of the biased
    output z_j; where a positive bias alone makes z_j > 0, the bias-free denominator can be ~0 (on ``small_net``:
    down to 6e-6 against a median of 0.12), so rounding is amplified up to 1/stabiliser and no float32 map is
    accurate to 1e-6 there -- zennit's own float32 map differs from its float64 map by 4e-4. The exact comparison,
    with the tolerances above, uses the network with non-positive hidden biases; the next test covers small_net."""
    _assert_equals_zennit(_nonpositive_bias_net(small_net), lambda x: _named_pair(name, x), dtype, check_once=True)


@pytest.mark.parametrize("name", ["gamma0.25_nobias", "epsilon_gamma_box_nobias"])
def test_bias_free_gamma_on_a_bias_driven_network(small_net, name):
    """On ``small_net`` (randomised BatchNorm shifts as large as the activations) float64 agrees to 1e-10 (3e-12
    measured): float64 rounding amplified by denominators near zero (see above), not a different rule."""
    net = copy.deepcopy(small_net).double()
    x = torch.randn(3, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    spec, composite = _named_pair(name, x)
    ours = LRP(net).trace(x).relevance(spec)
    reference = _zennit_relevance(bn_folded_copy(net), x.clone(), composite, ours.target)
    assert _relative(ours.relevance, reference, reference.abs().max()) < 1e-10


def test_bias_free_rules_conserve_relevance():
    """Bias-free alpha-beta and z+ conserve relevance layer by layer in a network whose biases are not zero, as long
    as no output has an all-zero positive (alpha-beta: or negative) denominator. That is guaranteed here: strictly
    positive input, every hidden pre-activation positive (checked), so every conv/linear layer sees strictly positive
    input; no padding (zero padding would leave edge outputs whose positive weights all fall on padded zeros); and
    every filter has positive and negative weights (checked)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.AvgPool3d(2), nn.Conv3d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 27, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():  # biases large against the (halved) weighted sums: every pre-activation is positive
        for m in net:
            if hasattr(m, "bias"):
                m.bias.uniform_(1.0, 2.0)
                m.weight.mul_(0.5)
    x = torch.rand(2, 1, 12, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.1
    h = x
    for m in net:
        if hasattr(m, "weight"):
            w = m.weight.flatten(1)
            assert bool((w > 0).any(1).all()) and bool((w < 0).any(1).all())
        h = m(h)
        if isinstance(m, nn.ReLU):
            assert bool((h > 0).all())
    trace = LRP(net).trace(x)
    for preset in ("a1b0_nobias", "a2b1_nobias", "zplus_nobias"):
        result = trace.relevance(preset)
        assert torch.allclose(result.conservation, torch.ones(2, dtype=torch.float64), atol=1e-5), preset
    assert bool(((trace.relevance("a1b0").conservation - 1).abs() > 1e-3).all())  # the biases do absorb relevance


def test_hand_computed_gamma():
    lin = nn.Linear(2, 1, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5]))
    net = nn.Sequential(lin).double().eval()
    gamma = Composite([("*", Gamma(0.25))])
    # z = 6 - 1 + 0.5 = 5.5 > 0: u = w + 0.25 w+ = (2.5, -1), bu = 0.625, denominator 7.5 - 1 + 0.625 = 7.125
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    r = LRP(net)(x, gamma, target=0).relevance
    assert torch.allclose(r, torch.tensor([[7.5 * 5.5 / 7.125, -1 * 5.5 / 7.125]], dtype=torch.float64))
    r = LRP(net)(x, gamma.without_bias(), target=0).relevance  # bias-free: denominator 6.5, sum = z
    assert torch.allclose(r, torch.tensor([[7.5 * 5.5 / 6.5, -1 * 5.5 / 6.5]], dtype=torch.float64))
    # z = 2 - 3 + 0.5 = -0.5 < 0: v = w + 0.25 w- = (2, -1.25), bv = 0.5, denominator 2 - 3.75 + 0.5 = -1.25
    x = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    r = LRP(net)(x, gamma, target=0).relevance
    assert torch.allclose(r, torch.tensor([[2 * -0.5 / -1.25, -3.75 * -0.5 / -1.25]], dtype=torch.float64))


def test_bias_free_preset_names():
    for name in ("a2b1_nobias", "a1.5b0.5_nobias", "epsilon_gamma_box_nobias", "epsilon_plus_flat_nobias"):
        composite = get_composite(name)
        assert composite.name == name and all(rule.zero_bias for _, rule in composite.rules)
    assert not any(rule.zero_bias for _, rule in get_composite("epsilon_gamma_box").rules)
    assert isinstance(get_composite("epsilon_gamma_box").rules[1][1], Gamma)
    for bad in ("nope_nobias", "_nobias", "a2b1_nobias_nobias"):
        with pytest.raises(ValueError, match="unknown LRP composite"):
            get_composite(bad)


@pytest.mark.parametrize("conv", [{"padding": 1}, {"padding": 0}, {"padding": 2},
                                  {"padding": (0, 2, 1), "dilation": (2, 1, 1)}, {"padding": 1, "stride": 2}], ids=str)
def test_fast_transposes_equal_the_generic_ones(conv):
    """Stride-1 3D transposes on large volumes run as flipped forward convolutions, and the flat rule as separable
    box sums: both must equal the transposed convolution (autograd's) for every padding/dilation they accept."""
    torch.manual_seed(6)
    module = nn.Conv3d(2, 5, 3, **conv).double()
    op = linear_op(module, "conv")
    x = torch.randn(2, 2, 32, 24, 24, dtype=torch.float64)
    s = torch.randn_like(op.forward(x, op.weight))
    generic = torch.nn.grad.conv3d_input(x.shape, op.weight, s, **op.kwargs)
    assert torch.allclose(op.transpose(s, op.weight, x.shape), generic, rtol=0, atol=1e-12)
    flat = Flat()
    ones = torch.ones_like(op.weight[:1])
    z = op.forward(torch.ones_like(x[:1]), ones)
    expected = torch.nn.grad.conv3d_input(x.shape, ones, s.sum(1, keepdim=True) / (z + 1e-6), **op.kwargs)
    assert torch.allclose(flat.backward(op, x, s, flat.stats(op, x)), expected.expand(x.shape), rtol=0, atol=1e-12)


def test_gamma_after_a_relu_computes_one_case_and_falls_back_when_needed(small_net):
    """Where a ReLU follows a layer, the gamma rule's stats hold the first case only (z > 0 read off the ReLU's
    output); the map equals the two-case computation, also when relevance reaches outputs with z <= 0 (a flat rule
    above, not proportional to its input) and in the single-map path."""
    x = torch.randn(2, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for spec in ("epsilon_gamma_box", Composite([("*", Gamma(0.25))], "gamma"),
                 Composite([("last", Flat()), ("*", Gamma(0.25))], "flat_top")):
        trace = LRP(small_net).trace(x)
        ours = trace.relevance(spec, target=1).relevance
        halves = [st for key, st in trace._stats.items() if key[2] == "gamma" and "positive" in st]
        assert len(halves) >= 2 and all(st["weight"].shape[0] == st["inv"].shape[1] for st in halves)
        both = LRP(small_net).trace(x)
        both._sign_sources = {}  # no sign known: both cases, as before
        reference = both.relevance(spec, target=1).relevance
        assert all("positive" not in st for key, st in both._stats.items() if key[2] == "gamma")
        tol = float(reference.abs().max()) * 1e-12
        assert torch.allclose(ours, reference, rtol=0, atol=tol)
        assert torch.allclose(LRP(small_net)(x, spec, target=1).relevance, reference, rtol=0, atol=tol)
