"""Start a runner: `python -m hearth.runner --listen unix:/path/to.sock` (or `--listen 0.0.0.0:50051`)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from hearth.runner.server import needs_secret, serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hearth.runner", description=__doc__)
    parser.add_argument("--listen", required=True, help="unix:/path/to.sock or host:port (port 0: any free port, announced on stdout)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process goes away")
    parser.add_argument("--log-level", default=os.environ.get("HEARTH_LOG_LEVEL", "info"))
    parser.add_argument("--name", default="", help="model name, for log lines")
    parser.add_argument("--cores-board", type=Path, default=None,
                        help="the server's file of busy runners, to share the cores with them (see hearth/cores.py)")
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a network address without a secret (anyone who can reach it can use it)")
    args = parser.parse_args()
    # The secret comes from the environment, never the command line (which every user of the machine can read).
    secret = os.environ.get("HEARTH_RUNNER_SECRET", "")
    if needs_secret(args.listen) and not secret and not args.insecure:
        parser.exit(2, f"refusing to listen on {args.listen} without a secret: set HEARTH_RUNNER_SECRET (the server "
                       "needs the same), or pass --insecure\n")
    if args.parent_pid and os.getpgid(0) != os.getpid():
        # A process group of its own, so a terminal's Ctrl-C reaches the server (which stops its runners in order)
        # and not the runners too; in the server's session still, so the kernel's per-session scheduling groups
        # treat it as the server (hearth/cores.py). Done here rather than with Popen's preexec_fn, which is unsafe
        # in a server that runs threads. A runner started as a session leader (setsid, an older server) already
        # leads its own group, and may not leave it.
        os.setpgid(0, 0)
    # Started by the server, whose log already stamps time and model on each line we print; by hand, stamp here.
    plain = "%(levelname)s %(message)s"
    stamped = f"%(asctime)s %(levelname)s runner[{args.name or os.getpid()}] %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=plain if args.parent_pid else stamped)
    serve(args.listen, parent_pid=args.parent_pid, cores_board=args.cores_board, secret=secret)


if __name__ == "__main__":
    main()
