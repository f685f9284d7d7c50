import json
import logging

from sidecar_proxy.logs import JsonFormatter, TextFormatter, Throttle


def test_throttle_allows_one_line_per_interval_and_counts_the_rest():
    throttle = Throttle(1.0)
    assert throttle.allow("payments", now=10.0) == 0
    assert throttle.allow("payments", now=10.2) is None
    assert throttle.allow("payments", now=10.9) is None
    assert throttle.allow("orders", now=10.9) == 0  # keys are independent
    assert throttle.allow("payments", now=11.0) == 2
    assert throttle.allow("payments", now=12.5) == 0


def _record(**fields):
    record = logging.LogRecord("sidecar_proxy.relay", logging.WARNING, __file__, 1, "upstream connect failed",
                               None, None)
    record.fields = fields
    return record


def test_json_and_text_formats_carry_the_same_fields():
    record = _record(cluster="payments", reason="refused", error="[Errno 111] Connection refused")
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "warning" and doc["msg"] == "upstream connect failed"
    assert doc["cluster"] == "payments" and doc["reason"] == "refused"
    text = TextFormatter().format(record)
    assert "cluster=payments reason=refused" in text
    assert 'error="[Errno 111] Connection refused"' in text
