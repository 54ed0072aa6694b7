"""The same app on Ray Serve: replicas of the model behind Ray's HTTP proxy, the same OpenAI routes, fixed or
autoscaled (``pip install 'ray[serve]'``, the ``[ray]`` extra).

Each replica is one :class:`~merge.serve.service.Service` (one session, its own batching engine) in a Ray actor;
Ray's proxy spreads requests over the replicas and queues those past ``max_ongoing_requests`` (each replica's
``max_batch + max_queue``), and its autoscaler adds replicas while they hold more than
``target_ongoing_requests`` each (default: ``max_batch``). From Python::

    from ray import serve
    from merge.serve.ray_app import build

    serve.run(build("combined/", num_replicas=2), route_prefix="/")

or with Ray's command line, on a running cluster (every node reads the folder at the same path)::

    serve run merge.serve.ray_app:app_builder combined=/shared/combined min_replicas=1 max_replicas=4

See docs/serve.md for a multi-node cluster.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ray import serve

from merge.errors import MergeError

from .app import create_app
from .media import MediaPolicy
from .service import ServeOptions, Service

DEPLOYMENT_NAME = "qwen3vl-merge"


@serve.ingress()
class OpenAIDeployment:
    """One replica: the folder served by its own :class:`Service`, the app built around it on the replica."""

    def __init__(self, folder: str, options: ServeOptions):
        self.service = Service(folder, options)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)  # closed with the replica (the app's lifespan)


def build(folder: str | Path, options: ServeOptions | None = None, *, num_replicas: int | None = None,
          autoscaling: dict[str, Any] | None = None, cpus_per_replica: float = 1.0,
          name: str = DEPLOYMENT_NAME) -> serve.Application:
    """A Ray Serve application serving ``folder``: ``num_replicas`` fixed replicas (default 1), or ``autoscaling``
    (Ray's ``autoscaling_config``: ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...; the target
    defaults to the options' ``max_batch``). Each replica asks Ray for ``cpus_per_replica`` CPUs, and its ONNX Runtime
    uses as many threads unless the options say otherwise (its default, one per core of the node, would have the
    replicas of a node compete for the same cores)."""
    options = options or ServeOptions()
    if options.threads is None:
        options = dataclasses.replace(options, threads=max(1, round(cpus_per_replica)))
    if num_replicas is not None and autoscaling is not None:
        raise MergeError("give num_replicas or autoscaling, not both")
    if num_replicas is not None and (isinstance(num_replicas, bool) or not isinstance(num_replicas, int)
                                     or num_replicas < 1):
        raise MergeError(f"num_replicas must be a whole number, 1 or more, got {num_replicas!r}")
    settings: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": cpus_per_replica},
        # past a replica's batch and queue, requests wait in Ray's router for a replica with room (not a 429)
        "max_ongoing_requests": options.max_batch + options.max_queue,
    }
    if autoscaling is not None:
        settings["autoscaling_config"] = {"target_ongoing_requests": options.max_batch, **autoscaling}
    else:
        settings["num_replicas"] = num_replicas or 1
    return serve.deployment(OpenAIDeployment, **settings).bind(str(Path(folder).resolve()), options)


_INTEGERS = ("num_replicas", "min_replicas", "max_replicas", "initial_replicas", "max_batch", "max_queue",
             "max_tokens", "max_prompt_tokens", "max_request_bytes", "max_media_bytes", "threads", "min_pixels",
             "max_pixels", "max_frames")
_NUMBERS = ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "cpus_per_replica", "media_timeout",
            "fps")
_AUTOSCALING = ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests", "upscale_delay_s",
                "downscale_delay_s")


def app_builder(args: dict[str, str]) -> serve.Application:
    """For ``serve run merge.serve.ray_app:app_builder combined=DIR key=value ...`` and Serve config files: ``combined``
    (required), ``num_replicas`` or the autoscaling keys (``min_replicas``, ``max_replicas``, ``initial_replicas``,
    ``target_ongoing_requests``, ``upscale_delay_s``, ``downscale_delay_s``), ``cpus_per_replica``, and the options of
    ``python -m merge serve`` with underscores (``max_batch``, ``max_queue``, ``max_tokens``, ``model_name``,
    ``allow_local_media``, ``allow_remote_media``, ...)."""
    args = dict(args)
    folder = args.pop("combined", None)
    if not folder:
        raise MergeError("app_builder needs combined=DIR (a combined folder, at the same path on every node)")
    values: dict[str, Any] = {}
    for key, text in args.items():
        try:
            if key in _INTEGERS:
                values[key] = int(text)
            elif key in _NUMBERS:
                values[key] = float(text)
            elif key == "allow_remote_media":
                values[key] = str(text).lower() in ("1", "true", "yes")
            elif key in ("model_name", "allow_local_media", "check_checksums"):
                values[key] = text
            else:
                raise MergeError(f"app_builder: unknown key {key!r}")
        except ValueError:
            raise MergeError(f"app_builder: {key}={text!r} is not a number") from None
    autoscaling = {k: values.pop(k) for k in _AUTOSCALING if k in values} or None
    media = MediaPolicy(
        local_root=Path(values.pop("allow_local_media")).resolve() if "allow_local_media" in values else None,
        remote=values.pop("allow_remote_media", False),
        **{k: values.pop(n) for k, n in (("max_bytes", "max_media_bytes"), ("timeout", "media_timeout"))
           if n in values})
    num_replicas = values.pop("num_replicas", None)
    cpus = values.pop("cpus_per_replica", 1.0)
    if "check_checksums" in values:
        values["check_checksums"] = str(values["check_checksums"]).lower() in ("1", "true", "yes")
    options = ServeOptions(media=media, **values)
    return build(folder, options, num_replicas=num_replicas, autoscaling=autoscaling, cpus_per_replica=cpus)
