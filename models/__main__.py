"""``python -m models build|list``: create seeded safetensors weights, list the registry."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.registry import SPECS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="write <name>.safetensors for each model (seeded, deterministic)"
    )
    build.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="weights folder (default: INFER_WEIGHTS_DIR, else var/weights)",
    )
    build.add_argument("--force", action="store_true", help="rewrite files that already exist")
    build.add_argument("names", nargs="*", help="models to build (default: all)")
    sub.add_parser("list", help="show registered models and their inputs")
    args = parser.parse_args(argv)

    if args.command == "list":
        for spec in SPECS.values():
            print(
                f"{spec.name:12} in={list(spec.sample_shape)} {spec.input_dtype:8} "
                f"out={list(spec.output_shape)}  {spec.description}"
            )
        return 0

    from models.loader import build_weights  # imports torch: only for this command

    weights_dir = args.dir or Path(os.environ.get("INFER_WEIGHTS_DIR", "var/weights"))
    written = build_weights(weights_dir, args.names or None, force=args.force)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"weights already present in {weights_dir} (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
