"""Statistics with torchrun across CPU processes (gloo, one thread each) against one process
with one thread, on the default model: tokens/s of ``factedit stats --recompute``.

    python bench/bench_dist_stats.py --layer 4 --tokens 16384 --nproc 2
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(nproc: int, layer: int, tokens: int) -> float:
    args = [
        "stats",
        "--layer",
        str(layer),
        "--tokens",
        str(tokens),
        "--recompute",
        "--threads",
        "1",
    ]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "factedit", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "factedit", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=True)
    return float(re.search(r"\(([\d.]+) tokens/s\)", proc.stdout).group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    one = run(1, args.layer, args.tokens)
    many = run(args.nproc, args.layer, args.tokens)
    print(
        f"layer {args.layer}, {args.tokens} tokens, one thread per process, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}"
    )
    print(f"1 process:           {one:,.0f} tokens/s")
    print(f"{args.nproc} processes (gloo): {many:,.0f} tokens/s = {many / one:.2f}x")
    print("command: python " + " ".join(["bench/bench_dist_stats.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
