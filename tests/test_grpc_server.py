"""tandem's gRPC server on its own (no Ray): TLS, keys, the size limit before decoding, garbage
answered INVALID_ARGUMENT, and a server fault reported without its details. The front end is a
stand-in that records what it was asked (as Ray Serve LLM tests its ingress with a mock engine)."""
from __future__ import annotations

import asyncio
import subprocess
import threading

import grpc
import pytest
from conftest import free_port

pytest.importorskip("ray")  # the server extra (the GPU machine has none unless carried)

from tandem.client import (
    Internal,
    ResourceExhausted,
    TandemClient,
    TandemClientError,
    Unauthenticated,
)
from tandem.cluster.auth import ApiKeys
from tandem.cluster.config import AppConfig
from tandem.cluster.frontend import Delta
from tandem.cluster.grpc_api import start_server


class FakeFrontend:
    """Answers like the real one; Generate streams two deltas, or fails on the prompt "boom"."""

    def __init__(self) -> None:
        self.owners: list[str] = []

    async def open_stream(self, params, owner=""):
        self.owners.append(owner)
        if params.prompt == "boom":
            raise RuntimeError("secret path /srv/model on host 10.0.0.7")

        class Req:
            rid = params.request_id or "made-here"

        async def deltas():
            yield Delta([1, 2], "ab")
            yield Delta([3], "c", "length", {"generated": 3})
        return Req(), deltas()

    async def health(self):
        return {"status": "SERVING", "lanes": 1, "running": 0, "queued": 0}

    def model_card(self):
        return {"id": "fake", "target": "tandem:tiny/target", "draft": "tandem:tiny/draft", "max_context": 16}

    async def cancel(self, rid, owner=""):
        return rid == "mine" and owner != ""


def serve(cfg: AppConfig, keys: ApiKeys):
    """Run the server on a loop in a thread; returns (frontend, stop)."""
    loop, frontend, ready = asyncio.new_event_loop(), FakeFrontend(), threading.Event()
    box = {}

    async def main():
        box["server"] = await start_server(cfg, frontend, keys)
        ready.set()
        await box["server"].wait_for_termination()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)

    def stop():  # best effort: a daemon thread, and each test has its own port
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop)
        thread.join(5)
    return frontend, stop


@pytest.fixture()
def tls_files(tmp_path):
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_keys_and_owners(tls_files):
    cert, key = tls_files
    port = free_port()
    cfg = AppConfig(grpc={"port": port, "tls_cert_file": str(cert), "tls_key_file": str(key)})
    frontend, stop = serve(cfg, ApiKeys(["k1", "k2"]))
    try:
        with TandemClient(f"localhost:{port}", retries=0, api_key="k1", root_certificates=cert.read_bytes()) as c:
            assert c.health().status == "SERVING"
            done = c.complete("x", request_id="r1")
            assert (done.text, done.token_ids, done.finish_reason) == ("abc", [1, 2, 3], "length")
            assert c.cancel("mine") is True
        with TandemClient(f"localhost:{port}", retries=0, api_key="k2", root_certificates=cert.read_bytes()) as c:
            c.complete("x")
        with TandemClient(f"localhost:{port}", retries=0, api_key="nope", root_certificates=cert.read_bytes()) as c:
            with pytest.raises(Unauthenticated):
                c.health()
        owners = set(frontend.owners)
        assert len(owners) == 2 and "" not in owners and not any("k1" in o or "k2" in o for o in owners)
        with TandemClient(f"localhost:{port}", retries=0, api_key="k1", timeout=3) as plain:  # TLS only
            with pytest.raises(TandemClientError):
                plain.health()
    finally:
        stop()


def test_limits_garbage_and_faults_get_statuses_without_details():
    port = free_port()
    frontend, stop = serve(AppConfig(grpc={"port": port}, limits={"max_request_bytes": 4096}), ApiKeys([]))
    try:
        with TandemClient(f"127.0.0.1:{port}", retries=0) as c:
            with pytest.raises(ResourceExhausted):
                c.complete("x" * 10_000)
            with pytest.raises(Internal) as err:
                c.complete("boom", request_id="req-7")
            assert err.value.details == "request req-7: internal server error"  # no path, host or traceback
            assert c.complete("fine").text == "abc"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/tandem.v1.Tandem/Cancel", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                call(b"\x0a\xff\xff\xff\xff\x0f")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert frontend.owners == ["", ""]  # without keys every caller is the one anonymous owner
    finally:
        stop()


def test_reflection_is_off_unless_asked():
    port = free_port()
    _, stop = serve(AppConfig(grpc={"port": port}), ApiKeys([]))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                         request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                list(call(iter([b""]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        stop()
    with pytest.raises(ValueError, match="go together"):
        AppConfig(grpc={"tls_cert_file": "/nonexistent.crt"})
