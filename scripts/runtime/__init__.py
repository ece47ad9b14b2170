"""What the configs use at run time. The configs reach it through their ``runtime`` item,

    "runtime": "$sys.path.insert(0, os.path.abspath(@bundle_root)) or load_module('scripts.runtime')"

which puts ``bundle_root`` on ``sys.path`` before anything imports the bundle's package, so that ``monai.bundle run``
and ``ConfigWorkflow`` work from any folder (MONAI adds the bundle root to ``sys.path`` only in ``run()``, after
``initialize()`` has resolved the config). Expressions then read ``@runtime.checks.check_bool(...)`` and components
``"_target_": "$@runtime.handlers.LRPHandler"``.
"""

from scripts.runtime import checks, datalist, errors, handlers, monitor, network, outputs, qc, report

__all__ = ["checks", "datalist", "errors", "handlers", "monitor", "network", "outputs", "qc", "report"]
