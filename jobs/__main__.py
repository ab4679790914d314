"""Driver used by ``rayhorde job run``: ``python -m jobs <job id> [timeout_s]`` inside ``ray job submit``.

The job is registered with validator-core already (its spec never enters Ray's job table); this
driver holds only the job's id and a scope that follows it (``$RAYHORDE_CAPABILITY``), launches
its organic task for every ticket, and waits for the final status. The CLI reads the result from
validator-core itself, never from this output.
"""

import sys

import jobs


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("{"):
        print("usage: python -m jobs <job id> [timeout_s]: register the job with validator-core first "
              "(a spec passed here would sit in Ray's job table, readable by every cluster member)", file=sys.stderr)
        return 2
    handle = jobs.follow(sys.argv[1])
    view = handle.result(timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 600)
    print(f"rayhorde job {view.job_id}: {view.status.value} on miner {view.miner_hotkey}", flush=True)
    return 0 if view.status == jobs.JobStatus.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
