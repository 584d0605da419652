"""``m4oe serve``: one backbone in memory and every adapter of a zoo (or of the files given) behind one HTTP
endpoint, on loopback unless told otherwise; ``--engine ray`` runs the same app on Ray Serve replicas."""
from __future__ import annotations

import argparse
import sys

from .common import add_threads_argument


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve every adapter on one backbone over HTTP (mixed batches)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zoo", help="zoo folder (index.json: reference backbone + adapters)")
    source.add_argument("--adapter", action="append", help="adapter file (repeat); backbone from --weights")
    parser.add_argument("--weights", default=None, help="backbone checkpoint of --adapter files ('none': random)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1...")
    parser.add_argument("--max-batch", type=int, default=8, help="most tiles per forward pass (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill (ms)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (MiB)")
    parser.add_argument("--max-megapixels", type=float, default=50.0, help="most pixels per upload (millions)")
    parser.add_argument("--max-in-flight", type=int, default=64, help="segment requests at once (more get 503)")
    parser.add_argument("--widen-adapters", action="store_true",
                        help="hold fp16 adapter files in fp32 (default: in their own dtype, half the memory, the same "
                             "masks)")
    parser.add_argument("--watch", nargs="?", const="", default=None, metavar="FOLDER",
                        help="serve the adapter files of FOLDER (default: the --zoo folder) as they are added, "
                             "replaced and deleted; every Ray replica watching one shared folder serves the same "
                             "adapters")
    parser.add_argument("--watch-interval", type=float, default=2.0, help="seconds between two looks at --watch")
    parser.add_argument("--tokens", default=None,
                        help='JSON file {"predict": ..., "admin": ...} (default: $M4OE_SERVE_TOKEN and '
                             "$M4OE_SERVE_ADMIN_TOKEN, else generated and printed once)")
    parser.add_argument("--engine", choices=("uvicorn", "ray"), default="uvicorn",
                        help="uvicorn: this process; ray: Ray Serve replicas (pip install 'ray[serve]')")
    parser.add_argument("--replicas", default="1", help="Ray Serve replicas: a number or 'auto'")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def settings_from(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..serve import ServeSettings

    watch = args.watch
    if watch == "":
        if not args.zoo:
            raise ConfigError("--watch without a folder watches the --zoo folder; with --adapter files, name the "
                              "folder")
        watch = args.zoo
    if args.watch_interval <= 0:
        raise ConfigError(f"--watch-interval must be > 0 seconds, got {args.watch_interval}")
    return ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
                         max_in_flight=args.max_in_flight, device=args.device,
                         keep_dtype=not args.widen_adapters, watch=watch, watch_interval_s=args.watch_interval)


def run(args: argparse.Namespace) -> int:
    from ..serve import Service, Tokens, run_local

    tokens, generated = Tokens.resolve(args.tokens)
    if generated:
        print(f"m4oe serve: generated tokens (use --tokens FILE to set them): predict={tokens.predict} "
              f"admin={tokens.admin}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"m4oe serve: listening on {args.host}, not only on loopback", file=sys.stderr)
    settings = settings_from(args)
    if args.engine == "ray":
        import os

        import ray
        from ray import serve

        from ..serve.ray_app import ray_application

        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            # A local Ray "cluster" of this machine only: its own services on loopback, no dashboard.
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(ray_application(zoo=args.zoo, adapters=args.adapter, weights=args.weights, settings=settings,
                                  tokens=tokens, replicas=args.replicas if args.replicas == "auto" else int(args.replicas)),
                  blocking=True)
        return 0
    service = (Service.from_zoo(args.zoo, settings) if args.zoo
               else Service.from_adapters(args.adapter, args.weights, settings))
    names = ", ".join(f"{v.name}@{v.version}" for v in service.registry.list())
    print(f"m4oe serve: {len(service.registry)} adapters ({names}) on {service.device}; "
          f"http://{args.host}:{args.port}" + (f"; watching {settings.watch}" if settings.watch else ""),
          file=sys.stderr, flush=True)
    try:
        run_local(service, tokens, host=args.host, port=args.port)
    finally:
        service.close()
    return 0
