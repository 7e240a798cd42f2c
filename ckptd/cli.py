"""``ckptd`` command line: serve, ls, inspect, verify, gc, status, export, demo.

Exit codes: 0 success, 1 a check failed, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ckptd import protocol as proto

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_serve(args: argparse.Namespace) -> int:
    from ckptd import server

    if args.leader or args.nnodes not in (None, 1):
        print(
            "ckptd serve: multi-node commit (--leader/--node-rank/--nnodes) is not available in this version; "
            "run one daemon per node with a node-local output_dir, or a single node",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        endpoint = proto.resolve_endpoint(args.endpoint)
        config = server.DaemonConfig(
            endpoint=endpoint,
            idle_exit_s=args.idle_exit,
            writer_threads=args.writer_threads,
            sweep_dirs=[Path(p).resolve() for p in args.output_dir],
        )
        return server.serve(config)
    except server.EndpointBusy as e:
        print(f"ckptd serve: {e}; use that daemon, or pass another --endpoint", file=sys.stderr)
        return EXIT_USAGE
    except (proto.ProtocolError, PermissionError) as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptd", description="Asynchronous, transactional checkpoints for PyTorch.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node daemon")
    s.add_argument("--endpoint", help=f"ZeroMQ endpoint (default ${proto.ENDPOINT_ENV} or {proto.default_endpoint()})")
    s.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="S",
        help="exit after S seconds with no transaction and no live client",
    )
    s.add_argument("--writer-threads", type=int, default=4, metavar="N", help="parallel file writers (default 4)")
    s.add_argument(
        "--output-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="remove stale temp/trash directories under DIR/checkpoints at start (repeatable)",
    )
    s.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--leader", help="multi-node leader tcp://HOST:PORT (not yet available)")
    s.add_argument("--node-rank", type=int)
    s.add_argument("--nnodes", type=int)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)
