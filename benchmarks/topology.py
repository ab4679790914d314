"""``python -m benchmarks.topology``: the ``topo_*`` figures, measured across the four-host test
topology (validator, miner1, miner2 and user, each its own network namespace and address; every
role started with its own command; every door over HTTPS), one ``BENCH`` line each:

* ``topo_miner_join_s``: with the validator and miner1 up, ``rayhorde miner run`` for miner2 ->
  validator-core records miner2's Ray node (admission over HTTPS, the node joining the head
  across the bridge).
* ``topo_organic_e2e_vs_docker_ratio``: a trivial organic job submitted by a Ray driver on the
  validator host (validator-core over HTTPS, run on a miner host) vs the same container run with
  plain docker-py; interleaved, ratio of medians.
* ``topo_proxy_p50_ratio_echo``, ``topo_proxy_tput_ratio_echo_c16``: an ``echo`` stream deployed
  from the user host; signed calls from the user host through the miner's proxy (HTTPS, across the
  bridge) vs the same signed calls made on a miner host straight to a second echo job's route on
  its loopback Serve proxy (a job of its own: calls past the proxy would leave gaps in the first
  job's receipt chain, which validator-core bans for). Rounds alternate; ratio of medians.

The steps that cross the network run inside the hosts (:mod:`tests.support.topo_bench`,
:mod:`tests.support.topo_user`); this process only builds the topology, starts the roles and reads
the answers. Needs root (network namespaces); elsewhere it says why and measures nothing.
"""

from __future__ import annotations

import json
import secrets
import statistics
import sys
import time
from typing import Any

from benchmarks.report import bench
from cluster.protocol.identity import Hotkey
from tests.support.topo_stack import MINER_URIS, RAY_PORT_BASE, STREAM_CLASS, TopoStack
from tests.support.topology import Host, Topology, cleanup_stale, missing_requirements

WARM, ROUNDS = 2, 9  # organic: warm-ups each, then interleaved rounds
ECHO_ROUNDS, ECHO_CALLS = 5, 60  # latency: rounds per side, calls per round
TPUT_ROUNDS, TPUT_CLIENTS, TPUT_S = 3, 16, 4.0  # throughput: rounds per side, clients, seconds each



def step(stack: TopoStack, host: Host, name: str, *args: Any, timeout_s: float = 300, **env: str) -> dict[str, Any]:
    """Run one step of :mod:`tests.support.topo_bench` in ``host``; its last stdout line (JSON)."""
    full_env = stack.env(host, **env)
    full_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the head is on the host's address, not loopback
    out = host.run([sys.executable, "-m", "tests.support.topo_bench", name, *map(str, args)],
                   timeout_s=timeout_s, env=full_env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"step {name} in host {host.name} failed (rc {out.returncode}):\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def miner_join(stack: TopoStack) -> None:
    t0 = time.monotonic()
    stack.start_miner("miner2")  # returns once validator-core's record names miner2's node (polled each 0.5 s)
    bench("topo_miner_join_s", time.monotonic() - t0, "s",
          "`rayhorde miner run` (miner2) -> validator-core records its Ray node: admission over HTTPS + "
          "the node joining the head across the bridge; one sample, 0.5 s polling")


def organic(stack: TopoStack, cap: str) -> None:
    v = stack.v
    out = step(stack, v, "organic", f"{v.ip}:{RAY_PORT_BASE}", v.ip, stack.validator_url, cap, WARM, ROUNDS,
               timeout_s=600, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=stack.token())
    ours, base = statistics.median(out["ours"]), statistics.median(out["docker"])
    names = {Hotkey.from_uri(uri).ss58: name for name, uri in MINER_URIS.items()}
    ran_on = sorted({names.get(m, m) for m in out["miners"]})
    bench("topo_organic_e2e_vs_docker_ratio", ours / base, "x",
          f"median {ours * 1000:.0f} ms submit->result (driver on the validator host, HTTPS, run on "
          f"{'/'.join(ran_on)}) vs docker-py {base * 1000:.0f} ms; {ROUNDS} interleaved rounds")


def proxy(stack: TopoStack, cap: str) -> None:
    user = stack.topo["user"]
    seed = secrets.token_hex(32)  # the client key's seed: a throwaway test key, passed to both hosts
    job = step(stack, user, "echo_deploy", stack.validator_url, cap, seed, STREAM_CLASS)
    # The baseline calls a job of its own: calls that skip the proxy leave gaps in a job's receipt
    # chain, which validator-core's collector rightly takes for withheld receipts (and bans for)
    base_job = step(stack, user, "echo_deploy", stack.validator_url, cap, seed, "always_on.test")
    names = {Hotkey.from_uri(uri).ss58: name for name, uri in MINER_URIS.items()}
    miner, base_miner = stack.topo[names[job["miner"]]], stack.topo[names[base_job["miner"]]]
    via = job["proxy_url"].rstrip("/") + job["route_prefix"]
    direct = f"http://127.0.0.1:{RAY_PORT_BASE + 9}{base_job['route_prefix']}"  # the node's own Serve proxy
    sides = {"proxy": (user, via, job), "direct": (base_miner, direct, base_job)}
    p50: dict[str, list[float]] = {"proxy": [], "direct": []}
    tput: dict[str, list[float]] = {"proxy": [], "direct": []}
    try:
        for r in range(max(ECHO_ROUNDS, TPUT_ROUNDS)):
            order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")  # neither always goes first
            for side in order:
                host, base, called = sides[side]
                clients = TPUT_CLIENTS if r < TPUT_ROUNDS else 0
                out = step(stack, host, "echo_round", base, called["job_id"], seed,
                           ECHO_CALLS if r < ECHO_ROUNDS else 0, clients, TPUT_S)
                if out["p50_s"] is not None:
                    p50[side].append(out["p50_s"])
                if out["tput_rps"] is not None:
                    tput[side].append(out["tput_rps"])
    finally:
        for ended in (job, base_job):
            stack.user("terminate", cap, ended["job_id"], timeout_s=120)
    pp, pd = statistics.median(p50["proxy"]), statistics.median(p50["direct"])
    bench("topo_proxy_p50_ratio_echo", pp / pd, "x",
          f"p50 {pp * 1000:.1f} ms from the user host through {miner.name}'s proxy (HTTPS) vs {pd * 1000:.1f} ms "
          f"on {base_miner.name} straight to a Serve route; median of {ECHO_ROUNDS} rounds x {ECHO_CALLS} calls")
    tp, td = statistics.median(tput["proxy"]), statistics.median(tput["direct"])
    bench("topo_proxy_tput_ratio_echo_c16", tp / td, "x",
          f"{tp:.0f} req/s via the proxy vs {td:.0f} direct; {TPUT_CLIENTS} clients x {TPUT_S:g} s, "
          f"median of {TPUT_ROUNDS} rounds")


def main() -> int:
    problem = missing_requirements()
    if problem:
        print(f"# topo_* not measured: {problem}", flush=True)
        return 0
    cleanup_stale()
    topo = Topology()
    with topo:
        stack = TopoStack(topo)
        try:
            stack.start_validator()
            stack.start_miner("miner1")
            miner_join(stack)
            cap = stack.user("capability", "200")["capability"]
            organic(stack, cap)
            proxy(stack, cap)
        finally:
            kept = stack.close()  # the roles, then their Ray temp dirs; the teardown ends anything left
    left = topo.leftovers() + kept
    if left:
        print(f"# topology leftovers after teardown: {left}", flush=True)
    assert left == [], left
    return 0


if __name__ == "__main__":
    sys.exit(main())
