"""`mlxd launch`: start a distributed group with MLX's own launcher, `mlx.launch`.

It runs `mlx.launch` with this Python and `-m mlxd.server.cli`, so every rank
runs the same mlxd (install it at the same path on every machine, or pass
--python), and adds `--distributed` to `serve`. `mlx.launch` stops the other
ranks when one fails but exits 0 itself; this wrapper reads its report and exits
1 then, so a supervisor (launchd, systemd) sees the failure and restarts the group.
Stopping the wrapper (SIGTERM, Ctrl-C) stops the whole group cleanly: every local
process gets SIGINT, rank 0 shuts down and tells the other ranks to stop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

BACKENDS = ("ring", "jaccl", "jaccl-ring")
# mlx.launch's words when a rank ends badly.
_RANK_FAILED = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")


def launcher_command(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The mlx.launch command line for `mlxd launch ARGS -- REST`."""
    if rest and rest[0] == "--":
        rest = rest[1:]
    if rest[:1] == ["serve"] and "--distributed" not in rest:
        rest = ["serve", "--distributed", *rest[1:]]
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-c",
                                                    "from mlx._distributed_utils.launch import main; main()"]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    else:
        cmd += ["--hosts", args.hosts, "-n", str(args.n)]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.starting_port:
        cmd += ["--starting-port", str(args.starting_port)]
    for env in args.env or []:
        cmd += ["--env", env]
    cmd += ["--python", args.python or sys.executable, "--", "-m", "mlxd.server.cli", *rest]
    return cmd


def run(args: argparse.Namespace) -> int:
    rest = list(args.command_args)
    if not rest or rest == ["--"]:
        print("mlxd launch: give the command after --, e.g. mlxd launch --hosts h1,h2 -- serve --model M",
              file=sys.stderr)
        return 2
    cmd = launcher_command(args, rest)
    # stdin: a pipe that stays open; mlx.launch forwards stdin and would spin on a closed one.
    # A session of its own: stopping mlxd launch stops mlx.launch and the local ranks with it
    # (mlx.launch alone would leave them running); remote ranks end with their ssh.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)

    stopping = []

    def stop(signum, frame):  # as Ctrl-C in a terminal: rank 0 stops the others and all exit 0
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = []
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        m = _RANK_FAILED.search(line)
        if m:
            failed.append(m.group(0))
    code = proc.wait()
    if failed:
        print(f"mlxd launch: the group failed ({'; '.join(failed)})", file=sys.stderr)
        return 1
    return 0 if stopping else code  # mlx.launch itself ends on the interrupt with a traceback


def add_parser(subparsers: Any) -> None:
    """Register `launch [--hosts H] [-n N] [--backend B] -- COMMAND` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "launch", help="run an mlxd command on several machines with mlx.launch (serve gets --distributed)",
        description="Run `mlxd COMMAND` as a distributed group with mlx.launch, e.g. "
                    "mlxd launch --hosts 10.0.0.1,10.0.0.2 -- serve --model qwen2.5-coder:32b")
    parser.add_argument("--hosts", default="127.0.0.1", help="comma-separated IPs, rank 0 first (ring: IPs only)")
    parser.add_argument("-n", type=int, default=1, help="ranks per host (default: 1)")
    parser.add_argument("--hostfile", help="a hostfile written by mlx.distributed_config (instead of --hosts)")
    parser.add_argument("--backend", choices=BACKENDS, help="ring (TCP: Ethernet, Thunderbolt) or jaccl "
                                                           "(Thunderbolt RDMA); default: the hostfile's, else ring")
    parser.add_argument("--starting-port", type=int, help="ring: first port the ranks listen on (default 32323)")
    parser.add_argument("--env", action="append", help="VAR=VALUE for every rank; repeatable")
    parser.add_argument("--python", help="the Python with mlxd on the other hosts (default: this one's path)")
    parser.add_argument("command_args", nargs=argparse.REMAINDER, help="-- then the mlxd command")
    parser.set_defaults(func=run)
