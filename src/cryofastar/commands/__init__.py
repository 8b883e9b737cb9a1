"""One module per CLI command; each exposes ``main(...)`` called by :mod:`cryofastar.cli`."""
