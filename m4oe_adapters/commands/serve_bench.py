"""``m4oe serve-bench``: a bounded load test of ``m4oe serve`` on 127.0.0.1 (throughput and p50/p99 for single vs
mixed traffic, batch-1 vs batched, during hot swaps; memory with 100 adapters; overhead vs in-process)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import add_threads_argument, runtime_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve-bench", help="bounded load test of the service on localhost")
    parser.add_argument("--zoo", required=True, help="zoo folder (reference backbone + adapters)")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA"),
                        help="shared data folder with manifest.csv (default: $M4OE_DATA)")
    parser.add_argument("--requests", type=int, default=72, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8, help="tiles per forward of the batched service")
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit of each scenario")
    parser.add_argument("--overhead-runs", type=int, default=15)
    parser.add_argument("--memory-adapters", type=int, default=100, help="adapters of the memory scenario (0: skip)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--device", default="cpu",
                        help="where the services under test run: cpu (the targets are for this CPU), auto, cuda...")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import atomic_write
    from ..errors import ConfigError
    from ..serve.loadtest import markdown, run_bench

    if not args.data:
        raise ConfigError("pass --data (the shared data folder with manifest.csv) or set M4OE_DATA")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"{args.out} exists; pass --overwrite to replace it")
    report = run_bench(args.zoo, args.data, requests=args.requests, concurrency=args.concurrency,
                       max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, seconds=args.seconds,
                       overhead_runs=args.overhead_runs, memory_adapters=args.memory_adapters,
                       device=str(runtime_from_args(args)[0]))
    report["command"] = "m4oe " + " ".join(args.argv)
    print(markdown(report))
    if args.out:
        text = json.dumps(report, indent=2)
        atomic_write(args.out, lambda temporary: Path(temporary).write_text(text + "\n"))
    return 0
