"""The bundle's Python package: only what MONAI lacks.

``runtime/``     what the configs import at run time: network, datalists and input checks, handlers, outputs, errors,
                 QC and its reference, the registration the preprocessing runs, tissue names, evidence bands, and
                 the explain-and-write core (``explain.py``)
``lrp/``         the LRP engine (pure torch: rules, composites, BatchNorm folding, propagation)
``evaluation/``  the study (cross-validation, final model, test metrics, group maps) and the explanation evaluation
``data/``        the synthetic cohort, dHCP datalists and splits, preprocessing and registration
``label_app/``, ``deploy_app/``  the MONAI Label and MONAI Deploy apps (thin: they call ``runtime.explain``)

Imports only go down these layers (tests/test_layers.py): 1 ``label_app``, ``deploy_app``, ``evaluation`` (which
never import each other) -> 2 ``data`` -> 3 ``runtime`` -> 4 ``lrp``. This module may be imported from anywhere.
"""

from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding configs/, models/ and scripts/
