"""`sdlora ui`: start the web UI (the `ui` package) on this machine."""

from __future__ import annotations

from pathlib import Path

from ..errors import SdloraError


def register(sub) -> None:
    """Add `sdlora ui` to the `sdlora` subparsers."""
    p = sub.add_parser("ui", help="Start the web UI: train, watch, preview, inspect and merge LoRAs in a browser.")
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument("--auth", metavar="USER:PASS", help="Ask for this username and password before showing the UI.")
    p.add_argument("--share", action="store_true", help="Also make a public gradio.live link (off by default).")
    p.add_argument("--output-dir", default="output", metavar="DIR",
                   help="Where trained LoRAs, samples and uploads go (default ./output).")
    p.add_argument("--model", default="", metavar="PATH_OR_ID",
                   help="Base model the pages start with (default: the built-in shapes-world model).")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="A folder the pages may read images and models from (repeatable; default: the folder it "
                        "starts in). Paths typed in the browser outside these and the output folder are refused.")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    from ui.app import parse_auth, serve
    from ui.jobs import JobManager

    auth = parse_auth(args.auth)
    if args.share and not auth:
        raise SdloraError("--share makes a public link anyone can open: give --auth USER:PASSWORD too")
    if args.host not in ("127.0.0.1", "localhost") and not auth:
        print(f"warning: listening on {args.host} without --auth: anyone who can reach this port can use it")
    roots = [Path(r) for r in args.data_root] if args.data_root else [Path.cwd()]
    missing = [r for r in roots if not r.is_dir()]
    if missing:
        raise SdloraError(f"--data-root {missing[0]} is not a folder")
    manager = JobManager(Path(args.output_dir).resolve(), model=args.model, data_roots=roots)
    try:
        serve(manager, host=args.host, port=args.port, auth=auth, share=args.share)
    finally:
        manager.close()
    return 0
