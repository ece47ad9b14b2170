"""Import zennit as a test oracle.

zennit 0.5.1's package ``__init__`` imports ``zennit.torchvision`` (ResNet canonizers), which imports
torchvision; PyPI torchvision does not import beside the torch 2.13.0 CPU wheel used here. None of the zennit
code used by the tests touches torchvision, so when it is missing a stand-in module with the two class names
that import needs is registered first. Returns None when zennit itself is not installed.
"""

from __future__ import annotations

import importlib
import sys
import types


def import_zennit():
    try:
        importlib.import_module("torchvision.models.resnet")
    except Exception:
        for name in ("torchvision", "torchvision.models", "torchvision.models.resnet"):
            sys.modules.pop(name, None)
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.Bottleneck = type("Bottleneck", (), {})
        resnet.BasicBlock = type("BasicBlock", (), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        tv = types.ModuleType("torchvision")
        tv.models = models
        sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.models.resnet": resnet})
    try:
        import zennit  # noqa: F401
        import zennit.attribution
        import zennit.canonizers
        import zennit.composites
        import zennit.rules
    except ImportError:
        return None
    return zennit
