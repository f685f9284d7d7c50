"""SPIFFE ID syntax and identity patterns: pure strings."""
import pytest

from sidecar_proxy.tls.spiffe import IdentityMatcher, SpiffeId, check_pattern, identity_matches, parse_spiffe_id


@pytest.mark.parametrize("text, td, path", [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
    ("spiffe://a-b_c.9/x.y-z_Q/0", "a-b_c.9", "/x.y-z_Q/0"),
    ("spiffe://td/..a/a..", "td", "/..a/a.."),  # dots inside a segment are fine
])
def test_valid_ids(text, td, path):
    sid = parse_spiffe_id(text)
    assert sid == SpiffeId(td, path) and str(sid) == text


@pytest.mark.parametrize("text, why", [
    ("http://example.org/a", "not a spiffe:// URI"),
    ("SPIFFE://example.org/a", "starts with 'spiffe://', in lower case"),
    ("spiffe:example.org/a", "starts with 'spiffe://'"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe:///a", "trust domain is empty"),
    ("spiffe://Example.org/a", "must be lower case"),
    ("spiffe://example.org:8443/a", "no port"),
    ("spiffe://user@example.org/a", "no userinfo"),
    ("spiffe://exa mple.org/a", "may only contain"),
    ("spiffe://example.org/", "empty segment"),
    ("spiffe://example.org//a", "empty segment"),
    ("spiffe://example.org/a/", "empty segment"),
    ("spiffe://example.org/a/./b", "'.' segment"),
    ("spiffe://example.org/a/../b", "'..' segment"),
    ("spiffe://example.org/a%20b", "percent-encoded"),
    ("spiffe://example.org/a b", "may only contain"),
    ("spiffe://example.org/a?x=1", "no a query"),
    ("spiffe://example.org/a#frag", "no a fragment"),
    ("spiffe://" + "a" * 256, "longer than 255"),
    ("spiffe://example.org/" + "a" * 2100, "longer than 2048 bytes"),
])
def test_invalid_ids(text, why):
    with pytest.raises(ValueError, match=why):
        parse_spiffe_id(text)


@pytest.mark.parametrize("pattern, problem", [
    ("*", None),
    ("spiffe://example.org/ns/web", None),
    ("spiffe://example.org/*", None),
    ("spiffe://example.org/ns/prod/*", None),
    ("spiffe://example.org/ns/prod/sa/web-*", None),
    ("spiffe://example.org*", "must follow the whole trust domain"),
    ("spiffe://exam*", "must follow the whole trust domain"),
    ("spiffe://*", "must follow the whole trust domain"),
    ("spiffe://example.org/*/sa/web", "only be the last"),
    ("spiffe://example.org/ns/**", "only be the last"),
    ("spiffe://example.org//*", "empty segment"),
    ("spiffe://Example.org/*", "lower case"),
    ("spiffe://example.org/a/", "not a valid SPIFFE ID"),
    ("", "must be"),
    ("web", "not a valid SPIFFE ID"),
])
def test_pattern_validation(pattern, problem):
    result = check_pattern(pattern)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


@pytest.mark.parametrize("spiffe_id, patterns, allowed", [
    ("spiffe://td/ns/a/sa/web", ["*"], True),
    ("spiffe://td/ns/a/sa/web", ["spiffe://td/ns/a/sa/web"], True),
    ("spiffe://td/ns/a/sa/web", ["spiffe://td/ns/a/sa/we"], False),          # exact is exact
    ("spiffe://td/ns/a/sa/web", ["spiffe://td/ns/a/sa/web/x"], False),
    ("spiffe://td/ns/a/sa/web", ["spiffe://td/ns/a/*"], True),
    ("spiffe://td/ns/a", ["spiffe://td/ns/a/*"], False),                     # "/*": strictly below
    ("spiffe://td/ns/ab/sa/web", ["spiffe://td/ns/a/*"], False),             # not a sibling sharing a prefix
    ("spiffe://td/ns/a/sa/web-1", ["spiffe://td/ns/a/sa/web-*"], True),
    ("spiffe://td/ns/a/sa/web-", ["spiffe://td/ns/a/sa/web-*"], True),       # the rest may be empty
    ("spiffe://td/ns/a/sa/web", ["spiffe://td/*"], True),
    ("spiffe://td.evil/ns/a", ["spiffe://td/*"], False),                     # never another trust domain
    ("spiffe://TD/ns/a", ["spiffe://td/*"], False),                          # case-sensitive
    ("spiffe://td/NS/a", ["spiffe://td/ns/*"], False),
    ("spiffe://td/ns/b", ["spiffe://td/ns/a", "spiffe://td/ns/b"], True),
    ("spiffe://td/ns/c", ["spiffe://td/ns/a", "spiffe://td/x/*"], False),
    ("spiffe://td/ns/c", [], False),                                          # an empty list allows nobody
])
def test_matching(spiffe_id, patterns, allowed):
    assert identity_matches(spiffe_id, patterns) is allowed
    assert IdentityMatcher(patterns).matches(spiffe_id) is allowed


def test_matcher_refuses_bad_patterns():
    with pytest.raises(ValueError, match="spiffe://td\\*"):
        IdentityMatcher(["spiffe://td/ns/a", "spiffe://td*"])
