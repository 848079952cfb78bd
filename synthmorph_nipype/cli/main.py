"""Entry point of ``synthmorph``: every user error becomes one line on stderr."""

from __future__ import annotations

import sys

from ..errors import SynthMorphError
from .parser import parse


def main(argv=None) -> int:
    args = parse(argv)
    from . import commands  # heavy imports (torch) after argument checks

    try:
        if args.command == "register":
            commands.register(args)
        else:
            commands.apply(args)
    except SynthMorphError as err:
        print(f"synthmorph {args.command}: error: {err}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"synthmorph {args.command}: error: out of memory (try -e 192)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
