#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs what is needed, then
#   bash run.sh train   - generates the synthetic cohort, trains, evaluates on the held-out split and writes
#                         predictions + relevance maps (eval/)
#   bash run.sh test    - runs every test: ruff, the main suite, then the MONAI Label and MONAI Deploy apps' tests in
#                         their own environments (nox sessions label and deploy, see noxfile.py); installs Debian's
#                         chromium where missing (the run report's browser test; it skips where that is impossible)
#                         and dcmtk + dicom3tools (the Deploy app's DICOM conformance checks, same rule)
#                         and slurmctld, slurmd, slurm-client, munge (tests/test_slurm.py's one-node SLURM cluster,
#                         same rule) and orthanc, orthanc-dicomweb, iproute2 (tests/label/test_dicomweb.py, same rule)
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

# apt_install WHAT PACKAGES... : Debian packages the tests need (as root, or with password-less sudo); where that is
# impossible the tests that need WHAT skip and say why (REQUIRE_SYSTEM_TESTS=1, set by .ci/run, makes them fail)
apt_install() {
    local what=$1 sudo=""
    shift
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "run.sh: $* cannot be installed without root: the tests of $what will skip" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: no apt-get to install $*: the tests of $what will skip" >&2
        return 0
    fi
    if [ -z "${APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null \
        || echo "run.sh: apt-get could not install $*: the tests of $what will skip" >&2
}

have() {
    local name
    for name in "$@"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$name" >/dev/null 2>&1 || return 1
    done
}

# the system tools of the tests, each installed where missing:
# - headless Chromium for the run report's browser tests (Playwright's Python package pointed at it, no download)
# - dcmtk (dsrdump) and dicom3tools (dciodvfy) for the Deploy app's DICOM tests (tests/deploy/test_deploy_dicom.py)
# - slurmctld, slurmd, slurm-client and munge for the one-node SLURM cluster of tests/slurm_cluster.py (it starts and
#   stops its own daemons with a config in a temporary folder; nothing is configured system-wide)
# - orthanc + orthanc-dicomweb (a DICOMweb server for the Label app's test, started and stopped by the test in a
#   network namespace of its own; nothing is configured system-wide) and iproute2 (ip, for that namespace's loopback)
ensure_system_tools() {
    [ -n "${CHROMIUM:-}" ] || have chromium || have chromium-browser || apt_install "the run report in a browser" chromium
    have dciodvfy dsrdump || apt_install "the DICOM outputs" dcmtk dicom3tools
    have slurmctld slurmd sbatch srun munged || apt_install "SLURM" --no-install-recommends slurmctld slurmd slurm-client munge
    { have Orthanc ip && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } \
        || apt_install "MONAI Label on a DICOMweb server" --no-install-recommends orthanc orthanc-dicomweb iproute2
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
        ensure_system_tools
        shift || true
        # lint: the model zoo's pre-commit hooks and ruff, offline (.pre-commit-config.yaml); a hook that fixes a file
        # fails the run
        PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/pre-commit" run --all-files --show-diff-on-failure
        # --durations: the slowest tests in the log, to keep CI under its 45-minute goal
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=30 tests "$@"
        "$VENV/bin/nox" -s label deploy ;;
    freeze)
        { sed -n '/^# ---/q;p' constraints.txt; echo "# ---"; "$VENV/bin/python" -m pip freeze | sed 's/+cpu$//'; } \
            > constraints.txt.new && mv constraints.txt.new constraints.txt ;;
    *)
        echo "usage: bash run.sh {train|test|setup|freeze}" >&2
        exit 2 ;;
esac
