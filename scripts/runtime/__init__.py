"""What the configs use at run time. The configs reach it through their ``runtime`` item,

    "runtime": "$sys.path.insert(0, os.path.abspath(@bundle_root)) or load_module('scripts.runtime')"

which puts ``bundle_root`` on ``sys.path`` before anything imports the bundle's package, so that ``monai.bundle run``
and ``ConfigWorkflow`` work from any folder (MONAI adds the bundle root to ``sys.path`` only in ``run()``, after
``initialize()`` has resolved the config). Expressions then read ``@runtime.checks.check_bool(...)`` and components
``"_target_": "$@runtime.handlers.LRPHandler"``.

The modules load on first attribute access (PEP 562), so that importing one of them (the apps import only
``scripts.runtime.explain``) does not also load the handlers, the report and matplotlib.
"""

from importlib import import_module

__all__ = ["checks", "datalist", "errors", "handlers", "monitor", "network", "outputs", "qc", "report"]


def __getattr__(name: str):
    if name in __all__:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
