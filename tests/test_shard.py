"""Tests of study grids split into shards (`--shard`, `--merge`; experiments/cells.py, launcher.py)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from absl import logging as absl_logging

from experiments import cells

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_shard_and_its_refusals():
    assert cells.parse_shard("1/4") == (1, 4)
    assert cells.parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match=rf"Received: shard='{bad}'"):
            cells.parse_shard(bad)


def test_shard_from_tf_config_ranks_chief_then_workers():
    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"], "ps": ["h3:1"]}
    ranks = [cells.shard_from_tf_config({"cluster": cluster, "task": task})
             for task in ({"type": "chief", "index": 0}, {"type": "worker", "index": 0},
                          {"type": "worker", "index": 1})]
    assert ranks == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="Received: TF_CONFIG task=.*'ps'"):
        cells.shard_from_tf_config({"cluster": cluster, "task": {"type": "ps", "index": 0}})


def test_shards_partition_the_grid(tmp_path):
    keys = [f"width{w}-seed{s}" for w in (8, 16, 32, 64, 128) for s in range(3)]
    for n in (1, 2, 3, 4):
        stores = [cells.CellStore(str(tmp_path), shard=(i, n)) for i in range(n)]
        by_index = [[k for k in range(len(keys)) if st.mine(k)] for st in stores]
        by_key = [[k for k in keys if st.mine(k)] for st in stores]
        # Every cell in exactly one shard; index shards are round-robin (sizes differ by ≤ 1).
        assert sorted(sum(by_index, [])) == list(range(len(keys)))
        assert sorted(sum(by_key, [])) == sorted(keys)
        assert by_index == [list(range(i, len(keys), n)) for i in range(n)]
    merge, whole = cells.CellStore(str(tmp_path), shard=cells.MERGE), cells.CellStore(
        str(tmp_path), shard=None)
    assert [merge.mine(k) for k in range(3)] == [False] * 3
    assert [whole.mine(k) for k in range(3)] == [True] * 3
    with pytest.raises(TypeError, match="Received: index_or_key=1.5"):
        whole.mine(1.5)


def test_gather_waits_for_every_cell_and_reads_other_shards(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(absl_logging, "info", lambda msg, *a: logged.append(msg % a))
    settings = {f"cell{i}": {"i": i} for i in range(4)}
    shards = [cells.CellStore(str(tmp_path), shard=(i, 2)) for i in range(2)]
    for index, (key, s) in enumerate(settings.items()):
        if shards[0].mine(index):
            assert shards[0].get(key, s) is None
            shards[0].put(key, s, {"value": index * 10})
    assert shards[0].gather(settings) is None
    assert "shard 0/2: 2 of 4 cells are not finished yet (cell1, cell3)" in logged[-1]
    for index, (key, s) in enumerate(settings.items()):
        if shards[1].mine(index):
            shards[1].put(key, s, {"value": index * 10})
    expected = {key: {"value": i * 10} for i, key in enumerate(settings)}
    assert shards[1].gather(settings) == expected
    assert cells.CellStore(str(tmp_path), shard=cells.MERGE).gather(settings) == expected
    # A record of other settings is refused as by `get`.
    with pytest.raises(ValueError, match="Received: i=7"):
        shards[0].gather(dict(settings, cell0={"i": 7}))


def test_the_process_shard_is_the_default_of_a_store(tmp_path):
    try:
        cells.set_process_shard("1/3")
        assert cells.CellStore(str(tmp_path)).shard == (1, 3)
        cells.set_process_shard(cells.MERGE)
        assert cells.CellStore(str(tmp_path)).shard == cells.MERGE
    finally:
        cells.set_process_shard(None)
    assert cells.CellStore(str(tmp_path)).shard is None


_TOY = textwrap.dedent("""
    import sys
    from absl import app
    from experiments import launcher

    def run(*, output_dir, strategy, model_builders, data_dir=None):
        raise SystemExit("run() must not be reached")

    study = sys.argv.pop(1)
    app.run(lambda argv: launcher.main(argv, study, run))
""")


def _toy(tmp_path, study, *flags, tf_config=None):
    script = tmp_path / "toy.py"
    script.write_text(_TOY)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.run([sys.executable, str(script), study,
                           f"--output_dir={tmp_path / 'out'}", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


_TWO_WORKERS = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("study, flags, tf_config, message", [
    ("kernel_evolution", ["--strategy=multi_worker"], None,
     "keras-team/keras#20585.*--shard.*Received: strategy='multi_worker'"),
    ("kernel_evolution", [], _TWO_WORKERS,
     "keras-team/keras#20585.*Received: TF_CONFIG with 2 chief/worker tasks and no --shard"),
    ("toy", ["--shard=0/2"], None, "toy does not run in shards yet.*Received: shard='0/2'"),
    ("kernel_evolution", ["--shard=2/2"], None, "Received: shard='2/2'"),
    ("kernel_evolution", ["--shard=0/2", "--merge"], None,
     "Received: shard='0/2', merge=True"),
    ("kernel_evolution", ["--shard=tf_config"], None, "Received: TF_CONFIG unset"),
])
def test_refusals_come_before_any_work(tmp_path, study, flags, tf_config, message):
    result = _toy(tmp_path, study, *flags, tf_config=tf_config)
    assert result.returncode != 0
    assert re.search(message, result.stderr.replace("\n", " ")), result.stderr
    assert not (tmp_path / "out").exists()


def _without_wall_times(value):
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items() if k != "wall_seconds"}
    if isinstance(value, list):
        return [_without_wall_times(v) for v in value]
    return value


def _two_concurrent_shards(study, shared):
    """Runs shards 0/2 and 1/2 of `study`'s smoke config at once into `shared`; their stderr logs."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    shards = [subprocess.Popen(
        [sys.executable, "-m", f"experiments.{study}", f"--gin_file={study}/smoke.gin",
         f"--output_dir={shared}", "--strategy=cpu", f"--shard={i}/2"], cwd=ROOT, env=env,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[1] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], [log[-3000:] for log in logs]
    return logs


def _one_process_then_two_shards(run_binary, study, tmp_path, missing):
    """Runs `study`'s smoke config in one process into tmp_path/one; then, into tmp_path/shared,
    a --merge before any cell (it must say what is missing, matching the regex `missing`, exit
    0 and write no results.json) and 2 concurrent shards. Returns (one, shared, shard logs)."""
    one = tmp_path / "one"
    run_binary(study, str(one))
    shared = tmp_path / "shared"
    merge = run_binary(study, str(shared), "--merge")
    assert re.search(missing, merge.stderr), merge.stderr[-3000:]
    assert not (shared / "results.json").exists()
    return one, shared, _two_concurrent_shards(study, shared)


def _assert_same_results(run_binary, study, one, shared, without):
    """The shards' results.json, and the one a later --merge rewrites, equal one process's
    (`without` drops the fields that differ between processes)."""
    reference = json.loads((one / "results.json").read_text())
    sharded = json.loads((shared / "results.json").read_text())
    assert without(sharded) == without(reference)
    run_binary(study, str(shared), "--merge")
    assert without(json.loads((shared / "results.json").read_text())) == without(reference)


@pytest.mark.slow
@pytest.mark.parametrize("study, cells_trained", [
    ("kernel_evolution", "run"),  # 2 cells: widths 8 and 32
    ("linear_vs_nonlinear", "cell"),   # 2 cells (Grid's progress names them so)
])
def test_two_shards_give_the_results_of_one_process(tmp_path, run_binary, study, cells_trained):
    """2 concurrent shards of a smoke grid = one process (wall times aside)."""
    one, shared, logs = _one_process_then_two_shards(
        run_binary, study, tmp_path, "2 of 2 cells are not finished yet")
    # Each shard computed exactly one of the two cells.
    computed = [len(re.findall(rf"\] {cells_trained} \d+ of 2: ", log)) for log in logs]
    assert computed == [1, 1], (computed, [log[-2000:] for log in logs])
    assert (shared / "figures").is_dir() or not (one / "figures").is_dir()
    _assert_same_results(run_binary, study, one, shared, _without_wall_times)


@pytest.mark.slow
def test_two_data_scaling_shards_give_the_results_of_one_process(tmp_path, run_binary):
    """data_scaling: 2 concurrent shards of the smoke grid = one process (wall times aside)."""
    one, shared, logs = _one_process_then_two_shards(
        run_binary, "data_scaling", tmp_path, r"merge: (\d+) of \1 cells are not finished yet")
    # The shards split the work items between them, none computed twice.
    begun = [re.findall(r"\] cell (\d+) of (\d+): ", log) for log in logs]
    assert all(begun), [log[-2000:] for log in logs]
    total = int(begun[0][0][1])
    assert sum(len(b) for b in begun) == total, begun
    _assert_same_results(run_binary, "data_scaling", one, shared, _without_wall_times)


def _without_times(value):
    """`value` without any timing field (`*seconds*`: differ between processes)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


@pytest.mark.slow
def test_two_trainability_shards_give_the_results_of_one_process(tmp_path, run_binary):
    """trainability: every part's cells dealt over 2 shards = one process (timings aside)."""
    one, shared, logs = _one_process_then_two_shards(
        run_binary, "trainability", tmp_path, r"merge: (\d+) of \1 cells are not finished yet")
    # Both shards computed cells (that none computed a cell twice is not checked here).
    assert all(re.search(r"\] [^\n]* 1 of \d+: ", log) or re.search(r"\] [^\n]* 2 of \d+: ", log)
               for log in logs), [log[-2000:] for log in logs]
    _assert_same_results(run_binary, "trainability", one, shared, _without_times)
