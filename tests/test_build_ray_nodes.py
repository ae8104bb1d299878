"""Node loss on a real multi-node Ray cluster, simulated on this machine with Ray's own test tool
(`ray.cluster_utils.Cluster`: a head node and worker nodes, each with its own raylet and object store).

Kept small: a head without CPUs (it runs the driver and the progress queue), two worker nodes of 1 CPU, the tiny world.
"""

import json
import threading
import time

import buildworld as bw
import pytest

from synthaug.builder.driver import build

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture
def nodes():
    """A head (0 CPUs) and two worker nodes (1 CPU each), with this process connected as the driver."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's session: the cluster below must be the one `build` uses
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cluster.connect()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_losing_a_worker_node_mid_build_gives_the_same_bytes(tmp_path, world, reference, nodes, monkeypatch):
    """Class 1's job pauses after its first shard; its whole node is then removed. The job is retried on the node
    that is left (the lost worker's replacement cannot be placed and gets no job), and the build finishes with the
    bytes of an uninterrupted build."""
    paused = tmp_path / "paused"
    monkeypatch.setenv("SYNTHAUG_TEST_PAUSE", "shard:1")
    monkeypatch.setenv("SYNTHAUG_TEST_PAUSE_FILE", str(paused))
    removed, errors = [], []

    def remove_the_paused_node() -> None:
        try:
            deadline = time.monotonic() + 600
            while not paused.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("class 1 never paused")
                time.sleep(0.2)
            node_id = json.loads(paused.read_text())["node_id"]
            (node,) = [n for n in nodes.worker_nodes if n.node_id == node_id]
            nodes.remove_node(node)
            removed.append(node_id)
        except Exception as e:  # noqa: BLE001 (reported by the test below)
            errors.append(e)

    remover = threading.Thread(target=remove_the_paused_node, daemon=True)
    remover.start()
    out = tmp_path / "build"
    result = build(bw.config(out, *world, **{"run.executor": "ray", "run.num_workers": 2, "run.cpus_per_worker": 1,
                                             "run.job_timeout_s": 600}), progress=False)
    remover.join(timeout=60)
    assert not errors, errors
    assert removed and removed[0] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert result.ok and result.workers == 2
    assert bw.snapshot(out) == bw.snapshot(reference)
