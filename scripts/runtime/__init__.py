"""What the configs use at run time. The configs reach it through their ``runtime`` item,

    "runtime": "$sys.path.insert(0, os.path.abspath(@bundle_root)) or load_module('scripts.runtime')"

which puts ``bundle_root`` on ``sys.path`` before anything imports the bundle's package, so that ``monai.bundle run``
and ``ConfigWorkflow`` work from any folder (MONAI adds the bundle root to ``sys.path`` only in ``run()``, after
``initialize()`` has resolved the config). Expressions then read ``@runtime.checks.check_bool(...)`` and components
``"_target_": "$@runtime.handlers.LRPHandler"``.

The modules load on first attribute access (PEP 562), so that importing one of them (the apps import only
``scripts.runtime.explain``) does not also load the handlers, the report and matplotlib.

Importing the package also silences two notices MONAI prints that tell a user of this bundle nothing they can act
on (exactly these messages, nothing else):

- ``parsing config_file ...: any "_target_" value ... Only proceed if this config is from a source you trust``:
  MONAI's ``create_workflow`` warns on every config it parses; the configs here are the bundle's own.
- ``Detected deprecated name 'optional_packages_version' ...``: the MONAI metadata schema the model zoo validates
  against (meta_schema_20240725) still *requires* that key in ``configs/metadata.json`` beside
  ``required_packages_version``, and MONAI warns whenever it reads it.

They are gone wherever the bundle's code is imported before MONAI reads a config (the study and the evaluation
commands, which run workflows in-process, the apps). ``python -m monai.bundle run`` shows each once: it emits
them before it evaluates anything of the config, so before this import can filter them.
"""

import warnings
from importlib import import_module

__all__ = ["checks", "consistency", "datalist", "distributed", "errors", "explain", "handlers", "monitor", "network",
           "normalisation", "outputs", "qc", "report", "transforms"]

warnings.filterwarnings("ignore", message=r"parsing config_file .* Only proceed if this config is from a source you "
                        r"trust", category=UserWarning)
warnings.filterwarnings("ignore", message=r"Detected deprecated name 'optional_packages_version' in configuration "
                        r"file", category=UserWarning)


def __getattr__(name: str):
    if name in __all__:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
