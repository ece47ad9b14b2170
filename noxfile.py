"""Environments of their own for the MONAI Label and MONAI Deploy apps, whose pins conflict with each other and
with the main environment (MONAI Label: numpy<2, pydicom<3, torch 2.14.1 + torchvision 0.29.1; MONAI Deploy:
Holoscan, pydicom 3, highdicom). ``bash run.sh test`` runs both sessions after the main tests:

    .venv/bin/nox -s label deploy
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTEST = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider")


@nox.session
def label(session):
    """MONAI Label 0.8.5 app: in-process BundleInferTask and ``monailabel start_server`` HTTP tests."""
    session.install("torch==2.14.1", "torchvision==0.29.1")
    session.install("-r", "requirements.txt", "-r", "requirements-label.txt")
    session.install("--no-deps", "monailabel==0.8.5")
    session.run(*PYTEST, "tests/label", *session.posargs)


@nox.session
def deploy(session):
    """MONAI Deploy App SDK 4.0 app, run as ``python scripts/deploy_app -i -o -m models/model.ts``."""
    session.install("torch==2.13.0")
    session.install("-r", "requirements.txt", "-r", "requirements-deploy.txt")
    session.run(*PYTEST, "tests/deploy", *session.posargs)
