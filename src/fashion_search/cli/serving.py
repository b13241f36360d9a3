"""CLI commands that serve an index: `serve` (the HTTP API) and `ui` (the Streamlit page)."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import fields

from fashion_search.cli.args import (
    add_device_arg,
    add_runtime_args,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
)
from fashion_search.errors import FashionSearchError
from fashion_search.service.limits import LOG_FORMATS, ServerLimits

_NEEDS = {"serve": ("fastapi", "uvicorn"), "ui": ("streamlit",)}

# serve's flags for ServerLimits' fields: (flag, type, help); defaults come from ServerLimits itself.
_LIMIT_FLAGS = {
    "max_upload_bytes": ("--max-upload-mb", positive_float, "largest image upload in MB"),
    "max_pixels": ("--max-pixels", positive_int, "largest decoded image in pixels"),
    "max_decode_bytes": (
        "--max-decode-mb",
        positive_float,
        "memory one upload's decode may take in MB (a 16-bit or palette image takes more per pixel)",
    ),
    "max_text_chars": ("--max-text-chars", positive_int, "longest text query"),
    "rate_limit": ("--rate-limit", non_negative_float, "requests per second per client address; 0: off"),
    "rate_burst": ("--rate-burst", positive_int, "burst allowance; none: 2 s worth"),
    "reload_interval": (
        "--reload-interval",
        non_negative_float,
        "seconds between checks for a rebuilt index, swapped in without downtime; 0: off",
    ),
    "graceful_timeout": (
        "--graceful-timeout",
        non_negative_float,
        "on SIGTERM/SIGINT, seconds to let requests in flight finish",
    ),
    "header_timeout": (
        "--header-timeout",
        positive_float,
        "seconds a client has to send its request headers",
    ),
    "body_timeout": ("--body-timeout", positive_float, "seconds a client has to send its request body"),
    "max_connections": ("--max-connections", positive_int, "open connections; over it a 503"),
    "max_uploads_in_memory": (
        "--max-uploads-in-memory",
        positive_int,
        "image uploads read and searched at once; the others wait unread",
    ),
}
_MB = 1024 * 1024


def _check_face(face: str, host: str, port: int) -> None:
    """Refuse up front what would fail only after the index and model are loaded."""
    from fashion_search.service.ui_launch import check_port_free

    missing = [name for name in _NEEDS[face] if importlib.util.find_spec(name) is None]
    if missing:  # a CLI-only install (pip install .)
        raise FashionSearchError(
            f"`fashion-search {face}` needs {', '.join(missing)}: pip install 'fashion-search[{face}]'"
        )
    check_port_free(host, port)


_IN_MB = {"max_upload_bytes": "max_upload_mb", "max_decode_bytes": "max_decode_mb"}


def limits_from_args(args) -> ServerLimits:
    from fashion_search.service.auth import load_api_keys

    values = {name: getattr(args, name) for name in _LIMIT_FLAGS if name not in _IN_MB}
    values.update({name: int(getattr(args, dest) * _MB) for name, dest in _IN_MB.items()})
    return ServerLimits(
        cors_origins=tuple(args.cors_origins or ()),
        api_keys=load_api_keys(args.api_key_file),
        log_format=args.log_format,
        **values,
    )


def cmd_serve(args) -> int:
    _check_face("serve", args.host, args.port)
    from fashion_search.service.api import serve

    return serve(
        args.index,
        args.host,
        args.port,
        limits_from_args(args),
        device=args.device,
        runtime=args.runtime,
        precision=args.precision,
        export_dir=args.export_dir,
    )


def cmd_ui(args) -> int:
    _check_face("ui", args.host, args.port)
    from fashion_search.service.ui_launch import serve

    if args.export_dir:
        raise FashionSearchError("ui takes --runtime and --precision; --export-dir is for serve and search")
    return serve(args.index, args.host, args.port, args.device, args.runtime, args.precision)


def _add_listen_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--index", required=True, help="index directory (from `fashion-search index`)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=port_number, default=port, help=f"default {port}")
    add_device_arg(p)
    add_runtime_args(p, recorded=True)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP API over an index")
    _add_listen_args(p, 8000)
    g = p.add_argument_group("limits and operations")
    defaults = {f.name: f.default for f in fields(ServerLimits)}
    for name in _IN_MB:
        defaults[name] /= _MB
    for name, (flag, kind, text) in _LIMIT_FLAGS.items():
        default = defaults[name]
        shown = (
            "none" if default is None else f"{default:,g}" if isinstance(default, float) else f"{default:,}"
        )
        g.add_argument(
            flag,
            dest=_IN_MB.get(name, name),
            type=kind,
            default=default,
            help=f"{text} (default {shown})",
        )
    g.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=None,
        help="allow browser calls from this origin (repeatable; default: none)",
    )
    g.add_argument(
        "--api-key-file",
        default=None,
        help="require one of these keys (one a line; also $FASHION_SEARCH_API_KEYS) as "
        "'Authorization: Bearer KEY' or 'X-API-Key: KEY' everywhere but /health",
    )
    g.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=ServerLimits.log_format,
        help="text, or json: one JSON object a line with a request id (default text)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="Streamlit web UI over an index")
    _add_listen_args(p, 8501)
    p.set_defaults(func=cmd_ui)
