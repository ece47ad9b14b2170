"""The tissue names: the dHCP drawem9 labels (0 outside the brain mask).

The localisation measure names its regions with them (``scripts.runtime.localisation``: the run report's and the
study's tissue tables); the synthetic cohort (``scripts/data/synthetic_anatomy.py``) draws its label maps in them.
"""

from __future__ import annotations

__all__ = ["BACKGROUND", "BRAINSTEM", "CEREBELLUM", "CGM", "CSF", "DGM", "DRAWEM9", "HIPPO", "VENTRICLES", "WM"]

DRAWEM9 = {
    1: "csf",
    2: "cortical_gm",
    3: "white_matter",
    4: "background",
    5: "ventricles",
    6: "cerebellum",
    7: "deep_gm",
    8: "brainstem",
    9: "hippocampus_amygdala",
}
CSF, CGM, WM, BACKGROUND, VENTRICLES, CEREBELLUM, DGM, BRAINSTEM, HIPPO = range(1, 10)
