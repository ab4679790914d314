"""Ray processes are sandboxed on every host (cluster/fabric/sandbox.py): miner2's operator, holding
only the cluster's Ray token, runs a driver on its own host and pins tasks to the head node and to
miner1's node, and a user's Jobs entrypoint runs on the head; each tries to read the wallets,
validator-core's database and secrets, the verification cluster's token, the container engine's
socket and a streaming job's volume. Every attempt is refused, and the Ray processes run as users
of their own, neither validator-core's nor the agents' (root here).

The watchtower is off in this module: it ends a driver started from a miner's host within a few
watch intervals (tests/cluster/validator/test_watchtower.py), and what is shown here is what the
sandbox alone refuses while such a driver runs.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from cluster.fabric import ray_node
from cluster.protocol.identity import Hotkey
from tests.support.topo_stack import MINER_URIS, RAY_USERS, STREAM_CLASS, TopoStack

pytestmark = [pytest.mark.topology, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
MINER1 = Hotkey.from_uri(MINER_URIS["miner1"]).ss58
VOLUME_FILE = "notes.txt"

# What each attempt found: "read" (a secret leaked) or "refused: <errno>". A shown file is read
# too, so that a probe that sees nothing at all cannot pass.
PROBE = r'''
import errno, json, os, socket, sys

def probe(paths):
    out = {"uid": os.getuid(), "gid": os.getgid(), "shown": open(sys.executable, "rb").read(4).hex()}
    for name, path in paths.items():
        try:
            if path.endswith(".sock"):
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.close()
            else:
                with open(path, "rb") as f:
                    f.read(1)
            out[name] = "read"
        except OSError as exc:
            out[name] = "refused: " + errno.errorcode.get(exc.errno, str(exc.errno))
    return out
'''
ATTACK = PROBE + r'''
from cluster.fabric import sandbox
sandbox.enter(sandbox.SandboxSpec.model_validate_json(sys.argv[6]))  # as the node's own processes run
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

def forged_volume_read(job_id, name):
    """On the stream's node: ask the agent for the job's file, signed by a key of our own."""
    import httpx
    from cluster.protocol.keys import SigningKey
    from cluster.protocol.streams import VolumeRead
    read = VolumeRead(job_id=job_id, name=name, t_ns=__import__("time").time_ns())
    read.job_sig = SigningKey().sign(read.signed_bytes())
    with httpx.Client(transport=httpx.HTTPTransport(uds=os.environ["RAYHORDE_AGENT_SOCKET"])) as c:
        r = c.post("http://agent/v1/stream-volume", json=read.model_dump())
    return r.status_code, r.text[:300]

gcs, temp_dir, miner1_node, job_id, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
ray.init(address=gcs, _temp_dir=temp_dir, log_to_driver=False, namespace="attack")
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
def on(node, fn, *args):
    return ray.get(ray.remote(num_cpus=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args), timeout=120)
print(json.dumps({"head": on(head, probe, paths), "miner1": on(miner1_node, probe, paths),
                  "forged": on(miner1_node, forged_volume_read, job_id, "notes.txt")}), flush=True)
'''
ENTRYPOINT = PROBE + r'''
print(json.dumps(probe(json.loads(sys.argv[1]))), flush=True)
'''


@pytest.fixture(scope="module")
def stack(topology, engine):
    s = TopoStack(topology, verification=True, validator={"watch_interval_s": 0, "verify_probe_interval_s": 0})
    s.start_validator()
    s.start_miner("miner1")
    s.start_miner("miner2")
    yield s
    assert s.close() == []


def _secrets(stack, job_id: str) -> dict[str, str]:
    v, m1, m2 = stack.v, stack.topo["miner1"], stack.topo["miner2"]
    core_pid = stack.procs["validator"].pid
    wallet = v.home / "wallets" / "validator" / "hotkeys" / "default"
    return {
        "validator_wallet": str(wallet),
        "miner1_wallet": str(m1.home / "wallets" / "miner1" / "hotkeys" / "default"),
        "miner2_wallet": str(m2.home / "wallets" / "miner2" / "hotkeys" / "default"),
        "validator_db": str(v.home / "validator" / "validator.db"),
        "probe_secret": str(v.home / "validator" / "probe_secret"),
        "cluster_token_file": str(v.home / "validator" / "ray_token"),
        "verification_token": str(v.home / "verification" / "ray_token"),
        "validator_tls_key": str(v.home / "tls" / "validator.key"),
        "ca_key": str(stack.ca.key_path),
        "engine_socket": "/run/rayhorde-docker.sock",
        "stream_volume": str(m1.home / "agent" / "stream-volumes" / job_id / VOLUME_FILE),
        "wallet_via_core_root": f"/proc/{core_pid}/root{wallet}",  # another process's view of the host
        "core_environ": f"/proc/{core_pid}/environ",
    }


def test_a_members_tasks_and_a_jobs_entrypoint_read_no_secret_and_run_as_ray_users(stack):
    cap = stack.user("capability", "20")["capability"]
    echo = stack.user("echo_volume", cap, STREAM_CLASS, VOLUME_FILE, "a job's private notes")
    assert echo["miner"] == MINER1 and echo["read"] == "a job's private notes"  # the app reads it via its agent
    secrets = _secrets(stack, echo["job_id"])
    for name, path in secrets.items():  # each exists: a refusal below is the sandbox's, not a typo's
        assert name == "engine_socket" or os.path.exists(path), (name, path)

    # miner2's operator runs the driver on its own host, as its node's user in its node's sandbox
    # (as root, Ray would leave root-owned log folders that its own node's workers then cannot use)
    m2, m2_temp = stack.topo["miner2"], stack.ray_temp("miner2")
    jail = ray_node.node_sandbox(RAY_USERS["miner2"], m2_temp)
    attack = m2.run([sys.executable, "-c", ATTACK, f"{stack.v.ip}:30000", m2_temp, stack.node_of(MINER1),
                     echo["job_id"], json.dumps(secrets), jail.model_dump_json()], timeout_s=300, check=False,
                    env=stack.env(m2, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=stack.token()))
    lines = [ln for ln in attack.stdout.splitlines() if ln.startswith("{")]
    assert attack.returncode == 0 and lines, attack.stderr[-3000:]
    seen = json.loads(lines[-1])
    ran = stack.user("entrypoint", cap, ENTRYPOINT, json.dumps(secrets))
    assert ran["rc"] == 0 and ran["answer"], ran
    seen["entrypoint"] = ran["answer"]

    ray_uids = {"head": RAY_USERS["validator"], "entrypoint": RAY_USERS["validator"], "miner1": RAY_USERS["miner1"]}
    for where, uid_gid in ray_uids.items():
        got = seen[where]
        assert f"{got['uid']}:{got['gid']}" == uid_gid, (where, got)  # neither validator-core's nor an agent's (0)
        assert got["shown"] == "7f454c46", (where, got)  # the probe ran and reads what the sandbox shows
        leaked = {k: v for k, v in got.items() if k in secrets and not v.startswith("refused")}
        assert leaked == {}, (where, leaked)
    status, text = seen["forged"]
    assert status == 403 and "bad_signature" in text  # the agent's door gives a job's file only to its key
