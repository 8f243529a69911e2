"""``select`` over Ray (issue 50): the seeds' scorings and the candidates run as Ray tasks on a
two-node cluster (Ray's own ``cluster_utils.Cluster`` on this machine, one CPU a node) and the
record and the published merge are the sequential run's, byte for byte; ``--ray`` and its
options from the command line; without them Ray is not imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import refused, run_cli, select_planted, tree_hashes

from mergekit_seed.references.weights import weight_file_hashes
from mergekit_seed.tools.selection.workers import RaySettings


ray = pytest.importorskip("ray", reason="pip install 'mergekit-seed[ray]'")

METHODS = ["seedft", "lore", "linear"]  # six candidates with the default grid
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    two_nodes = Cluster(initialize_head=True, head_node_args=NODE)
    two_nodes.add_node(**NODE)
    two_nodes.wait_for_nodes()
    yield two_nodes
    two_nodes.shutdown()


def test_a_sweep_on_a_two_node_cluster_gives_the_sequential_record(planted, tmp_path, cluster):
    settings = {"methods": METHODS, "metric": "prefix_match", "versus_mean_seed": True, "warn": lambda _m: None}
    sequential = select_planted(planted, tmp_path / "sequential", **settings)
    inputs = tree_hashes(planted[0])  # the seeds, the base and the splits
    lines = []
    spread = select_planted(
        planted, tmp_path / "ray", echo=lines.append, ray=RaySettings(address=cluster.address), **settings
    )
    assert "ray: 2 tasks at once, each asking for 1 CPU" in lines[0], lines
    assert spread == sequential
    assert (tmp_path / "ray" / "select.json").read_bytes() == (tmp_path / "sequential" / "select.json").read_bytes()
    assert weight_file_hashes(tmp_path / "ray") == weight_file_hashes(tmp_path / "sequential")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ray", "sequential"]  # no staging, no journal
    assert tree_hashes(planted[0]) == inputs  # the tasks wrote nothing beside OUT's staging


def test_more_than_the_cluster_holds_is_one_line(planted, tmp_path, cluster):
    from mergekit_seed.errors import UserError

    with pytest.raises(UserError, match="--gpus-per-task 1: .* has 0 GPUs"):
        select_planted(planted, tmp_path / "out", ray=RaySettings(address=cluster.address, gpus_per_task=1))
    assert not list(tmp_path.iterdir()) and not ray.is_initialized()
    ray.init(address=cluster.address)  # a caller's own Ray session is used, and left running
    try:
        with pytest.raises(UserError, match="has 0 GPUs"):
            select_planted(planted, tmp_path / "out", ray=RaySettings(gpus_per_task=1))
        assert ray.is_initialized()
    finally:
        ray.shutdown()


def _select_cli(planted, out, *options):
    _, base, _, seeds, validation, test = planted
    splits = ["--validation", validation, "--test", test, "--methods", ",".join(METHODS)]
    return run_cli("mergekit-seed", "select", *seeds, "--base", base, *splits, *options, "--out", out)


def test_ray_dry_run_reports_the_plan_on_a_local_runtime(planted, tmp_path):
    dry = _select_cli(planted, tmp_path / "out", "--ray", "--cpus-per-task", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "tasks at once, each asking for 1 CPU (local runtime:" in dry.stdout
    assert "3 seed scorings and 6 candidates" in dry.stdout and "started, running or queued" in dry.stdout
    assert "s of work," in dry.stdout and "in a Ray task" in dry.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options,fragments",
    [
        (["--cpus-per-task", "2"], ["--cpus-per-task applies to Ray tasks", "--ray"]),
        (["--ray", "--gpus-per-task", "0", "--device", "cuda"], ["--device cuda", "--gpus-per-task"]),
        (["--ray", "--gpus-per-task", "1", "--device", "cpu"], ["--device cpu", "--gpus-per-task 0"]),
    ],
    ids=["without-ray", "cuda-without-gpus", "cpu-with-gpus"],
)
def test_ray_options_that_cannot_hold_are_one_line(planted, tmp_path, options, fragments):
    refused(_select_cli(planted, tmp_path / "out", *options), *fragments, out=tmp_path / "out")


def test_without_ray_select_does_not_import_it(planted, tmp_path):
    _, base, _, seeds, validation, test = planted
    arguments = [
        "select", *map(str, seeds), "--base", str(base), "--validation", str(validation), "--test", str(test),
        "--methods", "linear", "--dry-run", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    program = (
        "import sys\nfrom mergekit_seed.cli import main\n"
        f"main({arguments!r}, standalone_mode=False)\n"
        "print('ray imported' if 'ray' in sys.modules else 'ray not imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ray not imported")
