"""The same HTTP app on Ray Serve, for more than one machine: replicas (each holds the backbone and every adapter,
and batches its own requests with :class:`~.batching.MicroBatcher`), autoscaling and HTTP routing are Ray's; this
module only wraps the ASGI app of :mod:`.app` into a deployment — no cluster code of ours.

Locally: ``m4oe serve --zoo FOLDER --engine ray --replicas 2``. On a cluster, with Ray's own tools::

    serve run m4oe_adapters.serve.ray_app:app_builder zoo=/models/adapters_zoo replicas=4
    # or a Serve config file whose import_path is m4oe_adapters.serve.ray_app:app_builder (serve deploy config.yaml)

Tokens reach the replicas from ``args`` or from ``$M4OE_SERVE_TOKEN`` / ``$M4OE_SERVE_ADMIN_TOKEN`` set in the
cluster's runtime environment. Adapter changes through the admin endpoint reach one replica; with several replicas,
change adapters through a watched folder that every replica reads (``watch=/models/adapters_zoo``, ``m4oe serve
--watch``: :mod:`.watch`), or by redeploying.
"""
from __future__ import annotations

from typing import Any

from .app import Tokens, create_app
from .service import ServeSettings, Service


def build_asgi_app(options: dict[str, Any]):
    """Runs on each replica: load the backbone and adapters, return the FastAPI app."""
    settings = ServeSettings(**options.get("settings", {}))
    if options.get("zoo"):
        service = Service.from_zoo(options["zoo"], settings)
    else:
        service = Service.from_adapters(options.get("adapters", []), options.get("weights"), settings)
    tokens = options.get("tokens")
    tokens = Tokens(**tokens) if tokens else Tokens.resolve(None)[0]
    return create_app(service, tokens)


def replica_builder(options: dict[str, Any]):
    """The function Ray Serve calls on each replica for its ASGI app. A plain function on purpose: ``serve.ingress``
    treats anything else (a ``functools.partial`` included) as the app itself."""

    def build() -> Any:
        return build_asgi_app(options)

    return build


def ray_application(
    *, zoo: str | None = None, adapters: list[str] | None = None, weights: str | None = None,
    settings: ServeSettings | None = None, tokens: Tokens | None = None, replicas: int | str = 1,
    max_replicas: int = 4, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
):
    """A Ray Serve application (``serve.run(...)`` it) serving the app of :mod:`.app`.

    Args:
        replicas: a number of replicas, or ``"auto"`` for autoscaling between 1 and ``max_replicas``.
    """
    from dataclasses import asdict

    from ray import serve

    options = {
        "zoo": zoo, "adapters": list(adapters or []), "weights": weights,
        "settings": asdict(settings or ServeSettings()),
        "tokens": {"predict": tokens.predict, "admin": tokens.admin} if tokens else None,
    }
    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas,
                                "target_ongoing_requests": options["settings"]["max_batch"]}}
        if replicas == "auto" else {"num_replicas": int(replicas)}
    )
    deployment = serve.deployment(
        serve.ingress(replica_builder(options))(),
        name="m4oe",
        max_ongoing_requests=options["settings"]["max_in_flight"],
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        **scaling,
    )
    return deployment.bind()


def app_builder(args: dict[str, str]):
    """Entry point for ``serve run m4oe_adapters.serve.ray_app:app_builder zoo=... replicas=... [watch=FOLDER]``
    (``watch=FOLDER``: every replica serves that shared folder's adapter files as they change)."""
    replicas = args.get("replicas", "1")
    settings = ServeSettings(**{key: value if key == "watch" else type(getattr(ServeSettings, key))(value)
                                for key, value in args.items() if key in ServeSettings.__dataclass_fields__})
    return ray_application(
        zoo=args.get("zoo"), adapters=[a for a in args.get("adapters", "").split(",") if a],
        weights=args.get("weights"), settings=settings,
        replicas=replicas if replicas == "auto" else int(replicas),
        gpus_per_replica=float(args.get("gpus_per_replica", 0)),
    )
