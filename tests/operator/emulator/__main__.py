"""The try-out entry point: `python -m tests.operator.emulator --workdir DIR` serves an emulated
cluster until interrupted (see `main`)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from tests.operator.emulator.handle import KubeEmulator


def main() -> None:
    """Serve the emulated cluster until interrupted, for trying the operator without one:

        python -P -m tests.operator.emulator --workdir /tmp/brim-kube
        KUBECONFIG=/tmp/brim-kube/kubeconfig brim operator
        KUBECONFIG=/tmp/brim-kube/kubeconfig kubectl apply --validate=false \\
            -f crds/modeldeployments.brim.dev.yaml -f examples/bundled.yaml

    It has no kubelet: the plan and the children appear, no pod runs.
    """
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the kubeconfig is written")
    parser.add_argument("--gpu-node", action="append", default=[], metavar="PRODUCT:MIB:COUNT",
                        help="add a GPU node, e.g. NVIDIA-L4:23034:1 (repeatable)")
    args = parser.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with KubeEmulator(args.workdir) as kube:
        for i, text in enumerate(args.gpu_node):
            product, memory, count = text.split(":")
            kube.create({"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": f"gpu-{i}", "labels": {
                             "nvidia.com/gpu.product": product,
                             "nvidia.com/gpu.memory": memory}}})
            kube.set_status("nodes", f"gpu-{i}", {
                "allocatable": {"nvidia.com/gpu": count},
                "conditions": [{"type": "Ready", "status": "True"}]})
        print(f"serving {kube.url}; KUBECONFIG={kube.kubeconfig}", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
