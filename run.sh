#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs what is needed, then
#   bash run.sh train   - generates the synthetic cohort, trains, evaluates on the held-out split and writes
#                         predictions + relevance maps (eval/)
#   bash run.sh test    - runs every test: ruff, the main suite, then the MONAI Label and MONAI Deploy apps' tests in
#                         their own environments (nox sessions label and deploy, see noxfile.py); installs Debian's
#                         chromium where missing (the run report's browser test; it skips where that is impossible)
#                         and dcmtk + dicom3tools (the Deploy app's DICOM conformance checks, same rule)
#                         and slurmctld, slurmd, slurm-client, munge (tests/test_slurm.py's one-node SLURM cluster,
#                         same rule)
#   bash run.sh setup   - only the environment
#   bash run.sh freeze  - rewrites constraints.txt from .venv (after a deliberate upgrade)
# The main environment is installed with constraints.txt: the exact versions the tests ran with.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local pip="$VENV/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt"
    # torch 2.13.0 first, so that nothing below pulls another torch version or build. Which build pip takes depends
    # on its configuration: on the machines these docs were measured on, pip's find-links serve the CPU wheel
    # (2.13.0+cpu) from local disk; elsewhere torch==2.13.0 comes from PyPI, which on Linux x86_64 is the CUDA build
    # (large CUDA libraries; it also runs without a GPU). For the CPU wheel there, point pip at PyTorch's CPU package
    # index as well, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash run.sh setup
    $pip "torch==2.13.0"
    $pip -r requirements.txt
    if [ "${1:-}" = "dev" ]; then
        $pip -r requirements-dev.txt
        # zennit (test oracle) imports torchvision only for its ResNet canonizers; PyPI torchvision does not
        # import beside the torch 2.13.0 CPU wheel, so zennit goes in without dependencies (tests/zennit_oracle.py)
        $pip --no-deps "zennit==0.5.1"
    fi
}

# headless Chromium for the run report's browser test (tests/test_report.py, through Playwright's Python package
# pointed at this browser: no browser download); without root or apt-get the test skips and says why
ensure_chromium() {
    if [ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "run.sh: chromium is missing and cannot be installed without root: the browser test will skip" >&2
            return 0
        fi
    fi
    if command -v apt-get >/dev/null 2>&1; then
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null \
            || echo "run.sh: apt-get could not install chromium: the browser test will skip" >&2
    else
        echo "run.sh: no apt-get to install chromium: the browser test will skip" >&2
    fi
}

# dcmtk (dsrdump) and dicom3tools (dciodvfy) for the Deploy app's DICOM tests (tests/deploy/test_deploy_dicom.py);
# without root or apt-get those checks skip and say why (REQUIRE_SYSTEM_TESTS=1 makes them fail instead)
ensure_dicom_tools() {
    if command -v dciodvfy >/dev/null 2>&1 && command -v dsrdump >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "run.sh: dciodvfy/dsrdump are missing and cannot be installed without root: those DICOM checks will skip" >&2
            return 0
        fi
    fi
    if command -v apt-get >/dev/null 2>&1; then
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dcmtk dicom3tools \
            >/dev/null || echo "run.sh: apt-get could not install dcmtk dicom3tools: those DICOM checks will skip" >&2
    else
        echo "run.sh: no apt-get to install dcmtk dicom3tools: those DICOM checks will skip" >&2
    fi
}

# slurmctld, slurmd, slurm-client and munge for the tests' one-node SLURM cluster (tests/slurm_cluster.py starts and
# stops its own daemons with a config in a temporary folder; nothing is configured system-wide); without root or
# apt-get the SLURM tests skip and say why
ensure_slurm() {
    local name missing=""
    for name in slurmctld slurmd sbatch srun munged; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$name" >/dev/null 2>&1 || missing="$missing $name"
    done
    if [ -z "$missing" ]; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "run.sh:$missing missing and cannot be installed without root: the SLURM tests will skip" >&2
            return 0
        fi
    fi
    if command -v apt-get >/dev/null 2>&1; then
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
            --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
            || echo "run.sh: apt-get could not install the SLURM packages: the SLURM tests will skip" >&2
    else
        echo "run.sh: no apt-get to install slurmctld slurmd slurm-client munge: the SLURM tests will skip" >&2
    fi
}

case "${1:-}" in
    setup)
        setup dev ;;
    train)
        setup
        B="$VENV/bin/python -m monai.bundle run"
        $B training --config_file configs/train.json
        $B evaluating --config_file "['configs/train.json','configs/evaluate.json']"
        $B inference --config_file configs/inference.json ;;
    test)
        setup dev
        ensure_chromium
        ensure_dicom_tools
        ensure_slurm
        shift || true
        # lint: the model zoo's pre-commit hooks and ruff, offline (.pre-commit-config.yaml); a hook that fixes a file
        # fails the run
        PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/pre-commit" run --all-files --show-diff-on-failure
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
        "$VENV/bin/nox" -s label deploy ;;
    freeze)
        { sed -n '/^# ---/q;p' constraints.txt; echo "# ---"; "$VENV/bin/python" -m pip freeze | sed 's/+cpu$//'; } \
            > constraints.txt.new && mv constraints.txt.new constraints.txt ;;
    *)
        echo "usage: bash run.sh {train|test|setup|freeze}" >&2
        exit 2 ;;
esac
