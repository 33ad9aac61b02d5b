"""A lane spread over two Ray nodes (two raylets on this machine, ray.cluster_utils.Cluster):
verifier TP=2 over gloo on the node with "verifier" resources and fake GPUs, two drafters on the
node with "drafter" resources (issue 5's topology: a TP-2 verifier and two drafters, four GPUs). Greedy output must equal the target alone, also for a request
that joins while another is running (continuous batching must not change either one).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

import pytest
from conftest import TINY, free_port

PROMPTS = ["def _parse_header(line):\n", "import os\n\n\ndef walk(root):\n"]


@pytest.fixture(scope="module")
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.cluster_utils import Cluster

    from tandem.cluster.app import build_app

    temp = tempfile.mkdtemp(prefix="tdc", dir="/tmp")
    # Cluster() records the head's address in Ray's default folder whatever temp_dir says; on a
    # fresh machine (CI) nothing has created that folder yet.
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "resources": {"verifier": 2}, "temp_dir": temp,
        "object_store_memory": 150 * 1024**2, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=2, resources={"drafter": 2}, object_store_memory=150 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    grpc_port = free_port()
    lane = {"tensor_parallel_size": 2, "verifier_cpus": 0.5, "drafter_cpus": 0.5, "verifier_gpus": 1,
            "drafter_gpus": 1, "verifier_resources": {"verifier": 1}, "drafter_resources": {"drafter": 1},
            "max_batch_size": 4, "num_drafters": 2}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_app({"lane": lane, "grpc": {"port": grpc_port}}), name="tandem", route_prefix="/")
        yield f"127.0.0.1:{grpc_port}", serve.get_deployment_handle("Lane", app_name="tandem")
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference():
    from tandem.actors.offline import generate
    from tandem.engine.pair import load_pair
    from tandem.params import SamplingParams, SpecParams

    pair = load_pair(TINY / "target", TINY / "draft", max_slots=2)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    done = generate(pair, prompts, SamplingParams(max_tokens=40, ignore_eos=True), SpecParams("ar"))
    return [d.token_ids for d in done]


def test_drafter_and_verifier_on_different_nodes(two_nodes):
    _, lane = two_nodes
    topo = lane.topology.remote().result()
    tp_rank1, *drafters = topo["workers"]
    assert tp_rank1 == topo["leader"]  # both verifier ranks on the "verifier" node
    assert len(drafters) == 2 and all(d != topo["leader"] for d in drafters)  # the drafters on the other node


@pytest.mark.parametrize("mode", ["sd", "pearl"])
def test_tp2_cross_node_greedy_equals_target_and_joining_changes_nothing(two_nodes, reference, mode):
    from tandem.client import TandemClient

    address, _ = two_nodes
    client = TandemClient(address, timeout=240, retries=0)
    first_chunk, results = threading.Event(), {}

    def long_request():
        ids = []
        for chunk in client.generate(PROMPTS[0], max_tokens=40, mode=mode, ignore_eos=True):
            ids += list(chunk.token_ids)
            first_chunk.set()
        results["a"] = ids

    t = threading.Thread(target=long_request)
    t.start()
    assert first_chunk.wait(120)
    results["b"] = client.complete(PROMPTS[1], max_tokens=40, mode=mode, ignore_eos=True).token_ids  # joins mid-run
    t.join(240)
    assert results["a"] == reference[0]
    assert results["b"] == reference[1]
    assert client.health().running == 0
