"""Loaders of the classification data sets (Kermany, PneumoniaMNIST, COVID-19 Radiography, any
ImageFolder); ``download@classification`` depends on this folder, never on ``../detection``.

Inputs/Outputs: none (a package).
Run: no CLI.
"""
