"""The pure decisions of interception/apply.py (the rest runs in tests/e2e/test_interception.py)."""
import dataclasses

import pytest

from sidecar_proxy.interception.apply import InterceptError, VerifyTarget, has_net_admin, verify_target
from sidecar_proxy.interception.options import InterceptOptions

DEFAULT = InterceptOptions()


def test_verify_prefers_the_pods_own_address():
    assert verify_target(DEFAULT, 4, ["10.1.2.3"]) == VerifyTarget("10.1.2.3", 9)
    assert verify_target(DEFAULT, 6, ["fd00::7"]) == VerifyTarget("fd00::7", 9)


def test_verify_falls_back_to_a_documentation_address():
    assert verify_target(DEFAULT, 4, []) == VerifyTarget("192.0.2.1", 9)
    assert verify_target(DEFAULT, 6, []) == VerifyTarget("2001:db8::1", 9)


def test_verify_picks_an_address_the_options_capture():
    opts = dataclasses.replace(DEFAULT, outbound_include_cidrs=("10.96.0.0/12",),
                               outbound_exclude_ports=tuple(range(9, 20)))
    # The pod address is not in the include CIDR; the first host of the CIDR is.
    assert verify_target(opts, 4, ["10.1.2.3"]) == VerifyTarget("10.96.0.1", 20)
    excluded = dataclasses.replace(DEFAULT, outbound_exclude_cidrs=("10.0.0.0/8", "192.0.2.0/24"))
    with pytest.raises(InterceptError, match="no IPv4 address is captured"):
        verify_target(excluded, 4, ["10.1.2.3"])


def test_net_admin_is_read_from_the_effective_capabilities(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")  # bit 12 only
    assert has_net_admin(str(status))
    status.write_text("Name:\tx\nCapEff:\t000001ffffffefff\n")  # everything but bit 12
    assert not has_net_admin(str(status))
