"""What the fuzz tests of every door share: the one check (a 2xx, or a 4xx in the error shape),
and hypothesis strategies for JSON a client may send."""

from __future__ import annotations

import json

from hypothesis import strategies as st

# Any JSON value but floats (signed objects cannot hold them: the signed doors add them on purpose)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=40)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def assert_protocol_answer(status: int, body: bytes, what: str) -> None:
    """A 2xx, or a 4xx whose body is the one error shape ``{"error": {"reason", "message"}}``
    (cluster.protocol.http.error_body) with both strings set; never a 5xx (nor a 1xx or 3xx)."""
    assert status < 500, f"{what}: server error {status}: {body[:300]!r}"
    assert 200 <= status < 300 or 400 <= status, f"{what}: {status} is neither a 2xx nor a 4xx: {body[:300]!r}"
    if status < 400:
        return
    try:
        err = json.loads(body)["error"]
        ok = isinstance(err["reason"], str) and err["reason"] and isinstance(err["message"], str) and err["message"]
    except (ValueError, KeyError, TypeError):
        ok = False
    assert ok, f"{what}: {status} not in the error shape {{'error': {{'reason', 'message'}}}}: {body[:300]!r}"
