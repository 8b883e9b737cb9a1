"""The pose table of a live session (engine.pose_table): poses, refinement bookkeeping, CTF, checkpoints."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
from cryofastar.engine.pose_table import PoseTable, positions_of
from cryofastar.recon import CtfParams
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.rotations import geodesic_degrees, random_rotations


def _table(n: int, ctf: bool = True) -> PoseTable:
    table = PoseTable()
    params = None
    if ctf:
        params = CtfParams.from_arrays(defocus_u_angstrom=torch.linspace(1e4, 2e4, n), defocus_v_angstrom=1.1e4,
                                       defocus_angle_degrees=10.0, voltage_kv=300.0, spherical_aberration_mm=2.7,
                                       amplitude_contrast=0.07, phase_shift_degrees=0.0)
    table.append(np.array(["/a.mrcs"] * n), np.arange(1, n + 1), random_rotations(n, torch.Generator().manual_seed(0)),
                 torch.zeros(n, 2, dtype=torch.float64), torch.ones(n), 1 + torch.arange(n) % 2, params)
    return table


def test_pose_table_updates_poses_and_returns_what_was_inserted():
    table = _table(6)
    rows = np.array([1, 4])
    new = random_rotations(2, torch.Generator().manual_seed(1))
    table.update(rows, new, torch.ones(2, 2, dtype=torch.float64), torch.tensor([0.3, 0.4]), torch.tensor([2.0, 3.0]),
                 5)
    assert float(geodesic_degrees(table.rotations(rows), new).max()) < 1e-4
    assert table.column("refined").tolist() == [0, 5, 0, 0, 5, 0]
    assert np.isnan(table.column("score")[0]) and table.column("score")[4] == pytest.approx(0.4)
    ctf = table.ctf(rows)
    assert ctf.defocus_u_angstrom.tolist() == pytest.approx([12000.0, 18000.0])
    assert ctf.voltage_kv.tolist() == [300.0, 300.0] and ctf.amplitude_contrast.tolist() == pytest.approx([0.07] * 2)
    assert _table(3, ctf=False).ctf(np.array([0, 2])) is None


def test_pose_table_from_an_older_checkpoint_gets_defaults_and_refuses_unknown_ctf():
    state = _table(4).state_dict()
    for column in ("ctf_optics", "score", "spread", "refined"):  # written before these columns existed
        del state[column]
    table = PoseTable.from_state_dict(state)
    assert table.column("refined").tolist() == [0, 0, 0, 0] and np.isnan(table.column("spread")).all()
    with pytest.raises(ValueError, match="not fully known"):
        table.ctf(np.array([0, 1]))


def test_pose_table_writes_relion_rows_with_image_names_relative_to_the_output(tmp_path):
    table = _table(3)
    particles, optics = table.to_star(tmp_path / "out", 64, 2.0, {"rlnVoltage": 300.0})
    relative = os.path.relpath("/a.mrcs", (tmp_path / "out").resolve())
    assert particles["rlnImageName"].tolist() == [f"{i:06d}@{relative}" for i in (1, 2, 3)]
    assert particles["rlnRandomSubset"].tolist() == [1, 2, 1] and "rlnDefocusU" in particles.columns
    assert optics["rlnImagePixelSize"].tolist() == [2.0] and optics["rlnImageSize"].tolist() == [64]
    assert optics["rlnVoltage"].tolist() == [300.0]


def test_ctf_parameters_of_several_chunks_concatenate_in_order():
    first = _table(3).ctf(np.arange(3))
    second = _table(2).ctf(np.arange(2))
    both = CtfParams.cat([first, second])
    assert len(both) == 5
    assert both.defocus_u_angstrom.tolist() == first.defocus_u_angstrom.tolist() + second.defocus_u_angstrom.tolist()
    assert both.amplitude_contrast.tolist() == pytest.approx([0.07] * 5)


def test_ctf_bfactor_and_scale_survive_the_table_and_default_where_not_given():
    table = PoseTable()
    params = CtfParams.from_arrays(defocus_u_angstrom=1.5e4, defocus_v_angstrom=1.4e4, defocus_angle_degrees=0.0,
                                   voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1,
                                   phase_shift_degrees=0.0, b_factor_angstrom2=torch.tensor([40.0, 60.0]), scale=0.9)
    table.append(np.array(["/a.mrcs"] * 2), np.arange(1, 3), random_rotations(2, torch.Generator().manual_seed(0)),
                 torch.zeros(2, 2, dtype=torch.float64), torch.ones(2), torch.tensor([1, 2]), params)
    back = table.ctf(np.arange(2))
    assert back.b_factor_angstrom2.tolist() == [40.0, 60.0] and back.scale.tolist() == pytest.approx([0.9, 0.9])
    plain = _table(2).ctf(np.arange(2))
    assert plain.b_factor_angstrom2 is None and plain.scale is None  # RELION's defaults: no envelope, scale 1
    mixed = CtfParams.cat([back, plain])
    assert mixed.b_factor_angstrom2.tolist() == [40.0, 60.0, 0.0, 0.0] and mixed.scale.tolist()[2:] == [1.0, 1.0]


def test_snapshot_from_another_thread_never_sees_half_a_batch_or_half_a_reposing():
    """The owner appends batches and re-poses every row; in each row angle rot = origin x = its version (mod 90)."""
    table, stop, bad = PoseTable(), threading.Event(), []

    def pose(version: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = torch.tensor([float(version % 90)], dtype=torch.float64)
        rot = euler_to_matrix(angle, torch.full_like(angle, 30.0), torch.zeros_like(angle)).expand(n, 3, 3)
        return rot, torch.full((n, 2), float(version % 90), dtype=torch.float64)

    def owner() -> None:
        for version in range(1, 300):
            if stop.is_set():
                return
            n = 50
            rot, origins = pose(version, n)
            table.append(np.array(["/a.mrcs"] * n), np.arange(1, n + 1), rot, origins, torch.ones(n),
                         torch.ones(n, dtype=torch.long), None, refined=version)
            rows = np.arange(len(table))
            rot, origins = pose(version, len(rows))
            table.update(rows, rot, origins, torch.zeros(len(rows)), torch.zeros(len(rows)), version)

    thread = threading.Thread(target=owner)
    thread.start()
    snapshots = 0
    while thread.is_alive() and not bad:
        names, columns = table.snapshot(("index", "angles", "origins", "refined"))
        snapshots += 1
        lengths = {len(c) for c in columns.values()}
        expected = columns["refined"] % 90
        if len(lengths) != 1:
            bad.append(f"columns of lengths {lengths}")
        elif not (np.allclose(columns["origins"][:, 0], expected)
                  and np.allclose(columns["angles"][:, 0], expected, atol=1e-6)):
            bad.append("a row with the angles, origins and version of different updates")
        time.sleep(0.001)  # the lock is not fair: a reader that never pauses starves the owner (minutes, not 1 s)
    stop.set()
    thread.join()
    assert not bad, bad[0]
    assert snapshots > 1 and table.snapshot(("index",))[0] == ["/a.mrcs"]


def test_the_owners_column_stays_the_tables_while_others_read_it():
    """The accumulator thread writes into a column it fetched while the status thread reads the table: the
    reads must not replace the array (they did: each read copied it, and the owner's writes were lost)."""
    table = _table(6)
    _table_append = table.append  # a second batch: the column is then joined from two parts once
    _table_append(np.array(["/b.mrcs"] * 2), np.arange(1, 3), random_rotations(2, torch.Generator().manual_seed(1)),
                  torch.zeros(2, 2, dtype=torch.float64), torch.ones(2), torch.tensor([1, 2]), None)
    owner = table.column("excluded")
    table.snapshot(("excluded", "refined"))  # another thread's reads
    table.column("excluded")
    owner[3] = True
    table.set_values("refined", np.array([1, 7]), 5)
    assert table.column("excluded").tolist() == [False, False, False, True, False, False, False, False]
    assert table.column("refined")[[1, 7]].tolist() == [5, 5] and table.in_map().sum() == 7


def test_positions_of_finds_each_row_in_a_list_by_stack_and_index():
    names = ["/s/a.mrcs", "/s/b.mrcs"]
    stack_id, index = np.array([0, 0, 1, 1, 0]), np.array([1, 2, 1, 2, 3])
    stacks = np.array(["/s/b.mrcs", "/s/a.mrcs", "/s/c.mrcs", "/s/a.mrcs", "/s/a.mrcs"])
    indices = np.array([2, 3, 1, 1, 3])  # c is unknown to the table; a:3 is named twice
    assert positions_of(names, stack_id, index, stacks, indices).tolist() == [3, -1, -1, 0, 1]
    assert positions_of(names, stack_id, index, stacks[:0], indices[:0]).tolist() == [-1] * 5
