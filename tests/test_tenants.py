"""``producer.tenants`` and ``producer.request_body``: pure parts of the gateway's keys and bodies (the
gateway itself, end to end, is tests/test_gateway.py)."""

from __future__ import annotations

import pytest

from glyphq.producer.errors import InvalidJob, RequestRefused
from glyphq.producer.request_body import MAX_JSON_DEPTH, parse_json
from glyphq.producer.tenants import NO_KEY_TENANT, Keys, body_digest, idempotent_job_id

KEY, OTHER = "key-one-0123456789abcdef", "key-two-0123456789abcdef"


def test_each_key_is_its_own_tenant_and_no_keys_is_one_tenant():
    keys = Keys((KEY, OTHER))
    one, two = keys.tenant(f"Bearer {KEY}"), keys.tenant(f"bearer {OTHER}")
    assert one != two and len(one) == 64 and KEY not in one
    with pytest.raises(RequestRefused):
        keys.tenant("Bearer not-a-key-0123456789abcdef")
    assert not keys.admits(None) and keys.admits(f"Bearer {KEY}")
    assert Keys(()).tenant(None) == NO_KEY_TENANT and Keys(()).admits(None)


def test_an_idempotency_key_names_a_job_within_its_tenant_only():
    assert idempotent_job_id("a" * 64, "order-1") == idempotent_job_id("a" * 64, "order-1")
    assert idempotent_job_id("a" * 64, "order-1") != idempotent_job_id("b" * 64, "order-1")
    assert idempotent_job_id("a" * 64, None) is None and idempotent_job_id("a" * 64, "") is None


def test_a_body_digest_ignores_key_order_and_spacing_but_not_values():
    assert body_digest(parse_json(b'{"a": 1, "b": [1, 2]}')) == body_digest(parse_json(b'{"b":[1,2],"a":1}'))
    assert body_digest({"a": 1}) != body_digest({"a": 2})


@pytest.mark.parametrize("data, problem", [
    (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, None),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested more than"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested more than"),
    (b"[" * 200_000, "nested more than"),
    (b'{"timeout": NaN}', "NaN is not a JSON number"),
    (b"[-Infinity]", "-Infinity is not a JSON number"),
    (b"\xff{", "is not valid JSON"),
])
def test_a_body_is_plain_json_nested_at_most_max_json_depth(data, problem):
    if problem is None:
        parse_json(data)
        return
    with pytest.raises(InvalidJob) as refused:
        parse_json(data)
    assert refused.value.field == "body" and problem in str(refused.value)
