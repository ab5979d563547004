"""Dispatch `python -m nsoclip.bench NAME ...` to `nsoclip.bench.NAME.main(argv)`."""
import importlib
import sys

from ..checks import command_line

BENCHMARKS = ("train", "nso", "data", "hessian", "fsdp")


def main(argv=None):
    argv = command_line(argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m nsoclip.bench {{{','.join(BENCHMARKS)}}} [flags]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"nsoclip.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
