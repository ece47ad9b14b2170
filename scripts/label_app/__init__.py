"""MONAI Label app that serves this bundle (``main.py``) and its two inference tasks (``tasks.py``)."""
