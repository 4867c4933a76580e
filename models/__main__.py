"""``python -m models build|list``: write seeded safetensors weights, list every model source."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.catalog import discover


def _repositories() -> list[Path]:
    raw = os.environ.get("INFER_MODEL_REPOSITORY", "")
    return [Path(p) for p in raw.replace(",", os.pathsep).split(os.pathsep) if p.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="write seeded weights for each model that declares a seed (missing ones)"
    )
    build.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="weights folder of the built-in zoo (default: INFER_WEIGHTS_DIR, else var/weights)",
    )
    build.add_argument("--force", action="store_true", help="rewrite files that already exist")
    build.add_argument("names", nargs="*", help="models to build (default: all)")
    listing = sub.add_parser("list", help="show every model: source, versions, inputs")
    listing.add_argument("--dir", type=Path, default=None, help="as for build")
    args = parser.parse_args(argv)

    weights_dir = args.dir or Path(os.environ.get("INFER_WEIGHTS_DIR", "var/weights"))
    catalog = discover(_repositories(), weights_dir, log_errors=False)  # printed below
    if args.command == "list":
        for entry in catalog.entries():
            spec = entry.default
            versions = ",".join(
                f"{v}*" if v == entry.default_version else str(v) for v in sorted(entry.versions)
            )
            print(
                f"{entry.name:12} v{versions:6} {spec.input_summary():40} "
                f"out={list(spec.output_shape)}  [{entry.source}]  {spec.description}"
            )
        for error in catalog.errors:
            print(f"NOT SERVED: {error}", file=sys.stderr)
        return 1 if catalog.errors else 0

    from models.loader import build_weights  # imports torch: only for this command

    specs = [
        spec
        for entry in catalog.entries()
        if not args.names or entry.name in args.names
        for spec in entry.versions.values()
    ]
    written = build_weights(specs, force=args.force)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"weights already present in {weights_dir} (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
