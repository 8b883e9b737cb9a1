"""The streaming daemon: watcher -> reader -> poser -> accumulator -> publishers.

Built on :mod:`cryofastar.recon` and :mod:`cryofastar.model`; adds no maths.

- :mod:`~cryofastar.daemon.watcher`: complete particle files under a directory (inotify or polling);
- :mod:`~cryofastar.daemon.ingest`: checks a file, lists its new particles, reads their images;
- :mod:`~cryofastar.daemon.journal`: which particles the session holds;
- :mod:`~cryofastar.daemon.state`: the accumulated session, its checkpoint and output files;
- :mod:`~cryofastar.daemon.pipeline`: the threads and bounded queues that wire it together
  (:mod:`~cryofastar.daemon.settings`: what can be set);
- :mod:`~cryofastar.protocol` / :mod:`~cryofastar.daemon.publisher`: the ZeroMQ stream;
- :mod:`~cryofastar.daemon.metrics`: Prometheus metrics;
- :mod:`~cryofastar.services.watch`: the daemon run until a signal or idle, with the live
  dashboard beside it (``cryofastar-stream watch``; the dashboard from :mod:`cryofastar.monitoring`);
- :mod:`~cryofastar.services.demo`: a simulated session with the daemon on it (``cryofastar-stream demo``).
"""
