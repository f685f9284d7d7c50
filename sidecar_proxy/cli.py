"""``sidecar-proxy run | validate | init-iptables | demo | control-server | certs``.

Exit codes: 0 success; 1 the config is invalid or the daemon could not start
(the reason is printed, never a traceback); 2 bad command-line usage.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import __version__, logs
from .config import load


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar-proxy", description="A transparent L4/L7 sidecar proxy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy daemon")
    run.add_argument("--config", type=Path, help="YAML or JSON config (default: the embedded default config)")
    run.add_argument("--log-level", choices=logs.LEVELS, default="info")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--drain-time-s", type=float, default=20.0, metavar="N",
                     help="on SIGTERM or /quitquitquit, how long in-flight connections may finish (default 20)")
    run.add_argument("--http1-codec", choices=("auto", "h11", "httptools"), default=None,
                     help="HTTP/1.1 parser of every auto/http listener, overriding their http.codec in this "
                          "and every reloaded config (auto: httptools when installed, else h11)")

    validate = sub.add_parser("validate", help="check a config and print every error with its path")
    validate.add_argument("--config", type=Path, required=True)

    init = sub.add_parser("init-iptables", help="install the pod's interception rules (run once by the init "
                                                "container, with NET_ADMIN)")
    from .interception import options as intercept_options
    intercept_options.add_arguments(init)
    action = init.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true",
                        help="print the exact rules (and policy routing) and change nothing")
    action.add_argument("--cleanup", action="store_true",
                        help="remove exactly what init-iptables installs, nothing else")
    init.add_argument("--verify", action="store_true",
                      help="after installing, prove that a connection is redirected to the outbound port and "
                           "that the proxy's own uid/gid is not")

    demo = sub.add_parser("demo", help="run the proxy on the embedded default config and relay real traffic "
                                       "through it to a local backend")
    demo.add_argument("--duration", type=float, default=None, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")

    ctl = sub.add_parser("control-server", help="serve listeners, routes, clusters and endpoints from files to "
                                                "proxies (xDS-style REST long-poll)")
    ctl.add_argument("--dir", type=Path, required=True, metavar="PATH",
                     help="directory with listeners.yaml, routes.yaml, clusters.yaml, endpoints.yaml "
                          "(a missing file is an empty list)")
    ctl.add_argument("--address", default="127.0.0.1")
    ctl.add_argument("--port", type=int, default=15010)
    ctl.add_argument("--max-wait-s", type=float, default=30.0, metavar="S",
                     help="how long a poll at the current version is held before 304 (default 30)")
    ctl.add_argument("--poll-interval-s", type=float, default=0.2, metavar="S",
                     help="how often the files are checked for changes (default 0.2)")
    ctl.add_argument("--log-level", choices=logs.LEVELS, default="info")
    ctl.add_argument("--log-format", choices=("text", "json"), default="text")

    certs = sub.add_parser("certs", help="make a mesh CA and SPIFFE workload certificates (for demos and tests)")
    from .tls import cli as certs_cli
    certs_cli.add_arguments(certs)
    return parser


def _load_or_report(path: Path | None):
    try:
        return load.load_file(path or load.default_config_path())
    except load.ConfigError as exc:
        print(f"{path or 'embedded default config'}: invalid config", file=sys.stderr)
        for p, m in exc.errors:
            print(f"  {p}: {m}" if p else f"  {m}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    if _load_or_report(args.config) is None:
        return 1
    print("OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # Until the event loop takes SIGTERM over (App.run), nothing is bound or
    # in flight: stopping then is a clean exit, not death by signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    import uvloop

    from .admin.handlers import build_routes
    from .admin.server import AdminServer
    from .app import App

    logs.configure(args.log_level, args.log_format)
    if args.drain_time_s < 0:
        print("--drain-time-s must not be negative", file=sys.stderr)
        return 2
    if args.http1_codec is not None:
        from .protocols.http1 import resolve_codec
        try:
            resolve_codec(args.http1_codec)
        except ValueError as exc:
            print(f"--http1-codec: {exc}", file=sys.stderr)
            return 2
    config = _load_or_report(args.config)
    if config is None:
        return 1

    async def main() -> int:
        app = App(config_path=args.config, drain_time=args.drain_time_s)
        # The listener manager outlives snapshots, so the override holds for
        # every config (file, SIGHUP, POST /config, control server); the
        # configs themselves, and /config_dump, keep what the user wrote.
        app.listeners.codec_override = args.http1_codec
        return await app.run(config, AdminServer(build_routes(app)))

    return uvloop.run(main())


def cmd_control_server(args: argparse.Namespace) -> int:
    import uvloop

    from .control import server

    logs.configure(args.log_level, args.log_format)
    if args.max_wait_s <= 0 or args.poll_interval_s <= 0:
        print("control-server: --max-wait-s and --poll-interval-s must be positive", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print("control-server: --port must be 1..65535", file=sys.stderr)
        return 2
    if not args.dir.is_dir():
        print(f"control-server: --dir {args.dir}: not a directory", file=sys.stderr)
        return 1
    return uvloop.run(server.serve(args.dir, args.address, args.port, max_wait=args.max_wait_s,
                                   poll_interval=args.poll_interval_s))


def cmd_init_iptables(args: argparse.Namespace) -> int:
    from .interception import apply, options

    try:
        opts = options.from_namespace(args)
    except options.OptionError as exc:
        print(f"init-iptables: {exc}", file=sys.stderr)
        return 2
    if args.verify and (args.dry_run or args.cleanup):
        print("init-iptables: --verify goes with installing, not with --dry-run or --cleanup", file=sys.stderr)
        return 2
    if not args.dry_run and not apply.has_net_admin():
        print("init-iptables: this process lacks CAP_NET_ADMIN, which changing iptables needs (give the init "
              "container securityContext.capabilities.add: [NET_ADMIN]); nothing was changed", file=sys.stderr)
        return 1
    try:
        backend = opts.backend if opts.backend != "auto" else apply.detect_backend()
        fams = apply.families(opts, backend)
        if args.dry_run:
            sys.stdout.write(apply.dry_run(opts, backend, fams))
            return 0
        done = apply.cleanup(opts, backend, fams) if args.cleanup else apply.install(opts, backend, fams)
        if args.verify:
            done += [apply.verify_family(opts, family) for family in fams]
    except apply.InterceptError as exc:
        print(f"init-iptables: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a socket error of --verify not foreseen there
        print(f"init-iptables: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for line in done or ["nothing to do"]:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "init-iptables":
        return cmd_init_iptables(args)
    if args.command == "control-server":
        return cmd_control_server(args)
    if args.command == "certs":
        from .tls import cli as certs_cli
        return certs_cli.run(args)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args.duration)
    return cmd_run(args)
