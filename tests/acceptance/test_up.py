"""A newcomer's path: `workron up`, then jobs through the CLI and over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx

from .conftest import System, start_system


def wait_job(system: System, job_id: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, object] = httpx.get(f"{system.api_url}/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_cli_echo_hello_succeeds(system: System) -> None:
    done = system.cli("submit", "--wait", "--", "echo", "hello")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "succeeded" in done.stdout and "hello" in done.stdout


def test_python_handler_over_http(system: System) -> None:
    response = httpx.post(
        f"{system.api_url}/v1/jobs", json={"task": "acc.add", "payload": {"a": 2, "b": 3}}
    )
    assert response.status_code == 201, response.text
    job = wait_job(system, response.json()["id"])
    assert job["state"] == "succeeded"
    assert job["result"] == {"sum": 5, "token": "1.1"}


def test_builtin_handler_through_cli(system: System) -> None:
    done = system.cli("submit", "--wait", "--task", "workron.echo", "--payload", '{"x": [1, 2]}')
    assert done.returncode == 0, done.stderr + done.stdout
    assert '"x"' in done.stdout


def test_failing_command_retries_then_fails(system: System) -> None:
    done = system.cli(
        "submit", "--wait", "--max-attempts", "3", "--backoff", "0.05", "--", "sh", "-c", "exit 3"
    )
    assert done.returncode == 1
    job_id = done.stdout.split()[0]
    shown = json.loads(system.cli("job", job_id, "--json").stdout)
    assert shown["job"]["state"] == "failed" and shown["job"]["attempt"] == 3
    assert "exit" in shown["job"]["error"] and "3" in shown["job"]["error"]
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds.count("retrying") == 2 and kinds[-1] == "failed"


def test_non_retryable_handler_fails_once(system: System) -> None:
    response = httpx.post(f"{system.api_url}/v1/jobs", json={"task": "acc.reject"})
    job = wait_job(system, response.json()["id"])
    assert job["state"] == "failed" and job["attempt"] == 1
    assert "never work" in str(job["error"])


def test_cancel_through_cli(system: System) -> None:
    submitted = system.cli("submit", "--delay", "600", "--", "echo", "later")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and job_id
    assert system.cli("cancel", job_id).returncode == 0
    assert wait_job(system, job_id)["state"] == "cancelled"
    again = system.cli("cancel", job_id)
    assert again.returncode == 1 and "conflict" in again.stderr
    listed = json.loads(system.cli("jobs", "--state", "cancelled", "--json").stdout)
    assert job_id in [j["id"] for j in listed]


def test_bad_input_is_refused_with_the_field(system: System) -> None:
    response = httpx.post(f"{system.api_url}/v1/jobs", json={"task": "t", "max_attempts": 0})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "$.max_attempts"
    missing = httpx.get(f"{system.api_url}/v1/jobs/01900000-0000-7000-8000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def _port_open(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def test_sigterm_finishes_running_job_and_stops_everything(tmp_path: Path) -> None:
    system = start_system(tmp_path)
    try:
        response = httpx.post(f"{system.api_url}/v1/jobs", json={"command": ["sleep", "1"]})
        job_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{system.api_url}/v1/jobs/{job_id}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert system.stop(signal.SIGTERM) == 0, "".join(system.output)
    finally:
        if system.process.poll() is None:
            system.stop(signal.SIGKILL)
    assert not _port_open(system.api_url) and not _port_open(system.nats_url)
    # The job that was running finished within the grace period; its outcome
    # is in the ledger, or in JetStream and applied once the system is back.
    again = start_system(tmp_path)
    try:
        assert wait_job(again, job_id)["state"] == "succeeded"
    finally:
        assert again.stop() == 0
