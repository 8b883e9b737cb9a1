"""The streaming daemon: watcher -> reader -> poser -> accumulator -> publishers.

Built on :mod:`cryofastar.engine`, :mod:`cryofastar.model` and :mod:`cryofastar.recon`; adds no maths.

- :mod:`~cryofastar.daemon.pipeline`: :class:`~cryofastar.daemon.pipeline.Daemon`, the threads
  and bounded queues that wire it together, and its read-only API for callers
  (:mod:`~cryofastar.daemon.settings`: what can be set; never changed by the daemon);
- :mod:`~cryofastar.daemon.pose_source`: the network, map-only or classes: the effective source of poses;
- :mod:`~cryofastar.daemon.watcher`: complete particle files under a directory (inotify or polling);
- :mod:`~cryofastar.daemon.ingest`: checks a file, lists its new particles, reads their images;
- :mod:`~cryofastar.daemon.journal`: which particles the session holds;
- :mod:`~cryofastar.daemon.batching`: gathers particles into forward calls;
- :mod:`~cryofastar.daemon.state`: the accumulated session, its checkpoint and output files;
- :mod:`~cryofastar.daemon.schedule`: when the map is published and the checkpoint written;
- :mod:`~cryofastar.protocol` / :mod:`~cryofastar.daemon.broadcast` / :mod:`~cryofastar.daemon.publisher`:
  the ZeroMQ stream (messages, what the session sends, the socket);
- :mod:`~cryofastar.daemon.reporting`: the status message's body (counts, rate, view directions);
- :mod:`~cryofastar.daemon.rejections`: ``rejected.tsv`` and the recent rejections;
- :mod:`~cryofastar.daemon.metrics`: Prometheus metrics;
- :mod:`~cryofastar.daemon.rank_sync` / :mod:`~cryofastar.daemon.rank_worker`: one session on several
  ranks (``watch --nproc``): how rank 0's daemon and the other ranks meet, and what the others run.

Posing and refinement are the session engine's (:mod:`cryofastar.engine`: the same recipe
and policy as the offline job); the long-running services around the daemon (``watch``
with its dashboard, the ``demo``) are in :mod:`cryofastar.services`.
"""
