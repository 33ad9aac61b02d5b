"""More than one lane, on a real local Ray cluster on CPU: the router spreads requests over the
lanes Serve runs (over the request channel, tandem/cluster/channel.py), a full lane's request
goes to another, and Serve's autoscaling adds a lane when the lanes hold more requests than its
target (the lanes count them: Lane.record_autoscaling_stats, app.lane_autoscaling_policy)."""
from __future__ import annotations

import shutil
import tempfile
import threading
import time

import pytest
from conftest import free_port

from tandem.client import ResourceExhausted, TandemClient

PROMPT = "def fibonacci(n):\n"
ONE_SLOT = {"drafter_cpus": 0.25, "verifier_cpus": 0.5, "colocate_drafter": True, "max_batch_size": 1, "max_queued": 0}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray import serve

    temp = tempfile.mkdtemp(prefix="tdl", dir="/tmp")
    ray.init(num_cpus=4, num_gpus=0, _temp_dir=temp, object_store_memory=200 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def deploy(serve, args: dict) -> TandemClient:
    from tandem.cluster.app import build_app

    port = free_port()
    serve.delete("tandem")  # a fresh app: an update in place would keep the last one's lanes
    serve.run(build_app({**args, "grpc": {"port": port}}), name="tandem", route_prefix="/")
    return TandemClient(f"127.0.0.1:{port}", timeout=120, retries=0)


def lane_loads(serve) -> list[dict]:
    handle = serve.get_deployment_handle("Lane", app_name="tandem")
    return [r for r in handle.broadcast("load").results(timeout_s=30) if isinstance(r, dict)]


def hold(client: TandemClient, started: threading.Event, out: list) -> None:
    """A long request: `started` is set at its first chunk."""
    try:
        chunks = []
        for chunk in client.generate(PROMPT, max_tokens=1000, ignore_eos=True, mode="ar"):
            chunks.append(chunk)
            started.set()
        out.append(chunks[-1].finish_reason)
    except Exception as e:  # noqa: BLE001 - recorded for the assertion
        out.append(e)
        started.set()


def hold_two(client: TandemClient) -> tuple[list[threading.Thread], list]:
    """Two long requests, both streaming when this returns; `out` gets each one's ending."""
    out: list = []
    events = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=hold, args=(client, e, out)) for e in events]
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60)
    return threads, out


def test_two_lanes_take_a_request_each_and_a_third_is_refused(ray_cluster):
    client = deploy(ray_cluster, {"num_lanes": 2, "lane": ONE_SLOT, "max_tokens_limit": 1000})
    assert len(lane_loads(ray_cluster)) == 2  # (the driver's handle is ready before the clock starts)
    threads, out = hold_two(client)
    with pytest.raises(ResourceExhausted):  # each lane full: the router tried both
        client.complete(PROMPT, max_tokens=4, mode="ar")
    for t in threads:
        t.join(120)
    assert out == ["length", "length"]
    assert all(x["steps"] > 0 for x in lane_loads(ray_cluster))  # one request each: both lanes served


def test_autoscaling_adds_a_lane_when_the_lanes_hold_more_than_the_target(ray_cluster):
    lane = {**ONE_SLOT, "max_batch_size": 2}
    client = deploy(ray_cluster, {"lane": lane, "max_tokens_limit": 1000,
                                  "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                                  "upscale_delay_s": 0, "metrics_interval_s": 0.5,
                                                  "look_back_period_s": 1}})
    assert len(lane_loads(ray_cluster)) == 1
    threads, out = hold_two(client)
    deadline = time.monotonic() + 90
    while len(lane_loads(ray_cluster)) < 2:  # 2 held, 1 per lane wanted: Serve starts a second lane
        assert time.monotonic() < deadline, "autoscaling did not add a lane"
        time.sleep(0.5)
    for t in threads:
        t.join(120)
    assert out == ["length", "length"]
