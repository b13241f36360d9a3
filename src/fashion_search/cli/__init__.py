"""`fashion-search <command>`: a thin face over the library; heavy imports happen per command.

One module per command group: catalog (synth, data, download-fashioniq, index, info, search), learning
(train, eval, demo), serving (serve, ui); args holds what they share.
"""

from __future__ import annotations

import logging
import os
import sys

from fashion_search.cli import catalog, learning, serving
from fashion_search.cli.args import EXIT_USAGE, Parser
from fashion_search.errors import FashionSearchError


def build_parser() -> Parser:
    from fashion_search import __version__

    parser = Parser(
        prog="fashion-search",
        description="Composed image retrieval for fashion: index a catalog of photos, search it by image, "
        "text or both, fine-tune and evaluate on Fashion-IQ, and serve an HTTP API and a web page.",
        epilog="`fashion-search COMMAND --help` lists a command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"fashion-search {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (catalog, learning, serving):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a bad flag: returned, so main() never exits itself
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except FashionSearchError as exc:
        print(f"fashion-search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fashion-search: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fashion-search ... | head`: the reader left; exit quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run() -> None:
    """The console script: main(), then, on success, an immediate exit.

    Tearing down the thousands of modules torch and open_clip import is a noticeable pause at interpreter
    exit, paid by every command after its work is done and its output written. On success there is nothing
    left to do: index files are written atomically and closed, DataLoader workers have exited, and
    stdout/stderr are flushed here. Errors take the normal exit path, cleanup included.
    """
    code = main()
    if code != 0:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    run()
