"""A bounded soak of the serving cluster on this machine (loopback only): does anything get lost?

    python benchmarks/soak.py --minutes 5 --streams 64        # the recorded run (BENCHMARKS.md)
    python benchmarks/soak.py --minutes 0.5 --streams 16      # a quick one

Starts a local Ray cluster with the tandem app (CPU, the tiny pair, one lane, a drafter process),
then keeps `--streams` gRPC streams busy for `--minutes`: random modes (AR / SD / PEARL, AdaEDL
on or off), temperatures (0, 0.7, 1), lengths and prompts; some requests cancelled by their
client part way; the drafter process killed (SIGKILL, by its pid) in the middle. Each request ends
one of three ways: completed (its last chunk has a finish_reason), failed with a status (the
server said why: RESOURCE_EXHAUSTED when the lane is full, ...), or lost (neither, within its
deadline). Greedy requests are compared with the target alone, computed in this process. Before
and after: the lane's free KV slots, and the resident memory of the Router and Lane processes.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef walk(root):\n", "class Queue:\n    def __init__(self):\n",
           "def parse_header(line):\n    \"\"\"Parse a header line.\"\"\"\n", "for i in range(10):\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pids() -> dict:
    from ray import serve
    from ray._private.state import state

    topology = serve.get_deployment_handle("Lane", app_name="soak").topology.remote().result()
    router = [a for a in state.actor_table(None).values() if "#Router#" in str(a.get("Name")) and a["State"] == "ALIVE"]
    return {"lane": topology["leader_pid"], "drafter": topology["pids"].get(1), "router": int(router[0]["Pid"])}


def lane_load() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Lane", app_name="soak").load.remote().result()


class Reference:
    """Greedy output of the target alone, cached per (prompt, max_tokens)."""

    def __init__(self) -> None:
        from tandem.engine.pair import load_pair

        self.pair = load_pair("tandem:tiny/target", "tandem:tiny/draft", max_slots=1)
        self.cache: dict = {}
        self.lock = threading.Lock()

    def ids(self, prompt: str, max_tokens: int) -> list[int]:
        from tandem.actors.offline import generate
        from tandem.params import SamplingParams, SpecParams

        with self.lock:
            if (prompt, max_tokens) not in self.cache:
                p = self.pair.tokenizer.encode(prompt, add_special_tokens=False)
                done = generate(self.pair, [p], SamplingParams(max_tokens, ignore_eos=True), SpecParams("ar"))
                self.cache[prompt, max_tokens] = done[0].token_ids
            return self.cache[prompt, max_tokens]


def one_request(client, rng: random.Random, ref: Reference, tally: Counter, mismatches: list) -> None:
    from tandem.client import TandemClientError

    prompt, n = rng.choice(PROMPTS), rng.choice([8, 32, 64, 128])
    mode, adaedl = rng.choice(["ar", "sd", "pearl"]), rng.random() < 0.5
    temperature = rng.choice([0.0, 0.0, 0.7, 1.0])
    cancel_after = rng.randint(1, 3) if rng.random() < 0.1 else None
    ids, finish, chunks = [], "", 0
    try:
        stream = client.generate(prompt, max_tokens=n, temperature=temperature, mode=mode, adaedl=adaedl,
                                 ignore_eos=True, seed=rng.randrange(2**31))
        for chunk in stream:
            ids += chunk.token_ids
            chunks += 1
            finish = chunk.finish_reason or finish
            if cancel_after is not None and chunks >= cancel_after and not finish:
                stream.close()  # the client goes away part way
                tally["cancelled by the client"] += 1
                return
    except TandemClientError as e:
        tally["lost" if e.code.name == "DEADLINE_EXCEEDED" else f"failed: {e.code.name}"] += 1
        if e.code.name in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            time.sleep(rng.uniform(0.1, 0.5))  # back off, as a client told to retry later does
        return
    if not finish:
        tally["lost"] += 1
        return
    tally["completed"] += 1
    if temperature == 0 and ids != ref.ids(prompt, n):
        mismatches.append({"prompt": prompt, "max_tokens": n, "mode": mode, "adaedl": adaedl})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--streams", type=int, default=64, help="concurrent client streams")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-queued", type=int, default=48)
    ap.add_argument("--no-kill", action="store_true", help="do not kill the drafter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/soak_cpu.json"))
    args = ap.parse_args(argv)

    import ray
    from ray import serve
    from tqdm import tqdm

    from tandem.client import TandemClient
    from tandem.cluster.app import build_app

    temp = tempfile.mkdtemp(prefix="tsk", dir="/tmp")
    grpc_port = free_port()
    ray.init(num_cpus=4, _temp_dir=temp, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    tally, mismatches, events = Counter(), [], []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_app({"lane": {"max_batch_size": args.max_batch_size, "max_queued": args.max_queued},
                             "grpc": {"port": grpc_port}, "max_tokens_limit": 1000}), name="soak", route_prefix="/")
        ref = Reference()
        before = {"free_slots": lane_load()["free_slots"], **{f"rss_mb_{k}": rss_mb(v) for k, v in pids().items() if v}}
        client = TandemClient(f"127.0.0.1:{grpc_port}", timeout=120, retries=0)
        stop_at = time.monotonic() + args.minutes * 60
        kill_at = time.monotonic() + args.minutes * 30
        killed = args.no_kill

        def worker(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            while time.monotonic() < stop_at:
                one_request(client, rng, ref, tally, mismatches)

        with ThreadPoolExecutor(args.streams) as pool, tqdm(total=int(args.minutes * 60), unit="s") as bar:
            futures = [pool.submit(worker, i) for i in range(args.streams)]
            while not all(f.done() for f in futures):
                time.sleep(1)
                bar.update(1)
                bar.set_postfix(done=tally["completed"], failed=sum(v for k, v in tally.items() if k.startswith("failed")))
                if not killed and time.monotonic() > kill_at:
                    pid = pids()["drafter"]
                    os.kill(pid, signal.SIGKILL)
                    events.append({"t_s": round(args.minutes * 30), "event": f"drafter (pid {pid}) killed"})
                    killed = True
            for f in futures:
                f.result()
        time.sleep(2)
        load = lane_load()
        after = {"free_slots": load["free_slots"], **{f"rss_mb_{k}": rss_mb(v) for k, v in pids().items() if v}}
        client.close()
        result = {"args": vars(args), "tally": dict(tally), "greedy_mismatches": mismatches, "before": before,
                  "after": after, "drafters": load["drafters"], "events": events,
                  "requests": sum(tally.values()), "lost": tally.get("lost", 0)}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    print(f"\n{'outcome':<32} requests")
    for k, v in sorted(result["tally"].items()):
        print(f"{k:<32} {v}")
    print(f"{'greedy mismatches':<32} {len(mismatches)}")
    print(f"free KV slots before / after     {before['free_slots']} / {after['free_slots']}")
    for k in before:
        if k.startswith("rss"):
            print(f"{k:<32} {before[k]:.0f} / {after.get(k, 0):.0f} MB")
    print(f"drafters: {result['drafters']}  events: {events}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
