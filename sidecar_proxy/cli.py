"""``sidecar-proxy run | validate | demo``.

Exit codes: 0 success; 1 the config is invalid or the daemon could not start
(the reason is printed, never a traceback); 2 bad command-line usage.
"""
from __future__ import annotations

import argparse
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

    validate = sub.add_parser("validate", help="check a config and print every error with its path")
    validate.add_argument("--config", type=Path, required=True)

    demo = sub.add_parser("demo", help="run the proxy on the embedded default config and relay real traffic "
                                       "through it to a local backend")
    demo.add_argument("--duration", type=float, default=None, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")
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
    import uvloop

    from .admin.handlers import build_routes
    from .admin.server import AdminServer
    from .app import App

    logs.configure(args.log_level, args.log_format)
    if args.drain_time_s < 0:
        print("--drain-time-s must not be negative", file=sys.stderr)
        return 2
    config = _load_or_report(args.config)
    if config is None:
        return 1

    async def main() -> int:
        app = App(config_path=args.config, drain_time=args.drain_time_s)
        return await app.run(config, AdminServer(build_routes(app)))

    return uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args.duration)
    return cmd_run(args)
