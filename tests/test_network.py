import pytest
import torch
from torch import nn

from scripts.runtime.network import PretermCNN, flat_features, from_torchscript


def test_shapes_and_derived_fc_size():
    net = PretermCNN(spatial_shape=(64, 48, 48), channels=(4, 8, 16), hidden=12)
    assert flat_features((64, 48, 48), (4, 8, 16)) == 16 * 8 * 6 * 6
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and linears[0].in_features == 16 * 8 * 6 * 6 and linears[1].out_features == 2
    out = net.eval()(torch.randn(3, 1, 64, 48, 48))
    assert out.shape == (3, 2)


def test_blocks_are_modules_in_execution_order():
    net = PretermCNN(spatial_shape=(32, 32, 32), channels=(4, 8))
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv3d", "BatchNorm3d", "ReLU", "AvgPool3d"] * 2 + ["Flatten", "Linear", "ReLU", "Linear"]
    conv = net[0]
    assert conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1)
    assert net[3].kernel_size == 2 and net[3].stride == 2


def test_default_is_the_bundle_input():
    net = PretermCNN()
    assert net.spatial_shape == (128, 96, 96)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 128, 96, 96)).shape == (1, 2)


def test_bad_inputs_and_settings():
    net = PretermCNN(spatial_shape=(32, 32, 32), channels=(4,))
    with pytest.raises(ValueError, match="5D"):
        net(torch.zeros(1, 32, 32, 32))
    with pytest.raises(ValueError, match="spatial shape"):
        net(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        PretermCNN(spatial_shape=(8, 8, 8), channels=(4, 4, 4, 4))


@pytest.mark.parametrize("kwargs", [dict(spatial_shape=(32, 24, 24), channels=(4, 8), hidden=8),
                                    dict(spatial_shape=(16, 16, 16), channels=(3,), hidden=5, dropout=0.3)])
def test_from_torchscript_rebuilds_the_exported_network(kwargs):
    torch.manual_seed(0)
    eager = PretermCNN(**kwargs).eval()
    for m in eager.modules():  # non-trivial BatchNorm statistics, so that a lost buffer would show
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    scripted = torch.jit.script(eager)
    rebuilt = from_torchscript(scripted)
    assert not isinstance(rebuilt, torch.jit.ScriptModule)
    assert [type(m) for m in rebuilt] == [type(m) for m in eager]
    x = torch.randn(2, 1, *kwargs["spatial_shape"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), scripted(x))
    with pytest.raises(ValueError, match="not an exported PretermCNN"):
        from_torchscript(torch.jit.script(nn.Sequential(nn.Linear(3, 2))))
