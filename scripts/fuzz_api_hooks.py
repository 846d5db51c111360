"""Schemathesis hooks for the invalid-requests run of scripts/fuzz-api.sh.

A header value is text on the wire. When schemathesis negates a string
header it sends JSON's null as the text `null`, which the API rightly takes
as an Idempotency-Key like any other: a case whose only "invalid" part is
that header is a valid request, and creates a job. Such cases are dropped
here, so the run's promise (invalid requests write nothing) is tested on
requests that are invalid for an HTTP server.
"""

import schemathesis

# JSON values other than strings, as schemathesis renders them into a header.
NON_STRINGS = {"null", "true", "false"}


@schemathesis.hook
def filter_headers(ctx, headers):
    return not (headers and headers.get("Idempotency-Key") in NON_STRINGS)
