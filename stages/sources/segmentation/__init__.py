"""Loader of the lung segmentation data sets (the lung_masks layout: images/ + masks/);
``download@segmentation`` depends on this folder, never on ``../classification`` or
``../detection``.

Inputs/Outputs: none (a package).
Run: no CLI.
"""
