"""python -m tests.bench [NAME ...]: run every tests/bench/bench_*.py main() in turn (or only NAME...)."""

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv=None):
    wanted = set(sys.argv[1:] if argv is None else argv)
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    unknown = wanted - set(names)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in names:
        if wanted and name not in wanted:
            continue
        print(f"== bench {name} ==", flush=True)
        importlib.import_module(f"tests.bench.bench_{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
