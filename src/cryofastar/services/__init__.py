"""What the long-running commands run: compositions of several layers, below the command line.

- :mod:`~cryofastar.services.watch`: the daemon run until a signal or an idle timeout, with
  the live web dashboard beside it (``cryofastar-stream watch``);
- :mod:`~cryofastar.services.demo`: a simulated microscope session with the daemon and the
  dashboard on it, and its figures against the truth (``cryofastar-stream demo``).

They sit above :mod:`cryofastar.daemon` and :mod:`cryofastar.monitoring` (the daemon
never starts a dashboard itself), so that each of those keeps to its own layer.
"""
