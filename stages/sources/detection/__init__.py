"""Loaders of the detection data sets (ChestX-Det10 JSON, NIH ChestX-ray14 BBox_List_2017.csv);
``download@detection`` depends on this folder, never on ``../classification``.

Inputs/Outputs: none (a package).
Run: no CLI.
"""
