"""The session engine: one recipe for posing a particle set and one policy for finishing poses against the map.

Used alike by the offline job (``cryofastar-stream reconstruct``), the streaming daemon
and the benchmarks, so that a rule exists once:

- :mod:`~cryofastar.engine.posing`: "pose a particle set": the network's recipe (model
  box, session reference chosen by confidence, one session frame, poses in Å) and the
  random start of map-only sessions, behind one interface;
- :mod:`~cryofastar.engine.policy`: the rules of refinement shared by both paths (is
  the network informative, how many ab initio passes, when ab initio's poses need local
  rounds);
- :mod:`~cryofastar.engine.offline`: the offline job on a whole particle set: poses,
  refinement rounds, ab initio when the network is uninformative, the maps;
- :mod:`~cryofastar.engine.distributed`: a job's ranks (``reconstruct --nproc``, ``watch --nproc``,
  ``torchrun``): the split of the particles, the all-reduce (or reduce) of the half-set grids, the gathers;
- :mod:`~cryofastar.engine.rank_posing`: the first poses another rank of a live session gives its
  share (rank 0's policy for a pass in a hurry);
- :mod:`~cryofastar.engine.streaming_refiner`: the same policy applied pass by pass
  to a growing session (the daemon's refinement);
- :mod:`~cryofastar.engine.live_refinement`: that policy carried out on the live map
  (each pass refined, old particles re-posed by exact remove + add, the ab initio
  bootstrap and the class poses' probe beside the stream);
- :mod:`~cryofastar.engine.background_step`: one long computation in a worker thread,
  its result applied by the thread that owns the map;
- :mod:`~cryofastar.engine.pose_table`: the one pose table of both paths, and the pose
  columns of every ``particles.star`` they write.

Built on :mod:`cryofastar.model` and :mod:`cryofastar.recon`; knows nothing of threads,
queues, watchers or publishers (docs/architecture.md).
"""
