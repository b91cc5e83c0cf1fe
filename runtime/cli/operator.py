"""`brim operator`: run the Kubernetes operator (kopf). Torch-free.

Credentials as kubectl finds them: the pod's service account in a cluster, else KUBECONFIG
(or ~/.kube/config). The Helm chart sets every flag from its values.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from brim.runtime.planner.lengths import is_auto


def _json(kind: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{kind} must be JSON: {exc}") from None
        return value
    return parse


def _utilization(text: str) -> float | str:
    if is_auto(text):
        return "auto"
    value = float(text)
    if not 0.5 <= value <= 0.99:
        raise argparse.ArgumentTypeError(f"must be auto or from 0.5 to 0.99, got {text}")
    return value


def register(subparsers) -> None:
    from brim.operator.settings import OperatorSettings

    defaults = OperatorSettings()
    p = subparsers.add_parser(
        "operator", help="run the Kubernetes operator that plans and serves ModelDeployments",
        description="Watch ModelDeployments (brim.dev/v1alpha1), plan each against the "
                    "cluster's GPUs before any pod starts, and run the runtime pods.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable); default: all namespaces")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default)")
    runtime = p.add_argument_group("runtime pods")
    runtime.add_argument("--runtime-image", default=defaults.runtime_image,
                         help=f"image of the runtime pods (default {defaults.runtime_image})")
    runtime.add_argument("--facts-image", default=defaults.facts_image,
                         help="image that reads pvc:// models' facts in a Job (default: the "
                              f"operator's, {defaults.facts_image})")
    runtime.add_argument("--image-pull-policy", default=defaults.image_pull_policy,
                         choices=["Always", "IfNotPresent", "Never"])
    runtime.add_argument("--gpu-memory-utilization", type=_utilization,
                         default=defaults.gpu_memory_utilization,
                         help="spec.engine.gpuMemoryUtilization's default (default "
                              f"{defaults.gpu_memory_utilization})")
    runtime.add_argument("--gpu-resources", type=_json("--gpu-resources"),
                         default=defaults.gpu_resources, metavar="JSON",
                         help="the runtime container's resources on GPU nodes when the spec "
                              "sets none (GPUs are added from the plan)")
    runtime.add_argument("--cpu-resources", type=_json("--cpu-resources"),
                         default=defaults.cpu_resources, metavar="JSON",
                         help="the same for spec.device cpu")
    runtime.add_argument("--tolerations", type=_json("--tolerations"), default=[],
                         metavar="JSON", help="tolerations added to every runtime pod")
    runtime.add_argument("--termination-grace-seconds", type=int,
                         default=defaults.termination_grace_seconds,
                         help="how long a runtime may drain on shutdown")
    runtime.add_argument("--max-tensor-parallel-size", type=int,
                         default=defaults.max_tensor_parallel_size,
                         help="the most GPUs per replica plans may use (what the runtime runs; "
                              f"default {defaults.max_tensor_parallel_size})")
    runtime.add_argument("--hf-endpoint", default=None,
                         help="a Hugging Face mirror for model facts and the runtime pods")
    operator = p.add_argument_group("operator")
    operator.add_argument("--resync-seconds", type=float, default=defaults.resync_seconds,
                          help="reconcile every ModelDeployment this often even without events")
    operator.add_argument("--liveness-port", type=int, default=8080,
                          help="serve kopf's liveness probe at :PORT/healthz (0: off)")
    operator.add_argument("--log-format", default="json", choices=["json", "plain", "full"],
                          help="json: one object per line, for log pipelines (default)")
    operator.add_argument("--verbose", action="store_true")
    p.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from brim.operator.handlers import register as register_handlers
    from brim.operator.settings import OperatorSettings

    settings = OperatorSettings(
        runtime_image=args.runtime_image, facts_image=args.facts_image,
        image_pull_policy=args.image_pull_policy,
        gpu_memory_utilization=args.gpu_memory_utilization,
        gpu_resources=args.gpu_resources, cpu_resources=args.cpu_resources,
        tolerations=tuple(args.tolerations), resync_seconds=args.resync_seconds,
        termination_grace_seconds=args.termination_grace_seconds,
        max_tensor_parallel_size=args.max_tensor_parallel_size, hf_endpoint=args.hf_endpoint)
    log_format = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN,
                  "full": kopf.LogFormat.FULL}[args.log_format]
    # kopf's own handler replaces the dispatcher's plain one (else every line shows twice).
    logging.getLogger().handlers.clear()
    kopf.configure(verbose=args.verbose, log_format=log_format, log_refkey="resource")
    registry = kopf.OperatorRegistry()
    register_handlers(registry, settings)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace,
                 namespaces=args.namespace, liveness_endpoint=liveness)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # no credentials, no cluster: say so, no traceback
        print(f"brim operator: {exc}", file=sys.stderr)
        return 1
    return 0
