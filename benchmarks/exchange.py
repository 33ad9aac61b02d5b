"""The drafter exchange's transport: a propose/chunk round trip between two gloo processes.

    python benchmarks/exchange.py                 # 2000 round trips per row, CPU, localhost

Rows: `dist.send_object_list` (what the lane used before), the lane's `Channel` (one fixed
4 KiB buffer per message, tandem/actors/remote_drafter.py), and a bare int64[64] tensor each way (the
transport's floor). The messages are a step's draft request (one request, a 300-token context)
and its chunk (8 tokens, greedy: no q rows). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, n: int, results) -> None:
    from tandem.actors.remote_drafter import Channel
    from tandem.params import SamplingParams
    from tandem.spec.messages import DraftChunk, DraftItem

    sys.path.insert(0, str(REPO))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    peer = 1 - rank
    request = ("propose", ([DraftItem("r0", 0, list(range(300)), 8, SamplingParams(), True)], [], None))
    reply = ([DraftChunk(list(range(8)), None, 0.5, [0.1] * 8)], 0.001)

    def objects():
        box = [None]
        if rank == 0:
            dist.send_object_list([request], dst=peer)
            dist.recv_object_list(box, src=peer)
        else:
            dist.recv_object_list(box, src=peer)
            dist.send_object_list([reply], dst=peer)

    channel = Channel(dist.group.WORLD, peer)  # the world is this pair

    def lane_channel():
        if rank == 0:
            channel.send(request)
            channel.recv()
        else:
            channel.recv()
            channel.send(reply)

    floor = torch.zeros(64, dtype=torch.long)

    def tensor():
        if rank == 0:
            dist.send(floor, peer)
            dist.recv(floor, peer)
        else:
            dist.recv(floor, peer)
            dist.send(floor, peer)

    rows = []
    for name, fn in (("send_object_list", objects), ("Channel (4 KiB buffer)", lane_channel), ("int64[64] tensor", tensor)):
        for _ in range(50):
            fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rows.append({"transport": name, "round_trip_us": 1e6 * (time.perf_counter() - start) / n})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/exchange_cpu.json"))
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args.round_trips, results)) for r in range(2)]
    for p in procs:
        p.start()
    rows = results.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    print(f"{'transport':<24} {'round trip (us)':>16}")
    for r in rows:
        print(f"{r['transport']:<24} {r['round_trip_us']:>16.0f}")
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "round_trips": args.round_trips, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
