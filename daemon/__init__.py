"""The streaming daemon: watcher -> reader -> batcher -> model -> accumulator -> publishers.

Built on :mod:`cryofastar.recon` and :mod:`cryofastar.model`; adds no maths.
(The pipeline lands with the streaming-daemon issue; this package is empty until then.)
"""
