"""``python -m merge serve``: a combined folder behind an OpenAI-compatible HTTP API (``[serve]`` extra)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from merge.errors import MergeError

from .extras import require
from .run import add_pixel_arguments, add_session_arguments, add_video_arguments

log = logging.getLogger(__name__)

SERVE_MODULES = ("fastapi", "uvicorn")
MAX_PORT = 65535


def serve(args: argparse.Namespace) -> int:
    """Serve a combined folder over HTTP: OpenAI's chat completions API, with continuous batching.

    Routes: POST /v1/chat/completions (OpenAI's format: text, image_url and video_url parts, stream, max_tokens,
    temperature, top_p, top_k, seed, stop; usage in the answer), GET /v1/models, GET /health, and a chat page at /.
    Requests that arrive while others are answered join the running batch at its next step (up to --max-batch
    rows); up to --max-queue more wait, and past that the server answers 429. Answers are greedy unless a request
    sets a temperature.

    Media: data: URLs always; file:// URLs only under --allow-local-media DIR; http(s) URLs only with
    --allow-remote-media, each within --max-media-bytes and --media-timeout. Ctrl-C or SIGTERM stop the server.
    """
    require("serve", SERVE_MODULES, "serve")
    from merge.runtime.model import check_threads
    from merge.serve.media import MediaPolicy
    from merge.serve.service import ServeOptions

    if not 0 <= args.port <= MAX_PORT:
        raise MergeError(f"--port must be from 0 to {MAX_PORT}, got {args.port}")
    check_threads(args.threads, "--threads")
    numbers = {"--max-batch": args.max_batch, "--max-queue": args.max_queue, "--max-tokens": args.max_tokens,
               "--max-prompt-tokens": args.max_prompt_tokens, "--max-request-bytes": args.max_request_bytes,
               "--max-media-bytes": args.max_media_bytes}
    for option, value in numbers.items():
        if value < 1:
            raise MergeError(f"{option} must be at least 1, got {value}")
    if not 0 < args.media_timeout <= 3600:
        raise MergeError(f"--media-timeout must be above 0 and at most 3600 seconds, got {args.media_timeout}")
    if args.allow_local_media is not None and not Path(args.allow_local_media).is_dir():
        raise MergeError(f"--allow-local-media {args.allow_local_media} is not a folder")
    if args.fps is not None and not 0 < args.fps <= 1000:
        raise MergeError(f"--fps must be above 0 and at most 1000, got {args.fps}")
    media = MediaPolicy(max_bytes=args.max_media_bytes, timeout=args.media_timeout, remote=args.allow_remote_media,
                        local_root=None if args.allow_local_media is None else Path(args.allow_local_media).resolve())
    options = ServeOptions(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                           max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes,
                           media=media, model_name=args.model_name, threads=args.threads, min_pixels=args.min_pixels,
                           max_pixels=args.max_pixels, fps=args.fps, max_frames=args.max_frames,
                           check_checksums=args.check_checksums)
    return run_server(Path(args.combined), options, args.host, args.port)


def run_server(folder: Path, options, host: str, port: int) -> int:
    import uvicorn

    from merge.serve.app import create_app
    from merge.serve.service import Service

    service = Service(folder, options)
    log.info("serving %s as %r on http://%s:%d (max batch %d, max queue %d)", folder, service.name, host, port,
             options.max_batch, options.max_queue)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        service.close()
    return 0 if server.started else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on ``python -m merge``'s subparsers."""
    from merge.serve import limits

    parser = subparsers.add_parser("serve", help=serve.__doc__.strip().splitlines()[0], description=serve.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("combined", help="a combined folder written by `python -m merge build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-batch", type=int, default=limits.DEFAULT_MAX_BATCH, metavar="N",
                        help=f"requests decoded together at most (default {limits.DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-queue", type=int, default=limits.DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests waiting for a place in the batch at most; past it, 429 (default "
                             f"{limits.DEFAULT_MAX_QUEUE})")
    parser.add_argument("--max-tokens", type=int, default=limits.DEFAULT_MAX_TOKENS, metavar="N",
                        help=f"the most tokens a request may ask for, and what it gets when it does not say "
                             f"(default {limits.DEFAULT_MAX_TOKENS})")
    parser.add_argument("--max-prompt-tokens", type=int, default=limits.DEFAULT_MAX_PROMPT_TOKENS, metavar="N",
                        help=f"the longest prompt, image and video tokens included (default "
                             f"{limits.DEFAULT_MAX_PROMPT_TOKENS})")
    parser.add_argument("--max-request-bytes", type=int, default=limits.DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                        help=f"the largest request body; past it, 413 (default {limits.DEFAULT_MAX_REQUEST_BYTES})")
    parser.add_argument("--allow-local-media", metavar="DIR", default=None,
                        help="take file:// image and video URLs, only under DIR (default: refused)")
    parser.add_argument("--allow-remote-media", action="store_true",
                        help="fetch http(s) image and video URLs (default: refused)")
    parser.add_argument("--max-media-bytes", type=int, default=limits.DEFAULT_MAX_MEDIA_BYTES, metavar="N",
                        help=f"the largest image or video, decoded from base64 or downloaded (default "
                             f"{limits.DEFAULT_MAX_MEDIA_BYTES})")
    parser.add_argument("--media-timeout", type=float, default=limits.DEFAULT_MEDIA_TIMEOUT, metavar="S",
                        help=f"seconds a download may take (default {limits.DEFAULT_MEDIA_TIMEOUT:g})")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the model id the API lists and requests name (default: the folder's name)")
    add_pixel_arguments(parser)
    add_video_arguments(parser)
    add_session_arguments(parser)
    parser.set_defaults(func=serve)
    return parser
