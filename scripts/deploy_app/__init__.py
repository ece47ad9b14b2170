"""MONAI Deploy App SDK application of the bundle: ``python scripts/deploy_app -i <NIfTI or folder> -o <output>
-m models/model.ts`` (``app.py`` composes the operators of ``operators.py``)."""
