"""The ecosystem's command line: `python -m <pkg> serve|token ...`."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import logs
from .config import EcosystemConfig
from .errors import KernelError
from .tokens import TokenStore


def _parser(config: EcosystemConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=config.name, description=config.description or f"The {config.name} ecosystem.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ecosystem: MCP gateway at /mcp, Grace at /, /healthz")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--state", required=True, type=Path, help="state directory (database, keys, tokens)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    token = sub.add_parser("token", help="create (once) a client bearer token and print the file that holds it")
    token.add_argument("--state", required=True, type=Path)
    token.add_argument("--name", default="default")
    token.add_argument("--allow", action="append", default=None,
                       help="tool pattern this token may call (fnmatch over <mad>.<tool>; repeatable; default '*')")
    return parser


def _serve(config: EcosystemConfig, args: argparse.Namespace) -> int:
    import uvicorn

    from .gateway import build_app
    from .runtime import Runtime

    logs.configure(args.log_level)
    runtime = Runtime(config, args.state)
    tokens = TokenStore(runtime.state_dir)
    app = build_app(runtime, tokens, host=args.host)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{config.name} serving on http://{host}:{args.port}/ (MCP: http://{host}:{args.port}/mcp)", flush=True)
    # uvicorn captures SIGINT/SIGTERM and shuts down gracefully (the lifespan stops the MADs and
    # closes the database), then re-raises the signal to the handlers it found: these, which
    # turn a completed graceful shutdown into exit code 0.
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        logs.get("cli").info("stopped by signal", extra={"signal": signal.Signals(received[0]).name})
    return 0 if server.started else 1


def _token(args: argparse.Namespace) -> int:
    path = TokenStore(args.state).ensure(args.name, args.allow)
    print(path.resolve(), flush=True)
    return 0


def main(config: EcosystemConfig, argv: list[str] | None = None) -> int:
    args = _parser(config).parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(config, args)
        return _token(args)
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
