"""A DAG from a YAML file through `workron dag submit --wait`, against `workron up`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .conftest import System

PIPELINE = textwrap.dedent(
    """
    name: acceptance
    jobs:
      extract:
        command: [echo, '{"rows": 3}']
      sum:
        task: acc.add
        payload: {a: 2, b: 3}
      report:
        command: 'cat "$WORKRON_PARENTS_DIR/sum.json"; echo; printf %s "$WORKRON_PARENTS"'
        shell: true
        depends_on: [extract, sum]
    """
)

BROKEN = textwrap.dedent(
    """
    jobs:
      - {ref: bad, task: acc.reject}
      - {ref: never, command: [echo, unreachable], depends_on: [bad]}
    """
)


def test_dag_submit_wait_then_show(system: System, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE)
    done = system.cli("dag", "submit", str(path), "--wait", "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    dag = json.loads(done.stdout)
    assert dag["state"] == "succeeded" and dag["counts"] == {"succeeded": 3}
    assert dag["critical_path"][-1] == "report"

    shown = system.cli("dag", "show", dag["id"])
    assert shown.returncode == 0 and "critical path by run_time" in shown.stdout
    report = next(n for n in dag["nodes"] if n["ref"] == "report")
    job = json.loads(system.cli("job", report["job_id"], "--json").stdout)["job"]
    file_part, env_part = job["result"]["stdout"].split("\n", 1)
    assert json.loads(file_part)["sum"] == 5
    parents = json.loads(env_part)
    assert parents["sum"]["sum"] == 5 and parents["extract"]["exit_code"] == 0


def test_a_failed_dag_exits_non_zero_and_cascades(system: System, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    done = system.cli("dag", "submit", str(path), "--wait")
    assert done.returncode == 1
    assert "failed" in done.stdout and "cancelled 1" in done.stdout
    bad = system.cli("dag", "submit", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_retry_inside_a_dag_names_the_upstream_and_reopens(system: System, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    done = system.cli("dag", "submit", str(path), "--wait", "--json")
    assert done.returncode == 1, done.stderr + done.stdout
    ids = {n["ref"]: n["job_id"] for n in json.loads(done.stdout)["nodes"]}
    refused = system.cli("retry", ids["never"])
    message = " ".join(refused.stderr.split())  # the console wraps long lines
    assert refused.returncode == 1 and f"retry {ids['bad']} instead" in message
    retried = system.cli("retry", ids["bad"])
    assert retried.returncode == 0, retried.stderr + retried.stdout
    never = json.loads(system.cli("job", ids["never"], "--json").stdout)
    assert [e["detail"] for e in never["events"] if e["kind"] == "reopened"] == [
        f"upstream job {ids['bad']} retried"
    ]
