"""init-iptables flags -> InterceptOptions: defaults, validation with the flag named, normalisation."""
from __future__ import annotations

import argparse

import pytest

from sidecar_proxy.interception.options import (
    InterceptOptions,
    OptionError,
    add_arguments,
    cidrs_for,
    from_namespace,
)


def parse(*argv: str) -> InterceptOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_namespace(parser.parse_args(list(argv)))


def error_of(*argv: str) -> OptionError:
    with pytest.raises(OptionError) as info:
        parse(*argv)
    return info.value


def test_defaults():
    opts = parse()
    assert opts == InterceptOptions()
    assert (opts.proxy_uid, opts.proxy_gid, opts.outbound_port, opts.inbound_port) == (1337, 1337, 15001, 15006)
    assert opts.outbound_include_cidrs == ("*",) and opts.outbound_exclude_cidrs == ()
    assert opts.inbound_include_ports == ("*",) and opts.inbound_always_exclude_ports == (15000, 15090)
    assert (opts.inbound_mode, opts.tproxy_mark, opts.tproxy_table) == ("redirect", 1337, 133)
    assert (opts.ipv4, opts.ipv6, opts.backend) == (True, "auto", "auto")


def test_help_shows_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: 15000,15090)" in text and "(default: none)" in text and "(default: *)" in text


def test_every_flag():
    opts = parse(
        "--proxy-uid", "0", "--proxy-gid", "4294967294", "--outbound-port", "1", "--inbound-port", "65535",
        "--outbound-include-cidrs", "10.0.0.0/8, fd00::/8", "--outbound-exclude-cidrs", "10.96.0.1",
        "--outbound-exclude-ports", "22,3306", "--inbound-include-ports", "8080,9090",
        "--inbound-exclude-ports", "8081", "--inbound-always-exclude-ports", "",
        "--inbound-mode", "tproxy", "--tproxy-mark", "0x10", "--tproxy-table", "100",
        "--ipv6", "on", "--no-ipv4", "--iptables-backend", "legacy",
    )
    assert opts == InterceptOptions(
        proxy_uid=0, proxy_gid=4294967294, outbound_port=1, inbound_port=65535,
        outbound_include_cidrs=("10.0.0.0/8", "fd00::/8"), outbound_exclude_cidrs=("10.96.0.1/32",),
        outbound_exclude_ports=(22, 3306), inbound_include_ports=(8080, 9090), inbound_exclude_ports=(8081,),
        inbound_always_exclude_ports=(), inbound_mode="tproxy", tproxy_mark=16, tproxy_table=100,
        ipv4=False, ipv6=True, backend="legacy",
    )


def test_cidrs_are_normalised_and_deduplicated():
    opts = parse("--outbound-exclude-cidrs", "10.1.2.3/8,10.0.0.0/8,FD00:0::1/8,192.168.1.1/255.255.255.0")
    assert opts.outbound_exclude_cidrs == ("10.0.0.0/8", "fd00::/8", "192.168.1.0/24")


def test_ipv6_off():
    assert parse("--ipv6", "off").ipv6 is False


def test_family_split():
    cidrs = ("10.0.0.0/8", "fd00::/8", "172.16.0.0/12", "::1/128")
    assert cidrs_for(4, cidrs) == ["10.0.0.0/8", "172.16.0.0/12"]
    assert cidrs_for(6, cidrs) == ["fd00::/8", "::1/128"]
    assert cidrs_for(6, ("*",)) == ["*"] and cidrs_for(4, ("*",)) == ["*"]
    assert cidrs_for(6, ("10.0.0.0/8",)) == []


@pytest.mark.parametrize("argv, option, message", [
    (("--outbound-exclude-cidrs", "10.0.0.0/33"), "--outbound-exclude-cidrs", "'10.0.0.0/33' is not a CIDR"),
    (("--outbound-include-cidrs", "10.0.0.0/8,example.com"), "--outbound-include-cidrs",
     "'example.com' is not a CIDR"),
    (("--outbound-port", "0"), "--outbound-port", "'0' is not a port (1..65535)"),
    (("--inbound-port", "70000"), "--inbound-port", "'70000' is not a port (1..65535)"),
    (("--inbound-exclude-ports", "80,x"), "--inbound-exclude-ports", "'x' is not a port (1..65535)"),
    (("--outbound-exclude-ports", "1_000"), "--outbound-exclude-ports", "'1_000' is not a port (1..65535)"),
    (("--inbound-include-ports", "*,8080"), "--inbound-include-ports", "'*' cannot be combined"),
    (("--outbound-include-cidrs", "10.0.0.0/8,*"), "--outbound-include-cidrs", "'*' cannot be combined"),
    (("--outbound-exclude-ports", "*"), "--outbound-exclude-ports", "'*' is not allowed here"),
    (("--outbound-exclude-cidrs", "*"), "--outbound-exclude-cidrs", "'*' is not allowed here"),
    (("--inbound-exclude-ports", "80,,81"), "--inbound-exclude-ports", "empty entry in '80,,81'"),
    (("--inbound-mode", "nat"), "--inbound-mode", "'nat' is not one of redirect, tproxy"),
    (("--ipv6", "yes"), "--ipv6", "'yes' is not one of auto, on, off"),
    (("--iptables-backend", "xtables"), "--iptables-backend", "'xtables' is not one of auto, nft, legacy"),
    (("--proxy-uid", "-1"), "--proxy-uid", "'-1' is not a uid/gid (0..4294967294)"),
    (("--proxy-gid", "4294967295"), "--proxy-gid", "'4294967295' is not a uid/gid (0..4294967294)"),
    (("--tproxy-mark", "0"), "--tproxy-mark", "'0' is not a mark"),
    (("--tproxy-mark", "0x100000000"), "--tproxy-mark", "'0x100000000' is not a mark"),
    (("--tproxy-table", "254"), "--tproxy-table", "table 254 is reserved (the kernel's 'main' table)"),
    (("--tproxy-table", "0"), "--tproxy-table", "'0' is not a routing table (1..2147483648)"),
    (("--inbound-port", "15001"), "--inbound-port", "15001 is also the outbound port"),
    (("--no-ipv4", "--ipv6", "off"), "--no-ipv4", "nothing to intercept"),
])
def test_bad_values_name_the_option(argv, option, message):
    error = error_of(*argv)
    assert error.option == option
    assert message in error.message
    assert str(error) == f"{option}: {error.message}"


def test_reserved_tables_are_all_refused():
    for table in ("253", "254", "255"):
        assert error_of("--tproxy-table", table).option == "--tproxy-table"
    assert parse("--tproxy-table", "252").tproxy_table == 252


def test_empty_string_is_an_empty_list():
    opts = parse("--outbound-include-cidrs", "", "--inbound-include-ports", " ")
    assert opts.outbound_include_cidrs == () and opts.inbound_include_ports == ()


def test_argparse_never_rejects_our_values(capsys):
    # Values reach from_namespace as strings, so the error is ours, not a usage exit.
    error = error_of("--outbound-port", "http")
    assert error.option == "--outbound-port"
    assert capsys.readouterr().err == ""
