"""The rules by which 3D Slicer's MONAI Label plugin turns a server's ``/info`` and infer replies into selectors,
segments and requests, mirrored line by line from plugins/slicer/MONAILabel/MONAILabel.py of Project-MONAI/MONAILabel
at commit 058ddfc45ac52c2cae7783e2cadac0efeb2a9647 (line numbers of that file). Slicer itself cannot run here (no
display); these functions are what the tests check the app's answers against.
"""

from __future__ import annotations

PLUGIN_COMMIT = "058ddfc45ac52c2cae7783e2cadac0efeb2a9647"

# L562-564 (section titles from Resources/UI/MONAILabel.ui):
#   self.updateSelector(self.ui.segmentationModelSelector, ["segmentation", "detection"], "SegmentationModel", 0)
#   self.updateSelector(self.ui.deepgrowModelSelector, ["deepgrow", "deepedit"], "DeepgrowModel", 0)
#   self.updateSelector(self.ui.scribblesMethodSelector, ["scribbles"], "ScribblesMethod", 0)
SELECTORS = {
    "Auto Segmentation": ("segmentation", "detection"),
    "SmartEdit": ("deepgrow", "deepedit"),
    "Scribbles": ("scribbles",),
}


def selector_items(info: dict, model_types) -> list[str]:
    """L768-770 (updateSelector):
        for model_name, model in self.models.items():
            if model["type"] in model_types:
                selector.addItem(model_name)
    (``self.models`` is ``info["models"]``, L1143-1149 of fetchInfo)."""
    return [name for name, model in info["models"].items() if model["type"] in model_types]


def selectors(info: dict) -> dict[str, list[str]]:
    """Which models each selector of the plugin lists."""
    return {title: selector_items(info, types) for title, types in SELECTORS.items()}


def next_sample_segments(info: dict) -> list[str]:
    """The empty segments initSample creates after Next Sample, L1384-1385 and L1857-1859:
        if self.info.get("labels"):
            self.updateSegmentationMask(None, self.info.get("labels"))
        ...
            for label in labels:
                if not segmentation.GetSegmentIdBySegmentName(label):
                    segmentation.AddEmptySegment(label, label, self.getLabelColor(label))"""
    return list(info["labels"]) if info.get("labels") else []


def auto_run_model(info: dict) -> tuple[str, str] | None:
    """The auto-run rule of initSample after Next Sample (setting on by default), L1391-1397:
        for label in self.info.get("labels", []):
            for name, model in self.models.items():
                if label in model.get("labels", []):
                    qt.QApplication.restoreOverrideCursor()
                    self.ui.segmentationModelSelector.currentText = name
                    self.onClickSegmentation()
                    return
    and onClickSegmentation L1639: ``model = self.ui.segmentationModelSelector.currentText``.

    Returns (model the rule picked, model name the infer request is sent with), or None when nothing runs. Setting
    ``currentText`` of a non-editable QComboBox selects the matching item if there is one and otherwise leaves the
    current item, which updateSelector set to index 0 in a fresh session (L773-777), or none ("") for an empty
    selector."""
    items = selector_items(info, SELECTORS["Auto Segmentation"])
    current = items[0] if items else ""
    for label in info.get("labels", []):
        for name, model in info["models"].items():
            if label in model.get("labels", []):
                return name, (name if name in items else current)
    return None


def infer_params(info: dict, model: str) -> dict:
    """The params the plugin sends: getParamsFromConfig L907-915 (first value of each list in the model's config)
        nameConfig = sectionConfig.get(name, {}).get("config", {})
        return {k: v[0] if isinstance(v, list) else v for k, v in nameConfig.items()}
    then MONAILabelLogic.infer L2473-2474:
        params["result_extension"] = ".nrrd"  # expect .nrrd
        params["result_dtype"] = "uint8\""""
    config = info["models"].get(model, {}).get("config", {})
    params = {k: v[0] if isinstance(v, list) else v for k, v in config.items()}
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    return params


def strategy_params(info: dict, strategy: str) -> dict:
    """getParamsFromConfig("activelearning", strategy), L1287 of onNextSampleButton:
        sample = self.logic.next_sample(strategy, self.getParamsFromConfig("activelearning", strategy))"""
    config = info["strategies"].get(strategy, {}).get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def result_segment_names(info: dict, model: str, params: dict) -> list[str]:
    """The segment each label value 1..N of a result goes to, L1646-1650 of onClickSegmentation:
        labels = (
            params.get("label_names") if params and params.get("label_names") else self.models[model].get("labels")
        )
        if labels and isinstance(labels, dict):
            labels = [k for k, _ in sorted(labels.items(), key=lambda item: item[1])]
    then L1886 of updateSegmentationMask ``labels = [label for label in labels if label != "background"]`` and
    ImportLabelmapToSegmentationNode(labelmapVolumeNode, segmentationNode, segmentIds) with segmentIds = labels,
    which maps label values 1..N to those segment IDs (Slicer's vtkSlicerSegmentationsModuleLogic.h)."""
    labels = params.get("label_names") if params and params.get("label_names") else info["models"][model].get("labels")
    if labels and isinstance(labels, dict):
        labels = [k for k, _ in sorted(labels.items(), key=lambda item: item[1])]
    return [label for label in labels if label != "background"]


def strategy(info: dict) -> str:
    """The Next Sample strategy of a fresh session, L637-642 (updateGUIFromParameterNode):
        for strategy in self.info.get("strategies", {}):
            self.ui.strategyBox.addItem(strategy)
        ...
        self.ui.strategyBox.setCurrentIndex(self.ui.strategyBox.findText(currentStrategy) if currentStrategy else 0)
    and L1282 ``strategy = self.ui.strategyBox.currentText``."""
    return next(iter(info.get("strategies", {})), "")
