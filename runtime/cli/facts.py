"""`brim facts`: a checkpoint's facts without its weights, for the operator. Torch-free.

The operator plans a `pvc://` model by running this in a short Job that mounts the volume
read-only; the facts (config.json, tokenizer limit, exact weight bytes from the safetensors
headers) go to the pod's termination message, which the operator reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brim.runtime.planner.facts import encode_facts, read_checkpoint


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "facts", help="print a checkpoint's facts (no weights read), as the operator reads them",
        description="Read config.json, tokenizer_config.json, generation_config.json and the "
                    "safetensors headers of a checkpoint folder, and print them as one line "
                    "(JSON, or gzip+base64 when over 4 KiB).")
    parser.add_argument("path", help="checkpoint folder")
    parser.add_argument("--output", default=None,
                        help="also write the line here (in Kubernetes: the container's "
                             "terminationMessagePath, /dev/termination-log); on failure the "
                             "error goes there instead")
    parser.set_defaults(func=run_facts)


def run_facts(args: argparse.Namespace) -> int:
    """Exit 0 with the facts, 2 when the folder cannot be read."""
    try:
        line = encode_facts(read_checkpoint(args.path))
    except (ValueError, OSError, KeyError) as exc:
        message = f"brim facts: cannot read the model at {args.path}: {exc}"
        if args.output:
            Path(args.output).write_text(message)
        print(message, file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(line)
    print(line)
    return 0
