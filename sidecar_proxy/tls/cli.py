"""``sidecar-proxy certs ca | issue``: a mesh CA and workload certificates for demos and tests.

Exit codes follow the rest of the CLI: 0 done; 1 the files could not be
read, written or used (the reason is printed, never a traceback); 2 bad
usage (argparse's own errors, a malformed ``--ttl``, ``--days`` or
``--spiffe-id``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["add_arguments", "run", "parse_ttl"]

_TTL_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Usage(Exception):
    pass


def parse_ttl(text: str) -> float:
    """'90s' / '30m' / '24h' / '7d' -> seconds. Raises ValueError."""
    m = _TTL_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration: use a number and one of s, m, h, d (e.g. '24h')")
    seconds = float(m.group(1)) * _TTL_UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="{ca,issue}")
    ca = sub.add_parser("ca", help="create a mesh CA: a self-signed root, or with --parent an intermediate")
    ca.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes ca.pem and ca-key.pem (0600)")
    ca.add_argument("--trust-domain", default="example.org",
                    help="the trust domain (default example.org; an intermediate takes its parent's)")
    ca.add_argument("--days", type=int, default=None, metavar="N",
                    help="validity in days (default 365 for a root, 30 for an intermediate)")
    ca.add_argument("--parent", type=Path, default=None, metavar="DIR",
                    help="make an intermediate CA signed by the CA in DIR (also writes ca-chain.pem)")
    ca.add_argument("--key-type", choices=("ec-p256", "rsa-2048"), default="ec-p256")
    ca.add_argument("--force", action="store_true", help="overwrite an existing CA in --out")

    issue = sub.add_parser("issue", help="issue a workload certificate with a SPIFFE ID")
    issue.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA made by 'certs ca'")
    issue.add_argument("--spiffe-id", required=True, metavar="spiffe://TRUST-DOMAIN/PATH")
    issue.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="writes cert.pem (leaf + chain), key.pem (0600), bundle.pem (the root)")
    issue.add_argument("--ttl", default="24h", help="lifetime, e.g. 1h, 24h, 7d (default 24h)")
    issue.add_argument("--key-type", choices=("ec-p256", "rsa-2048"), default="ec-p256")


def run(args: argparse.Namespace) -> int:
    try:
        if args.certs_command == "ca":
            lines = _cmd_ca(args)
        else:
            lines = _cmd_issue(args)
    except _Usage as exc:
        print(f"certs {args.certs_command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError) as exc:
        detail = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
        print(f"certs {args.certs_command}: {detail}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def _describe_key(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec
    return "ECDSA P-256" if isinstance(key, ec.EllipticCurvePrivateKey) else f"RSA-{key.key_size}"


def _cmd_ca(args: argparse.Namespace) -> list[str]:
    from . import certs

    if args.days is not None and args.days <= 0:
        raise _Usage("--days must be positive")
    if (args.out / certs.CA_KEY_FILE).exists() and not args.force:
        raise OSError(f"{args.out / certs.CA_KEY_FILE} exists: a new CA would orphan every certificate it issued "
                      f"(use --force to replace it)")
    if args.parent is not None:
        parent, _ = certs.read_ca(args.parent)
        ca = certs.make_intermediate(parent, key_type=args.key_type, days=args.days or 30)
        kind = "intermediate CA"
    else:
        try:
            ca = certs.make_ca(args.trust_domain, key_type=args.key_type, days=args.days or certs.DEFAULT_CA_DAYS)
        except ValueError as exc:
            raise _Usage(f"--trust-domain {args.trust_domain!r}: {exc}") from None
        kind = "root CA"
    paths = certs.write_ca(args.out, ca)
    until = ca.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"wrote {paths[0]}  ({kind} for spiffe://{certs.trust_domain_of(ca.cert)}, "
             f"{_describe_key(ca.key)}, valid until {until})",
             f"wrote {paths[1]}  (its private key, mode 0600)"]
    if len(paths) > 2:
        lines.append(f"wrote {paths[2]}  (the CAs above it, root last)")
    return lines


def _cmd_issue(args: argparse.Namespace) -> list[str]:
    import datetime as dt

    from . import certs
    from .spiffe import parse_spiffe_id

    try:
        ttl = dt.timedelta(seconds=parse_ttl(args.ttl))
    except ValueError as exc:
        raise _Usage(f"--ttl: {exc}") from None
    try:
        sid = parse_spiffe_id(args.spiffe_id)
    except ValueError as exc:
        raise _Usage(f"--spiffe-id {args.spiffe_id!r}: {exc}") from None
    if not sid.path:
        raise _Usage(f"--spiffe-id {args.spiffe_id!r}: a workload ID has a path (spiffe://{sid.trust_domain}/...)")
    ca, bundle = certs.read_ca(args.ca)
    workload = certs.issue_workload(ca, str(sid), ttl=ttl, key_type=args.key_type)
    paths = certs.write_workload(args.out, workload, bundle)
    by_name = {p.name: p for p in paths}
    until = workload.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    clipped = " (cut to the CA's own expiry)" if workload.cert.not_valid_after_utc < (
        dt.datetime.now(dt.timezone.utc) + ttl - dt.timedelta(minutes=1)) else ""
    return [f"wrote {by_name[certs.CERT_FILE]}  ({sid}, {_describe_key(workload.key)}, valid until {until}{clipped}; "
            f"leaf + {len(workload.chain)} intermediate(s))",
            f"wrote {by_name[certs.KEY_FILE]}  (its private key, mode 0600)",
            f"wrote {by_name[certs.BUNDLE_FILE]}  (trust bundle: the root CA)"]
