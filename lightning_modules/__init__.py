"""Anomaly-segmentation methods, one per file, over a shared base (``base.py``)."""
