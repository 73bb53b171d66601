"""Admission: the HTTP API and the ``workron.submit.*`` consumer.

Both entries validate a submission the same way (msgspec types, then
``jobs.plan``) and write it with ``jobs.submit``: one transaction per batch,
the work message published by this process right after commit.
"""
