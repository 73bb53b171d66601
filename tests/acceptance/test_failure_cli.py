"""Failure handling through `workron up` and the CLI: the local worker in
the registry, `workron retry`, `workron dead-letters`, `workron reaper`."""

from __future__ import annotations

import json
import time

from .conftest import System
from .test_up import wait_job


def test_the_local_worker_is_registered(system: System) -> None:
    deadline = time.monotonic() + 30
    while True:
        done = system.cli("workers", "--json")
        assert done.returncode == 0, done.stderr + done.stdout
        workers = json.loads(done.stdout)
        if workers and workers[0]["state"] == "alive":
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)
    [worker] = workers
    assert worker["id"].startswith("local-0-") and worker["queues"] == ["default"]
    assert worker["resources"]["cpu"] >= 1 and worker["resources"]["memory_mb"] > 0
    table = system.cli("workers")
    assert table.returncode == 0 and worker["id"] in table.stdout and "alive" in table.stdout


def test_retry_runs_a_failed_job_again(system: System) -> None:
    done = system.cli("submit", "--wait", "--max-attempts", "1", "--", "sh", "-c", "exit 4")
    assert done.returncode == 1
    job_id = done.stdout.split()[0]
    retried = system.cli("retry", job_id)
    assert retried.returncode == 0, retried.stderr + retried.stdout
    assert "attempt 2/2" in retried.stdout
    job = wait_job(system, job_id)
    assert (job["state"], job["attempt"]) == ("failed", 2)
    shown = json.loads(system.cli("job", job_id, "--json").stdout)
    failures = [(e["kind"], e["attempt"]) for e in shown["events"] if e["kind"] == "failed"]
    assert failures == [("failed", 1), ("failed", 2)]  # every attempt's error is kept
    again = system.cli("retry", "0190a0a0-0000-7000-8000-000000000000")
    assert again.returncode == 1 and "not_found" in again.stderr


def test_dead_letters_and_reaper_commands(system: System) -> None:
    listed = system.cli("dead-letters")
    assert listed.returncode == 0, listed.stderr + listed.stdout
    assert "reason" in listed.stdout
    helped = system.cli("reaper", "--help")
    assert helped.returncode == 0 and "one leads" in helped.stdout
