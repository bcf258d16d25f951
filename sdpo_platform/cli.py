"""`sdpo` command line. The demo lives in the Dagster layer, imported only when asked for."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdpo", description="Self-distillation from user interactions.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole lineage on a slice of real ShareGPT logs")
    demo.add_argument("--records", type=int, default=300, help="ShareGPT records written to the inbox")
    convert = sub.add_parser("model", help="resolve a model spec (converts the embedded default once)")
    convert.add_argument("spec", nargs="?", default="default")
    sub.add_parser("config", help="print every configuration knob with its default (markdown)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from assets.demo import run_demo

        run_demo(args.records)
    elif args.command == "model":
        from sdpo_platform.models import resolve_model

        print(resolve_model(args.spec))
    elif args.command == "config":
        from sdpo_platform.config import config_reference

        print(config_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
