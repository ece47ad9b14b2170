"""This bundle's unit test in the MONAI model zoo's own style (model-zoo ci/unit_tests/test_<bundle>.py): generated
data, ``ConfigWorkflow`` for train, train+evaluate and inference, each through the zoo's ``check_workflow`` with
``check_properties``. The zoo's unchanged runner runs it from a folder that holds ``models/preterm_lrp`` (a copy of
the bundle), with the bundle root not on ``sys.path`` (tests/test_model_zoo.py)::

    python ci/unit_tests/runner.py -b preterm_lrp
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from monai.bundle import ConfigWorkflow
from utils import check_workflow

BUNDLE = "models/preterm_lrp"
# a small network and volume so that the test takes seconds (the model zoo's tests shrink spatial sizes the same way)
TINY = {"spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8, "report": False}

TEST_CASE_1 = [{"bundle_root": BUNDLE, "num_epochs": 1, **TINY}]  # train, evaluate
TEST_CASE_2 = [{"bundle_root": BUNDLE, **TINY}]  # inference


def test_order(test_name1, test_name2):
    def get_order(name):
        if "train" in name:
            return 1
        if "eval" in name:
            return 2
        if "infer" in name:
            return 3
        return 4

    return get_order(test_name1) - get_order(test_name2)


class TestPretermLRP(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.given = os.environ.get("PRETERM_ZOO_DATASET")  # a synthetic cohort made already (tests/test_model_zoo.py)
        if cls.given:
            cls.dataset_dir = cls.given
            return
        # the bundle's own data-preparation command, run as a user runs it (from the bundle root)
        cls.dataset_dir = tempfile.mkdtemp()
        cmd = [sys.executable, "-m", "scripts.data.synthetic", "--output", cls.dataset_dir, "--subjects", "16",
               "--seed", "3", "--preterm-fraction", "0.4", "--folds", "3", "--test-fraction", "0.25", "--workers", "1"]
        subprocess.run(cmd, cwd=BUNDLE, check=True)

    @classmethod
    def tearDownClass(cls):
        if not cls.given:
            shutil.rmtree(cls.dataset_dir)

    def _workflow(self, config_file, workflow_type, override):
        bundle_root = override["bundle_root"]
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=config_file,
            logging_file=os.path.join(bundle_root, "configs/logging.conf"),
            meta_file=os.path.join(bundle_root, "configs/metadata.json"),
            **{**override, "dataset_dir": self.dataset_dir},
        )

    def test_train_eval_config(self):
        override = dict(TEST_CASE_1[0])
        train_file = os.path.join(BUNDLE, "configs/train.json")
        eval_file = os.path.join(BUNDLE, "configs/evaluate.json")
        check_workflow(self._workflow(train_file, "train", override), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(BUNDLE, "models", "model.pt")))
        # override train.json, thus set the workflow to "train" rather than "eval" (as the model zoo's tests do)
        check_workflow(self._workflow([train_file, eval_file], "train", override), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(BUNDLE, "eval", "metrics.csv")))

    def test_infer_config(self):
        override = dict(TEST_CASE_2[0])
        inferrer = self._workflow(os.path.join(BUNDLE, "configs/inference.json"), "infer", override)
        check_workflow(inferrer, check_properties=True)
        with open(os.path.join(self.dataset_dir, "datalist.json")) as f:
            test_subjects = len(json.load(f)["test"])
        with open(os.path.join(BUNDLE, "eval", "predictions.csv")) as f:
            self.assertEqual(len(f.read().splitlines()), 1 + test_subjects)  # header + one row per test subject


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
