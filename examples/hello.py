"""The peer system's hello-world job, as a Ray driver script.

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<capability> ray job submit --address <validator-core URL> \
        --working-dir . -- python hello.py

validator-core's Jobs gateway takes the capability in place of the Ray token (users never hold
that), and gives the driver what it needs instead: the validator's URL and a scope for this one
submission (``RAYHORDE_VALIDATOR_URL``, ``RAYHORDE_CAPABILITY``), never the capability itself.
`rayhorde capability` prints one. The working dir is uploaded into the cluster, where every
member can read it: keep secrets out of it (``rayhorde job run`` sends the spec to validator-core only).
"""

import os

import jobs

handle = jobs.submit({
    "image": os.environ.get("RAYHORDE_TEST_IMAGE", "rayhorde/busybox:local"),
    "command": ["sh", "-c", 'echo "Hello, $NAME!" | tee -a /artifacts/stuff'],
    "env": {"NAME": os.environ.get("HELLO_NAME", "rayhorde")},
    "executor_class": "always_on.test",
    "execution_timeout_s": 60,
})
view = handle.result(timeout_s=180)
print(f"job {view.job_id}: status {view.status.value}, miner {view.miner_hotkey}")
print(f"artifact /artifacts/stuff = {view.artifact('/artifacts/stuff').decode()!r}")
