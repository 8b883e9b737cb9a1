"""Fuzzed files dropped into the watched directory of a real, running daemon (issue 20, item 1).

The daemon (``cryofastar-stream watch DIR --out OUT --poses-from map-only``, a subprocess:
no network) starts on the fuzz campaign's watched tree (bench/fuzz_readers.py: valid
16 px stacks, a stack of another box, one with a NaN image, a symlink out of the tree, a
FIFO, a symlink loop). Once its first map is out, ``--n`` fuzzed files (MRC and STAR, the
campaign's generators, seeded) are renamed into the directory one after the other, with
``--valid`` fresh valid stacks among them. The same files are fed in-process to the same
readers (``plan_particle_file`` + ``chunks``), which says what the daemon should do with
each: reject it, take some of its images and report the rest, or take it whole.

Checks: the daemon keeps running (and exits 0 on SIGINT, after draining); rejected.tsv
lists every file the readers refuse exactly once (and no file they take whole);
particles.star holds every image the readers take exactly once (and nothing else); the
live map equals a fresh ``cryofastar-stream backproject`` of particles.star (the check of
tests/test_e2e_daemon.py).

Run::

    nice -n 10 .venv/bin/python bench/fuzz_daemon.py --n 500 --seed 0

It prints the figures and writes ``bench/results/fuzz_daemon.json``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

_SPEC = importlib.util.spec_from_file_location("fuzz_readers", Path(__file__).with_name("fuzz_readers.py"))
fuzz = importlib.util.module_from_spec(_SPEC)
sys.modules["fuzz_readers"] = fuzz
_SPEC.loader.exec_module(fuzz)

from cryofastar.daemon.ingest import NotParticles, Rejected, SessionGeometry, plan_particle_file  # noqa: E402
from cryofastar.daemon.journal import IngestJournal  # noqa: E402
from cryofastar.recon.io import ParticleFileError, read_volume  # noqa: E402

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
FLAGS = ["--poses-from", "map-only", "--refine-box", "16", "--settle", "0.3", "--flush", "1", "--publish-every", "2",
         "--checkpoint-every", "2", "--batch", "48", "--zmq", "tcp://127.0.0.1:0", "--metrics-port", "0",
         "--device", "cpu"]


def generate(n: int, seed: int, valid_every: int) -> list[tuple[str, bytes, str]]:
    """``n`` fuzzed files (bench/fuzz_readers.py's generators, seeded); every ``valid_every``-th a fresh valid
    stack (a new random 5-image 16 px float32 stack)."""
    files: list[tuple[str, bytes, str]] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz.FUZZED)
    def collect(spec: tuple[str, bytes, str]) -> None:
        if len(files) < n:
            files.append(spec)

    collect()
    for k in range(0, len(files), valid_every):
        files[k] = (".mrcs", fuzz.valid_stack(seed=1000 + k), "in")
    return files


def expected(path: Path, root: Path, geometry: SessionGeometry,
             taken: IngestJournal | None = None) -> tuple[str, set[tuple[str, int]]]:
    """What the daemon's readers do with one file, given the particles the session ``taken`` already:
    ``("rejected" | "partial" | "whole" | "not particles", images taken)``, images as ``(resolved stack,
    1-based index)``. ``"not a regular file"`` for a FIFO or a symlink loop and ``"empty"`` for an empty file:
    the watcher does not hand those on (docs/daemon.md; an empty file is logged). A file none of whose
    particles is new brings nothing and reports nothing (``Daemon._read`` stops there), even repeated rows."""
    if not path.is_file():
        return "not a regular file", set()
    if path.stat().st_size == 0:
        return "empty", set()
    try:
        source, _ = plan_particle_file(path, root, geometry, taken if taken is not None else IngestJournal())
        if len(source) == 0:
            return "whole", set()
        taken: set[tuple[str, int]] = set()
        skipped = 0
        for chunk in source.chunks(fuzz.READ_CHUNK):
            taken |= {(os.path.realpath(s), int(i)) for s, i in zip(chunk.stacks, chunk.indices, strict=True)}
            skipped += len(chunk.skipped)
    except NotParticles:
        return "not particles", set()
    except (Rejected, ParticleFileError):
        return "rejected", set()
    return ("partial" if skipped else "whole"), taken


def place(root: Path, outside: Path, k: int, spec: tuple[str, bytes, str]) -> Path:
    """Write fuzzed file ``k`` under a hidden name, then rename it into the watched directory (complete at once)."""
    hidden = root / ".incoming"
    (hidden / "stacks").mkdir(parents=True, exist_ok=True)
    staged = fuzz.materialise(hidden, outside, k, *spec)
    if spec[0] == ".star":  # image names are relative to the STAR file's folder: write the final text
        text = staged.read_bytes().replace(os.fsencode(hidden), os.fsencode(root))
        staged.unlink()
        staged.write_bytes(text)
    target = root / staged.name
    os.replace(staged, target)
    return target


class Daemon:
    """``cryofastar-stream watch`` in a subprocess; its output lines collected by a thread."""

    def __init__(self, watch: Path, out: Path) -> None:
        self.process = subprocess.Popen([str(SCRIPT), "watch", str(watch), "--out", str(out), *FLAGS],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGINT and wait (drain): the exit status."""
        if self.running():
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=300)
        self._thread.join(timeout=10)
        return code


def star_images(path: Path) -> list[tuple[str, int]]:
    """``(resolved stack, index)`` of every row of the daemon's particles.star (names relative to its folder)."""
    import starfile

    particles = starfile.read(path, always_dict=True)["particles"]
    rows = []
    for name in particles["rlnImageName"].astype(str):
        index, stack = name.split("@", 1)
        rows.append((os.path.realpath(path.parent / stack), int(index)))
    return rows


def rejected_rows(path: Path) -> list[tuple[str, str]]:
    """``(path, reason)`` rows of rejected.tsv."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return [(row[1], row[2]) for row in list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]


def wait_until(condition, timeout: float, daemon: Daemon) -> bool:  # noqa: ANN001
    """Poll ``condition()`` every 0.5 s while the daemon runs; whether it came true in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.running():
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def main() -> None:  # noqa: PLR0915 - one campaign, top to bottom
    """Run the campaign, print the figures, write bench/results/fuzz_daemon.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="fuzzed files dropped into the watched directory")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--valid-every", type=int, default=25, help="every k-th file is a fresh valid stack")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the daemon to take all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz_daemon.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    files = generate(args.n, args.seed, args.valid_every)
    with tempfile.TemporaryDirectory(prefix="fuzz_daemon_") as tmp:
        base = Path(tmp)
        root, outside = fuzz.make_tree(base)
        out = base / "out"
        geometry = SessionGeometry(fuzz.BOX, fuzz.APIX)
        os.replace(root / "stacks" / "big.mrcs", base / "big.mrcs")  # 32 px: must not be the session's first file
        fixtures = sorted(p for p in root.rglob("*") if p.suffix in (".mrcs", ".star"))
        plan = {str(p): expected(p, root, geometry) for p in fixtures}
        taken = IngestJournal()  # what the session holds once the tree's own stacks are in
        for _, images in plan.values():
            for stack, index in images:
                taken.add(np.array([stack]), np.array([index]))
        daemon = Daemon(root, out)
        star = out / "particles.star"
        first = wait_until(lambda: star.is_file() and len(star_images(star)) >= len(taken), 300, daemon)
        if not first:
            raise SystemExit("the daemon wrote no particles.star from its valid stacks:\n" + "".join(daemon.lines))
        t_drop = time.perf_counter()
        os.replace(base / "big.mrcs", root / "stacks" / "big.mrcs")
        plan[str(root / "stacks" / "big.mrcs")] = expected(root / "stacks" / "big.mrcs", root, geometry, taken)
        for k, spec in enumerate(files):
            path = place(root, outside, k, spec)
            plan[str(path)] = expected(path, root, geometry, taken)
        drop_seconds = time.perf_counter() - t_drop
        wanted_rows = sum(1 for kind, _ in plan.values() if kind in ("rejected", "partial"))
        wanted_images = set().union(*(taken for _, taken in plan.values()))
        done = wait_until(lambda: len(rejected_rows(out / "rejected.tsv")) >= wanted_rows, args.timeout, daemon)
        time.sleep(5)  # what was read is posed and inserted; the SIGINT below drains the rest
        alive = daemon.running()
        code = daemon.stop()
        t_stopped = time.perf_counter()
        rows = rejected_rows(out / "rejected.tsv")
        row_paths = collections.Counter(p for p, _ in rows)
        listed = [p for p, (kind, _) in plan.items() if kind in ("rejected", "partial")]
        missing_rows = [p for p in listed if row_paths[p] == 0]
        repeated_rows = [p for p in listed if row_paths[p] > 1]
        wrongly_rejected = [p for p, (kind, _) in plan.items() if kind == "whole" and row_paths[p]]
        unexpected_rows = [p for p in row_paths if p not in plan]
        irregular_rows = sum(row_paths[p] for p, (kind, _) in plan.items() if kind in ("not a regular file", "empty"))
        in_star = star_images(star) if star.is_file() else []
        counts = collections.Counter(in_star)
        duplicates = sum(1 for c in counts.values() if c > 1)
        lost = wanted_images - set(counts)
        extra = set(counts) - wanted_images
        rebuilt = base / "rebuilt.mrc"
        result = subprocess.run([str(SCRIPT), "backproject", str(star), "-o", str(rebuilt), "--interpolation",
                                 "nearest"], capture_output=True, text=True, env=ENV, timeout=600, check=False)
        if result.returncode == 0:
            live, _ = read_volume(out / "volume.mrc")
            fresh, _ = read_volume(rebuilt)
            difference = float((live - fresh).abs().max()) / float(fresh.abs().max())
        else:
            difference = float("nan")
        unexpected = [line.strip() for line in daemon.lines if re.search(r"unexpected error|Traceback", line)]
    kinds = collections.Counter(kind for kind, _ in plan.values())
    record = {
        "files_dropped": len(files), "mrc_files": sum(s[0] != ".star" for s in files),
        "star_files": sum(s[0] == ".star" for s in files), "valid_stacks_among_them": len(range(0, len(files),
                                                                                                 args.valid_every)),
        "tree_fixtures": len(fixtures), "expected": dict(kinds), "daemon_running_at_end": alive, "exit_code": code,
        "all_rows_seen_before_stop": done, "rejected_rows": len(rows), "rows_expected": wanted_rows,
        "rejected_files_missing_from_tsv": len(missing_rows), "rejected_files_listed_twice": len(repeated_rows),
        "accepted_files_in_tsv": len(wrongly_rejected), "rows_for_unknown_paths": len(unexpected_rows),
        "rows_for_empty_files_fifos_and_symlink_loops": irregular_rows,
        "images_expected": len(wanted_images), "particles_in_star": len(in_star), "duplicated_images": duplicates,
        "lost_images": len(lost), "extra_images": len(extra),
        "backproject_exit": result.returncode, "map_vs_backproject_max_rel_diff": difference,
        "unexpected_errors_logged": len(unexpected), "drop_seconds": round(drop_seconds, 1),
        "wall_seconds": round(t_stopped - t0, 1), "seed": args.seed,
        "command": f"python bench/fuzz_daemon.py --n {args.n} --seed {args.seed} --valid-every {args.valid_every}",
        "examples": {"missing": missing_rows[:5], "repeated": repeated_rows[:5], "wrongly_rejected":
                     wrongly_rejected[:5], "unknown": unexpected_rows[:5], "lost": sorted(map(str, lost))[:5],
                     "extra": sorted(map(str, extra))[:5], "unexpected_errors": unexpected[:5],
                     "backproject_stderr": result.stderr[-500:] if result.returncode else ""},
    }
    for key, value in record.items():
        if key != "examples":
            print(f"{key}: {value}")
    for key, value in record["examples"].items():
        if value:
            print(f"{key}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    ok = (alive and code == 0 and not missing_rows and not repeated_rows and not wrongly_rejected and not duplicates
          and not lost and not extra and np.isfinite(difference) and difference < 0.02 and not unexpected)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
