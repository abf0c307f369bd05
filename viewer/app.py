"""`python app.py`: the command line of the viewer. Loads the model once, then serves the page on localhost.

Gradio and the model stack are imported after the arguments are checked, so --help and argument errors answer without
them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dataset.ct import InputError
from inference.cases import DEFAULT_MAX_NEW_TOKENS
from inference.cli import DEMO_BANNER, DEMO_CHECKPOINT, DEMO_SEED, demo_case, load, with_clear_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python app.py", description="Read CT with OmniAbnorm-CT in the browser: scroll slices, mark a region "
        "to have it described, find and measure abnormalities. Serves a page on localhost (see docs/viewer.md).")
    p.add_argument("--checkpoint", help="our checkpoint folder, or the released OmniAbnorm-CT folder (default: the "
                                        "demonstration model in checkpoint/demo/)")
    p.add_argument("--base-model", help="local Qwen2.5-VL-7B-Instruct folder (needed by the released layout)")
    p.add_argument("--demo", action="store_true", help="open the bundled phantom case with the demo checkpoint")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; the page reads files by path)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--fast", action="store_true", help="decode fast paths, as in inference.py (docs/performance.md)")
    p.set_defaults(batch_size=1)  # inference.cli.load reads these options; the viewer runs one case at a time
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return with_clear_errors(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: give a port number between 1 and 65535")
    if args.demo and args.checkpoint:
        raise InputError("--demo opens its phantom case with checkpoint/demo/; leave out --checkpoint")
    check_address(args.host, args.port)  # before the model load, which can take minutes
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEMO_CHECKPOINT
    demo_model = checkpoint.resolve() == DEMO_CHECKPOINT.resolve()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # SPEC §9: nothing reaches the network unless asked
    if demo_model:
        print(DEMO_BANNER, file=sys.stderr)
    pipe = load(checkpoint, args.base_model, args)

    # Everything the app writes (uploads, Gradio's copies of views and downloads, results) goes into one temporary
    # folder, removed when the app stops: on Ctrl-C, and on `kill` (SIGTERM stops the server the same way).
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="omniabnorm-viewer-") as workdir:
        os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(workdir) / "gradio"))
        from viewer.ui import Initial, Viewer

        initial = None
        if args.demo:
            case, truth = demo_case(Path(workdir), pipe.seg_size)
            initial = Initial(case.input, case.slice, f"Demo case: synthetic phantom (seed {DEMO_SEED}), {case.plane} "
                                                      f"slice {case.slice}; ground truth: {truth}.")
        page = Viewer(pipe, Path(workdir), initial, DEMO_BANNER if demo_model else None).build()
        try:
            page.launch(server_name=args.host, server_port=args.port, allowed_paths=[workdir])
        except OSError:  # taken since check_address
            raise InputError(f"cannot serve on {args.host}:{args.port}: the port is in use; pick another --port") \
                from None
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # Gradio's launch() closes the server on it and returns


def check_address(host: str, port: int) -> None:
    """InputError unless this machine can listen on host:port (a free port, an address of this machine)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise InputError(f"cannot serve on {host}:{port} ({err.strerror or err}): pick another --port, or a --host "
                         f"address of this machine") from None
