"""Driver used by ``rayhorde job run``: ``python -m jobs '<spec json>'`` inside ``ray job submit``.

Prints ``RAYHORDE_JOB_ID=<id>`` as soon as validator-core accepted the job (the CLI reads the
result from validator-core itself, never from this output), then waits for the final status.
"""

import json
import sys

import jobs


def main() -> int:
    handle = jobs.submit(json.loads(sys.argv[1]))
    print(f"RAYHORDE_JOB_ID={handle.job_id}", flush=True)
    view = handle.result(timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 600)
    print(f"rayhorde job {view.job_id}: {view.status.value} on miner {view.miner_hotkey}", flush=True)
    return 0 if view.status == jobs.JobStatus.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
