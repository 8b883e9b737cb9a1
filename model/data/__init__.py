"""Data for training and evaluating the network: real protein structures pinned from PyPI.

See :mod:`cryofastar.model.data.structures` and model/TRAINING_DATA.md.
"""
