"""`python -m sglab.launch_server --model-path DIR [...]`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def kill_process_tree(pid: int, include_parent: bool = True) -> None:
    """SIGKILL every descendant of `pid` (and `pid` itself if include_parent)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for child in parent.children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    if include_parent:
        parent.kill()


def main(argv: list[str] | None = None) -> None:
    from sglab.srt.server_args import ServerArgsError, configure_logging, prepare_server_args

    try:
        server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    except ServerArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(server_args.log_level)
    from sglab.srt.entrypoints.http_server import launch_server

    try:
        launch_server(server_args)
    except RuntimeError as e:
        logger.error("%s", e)
        raise SystemExit(1) from None
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
