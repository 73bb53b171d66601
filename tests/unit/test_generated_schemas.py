"""The checked-in schemas/openapi.json and schemas/events.schema.json match the code."""

from __future__ import annotations

import json

import pytest

from workron.admission import schemas
from workron.ledger import schemas_dir

GENERATED = schemas.rendered()


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_checked_in_schema_is_current(name: str) -> None:
    path = schemas_dir() / name
    assert path.exists(), f"schemas/{name} is missing: run scripts/gen-schemas"
    assert path.read_text() == GENERATED[name], f"schemas/{name} is stale: run scripts/gen-schemas"


def test_generation_is_deterministic() -> None:
    assert schemas.rendered() == GENERATED


def test_events_schema_covers_every_wire_type() -> None:
    document = json.loads(GENERATED[schemas.WIRE_EVENTS])
    assert {"JobSpec", "Submission", "Work", "Report", "JobFinished"} <= set(document["$defs"])
    tags = document["$defs"]["Report"]["discriminator"]["mapping"]
    assert set(tags) == {"started", "succeeded", "failed", "cancelled"}


def test_openapi_documents_the_error_shape() -> None:
    document = json.loads(GENERATED[schemas.OPENAPI])
    post = document["paths"]["/v1/jobs"]["post"]
    assert {"200", "201", "400", "413", "422", "503"} <= set(post["responses"])
    ref = post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ErrorBody"
