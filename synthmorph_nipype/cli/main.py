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
        elif args.command == "apply":
            commands.apply(args)
        elif args.command in ("synth", "train"):
            from . import train

            getattr(train, args.command)(args)
        else:
            from .demo import run

            run(args)
    except SynthMorphError as err:
        print(f"synthmorph {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. disk full or file name too long while writing
        where = f"{err.filename}: " if err.filename else ""
        print(f"synthmorph {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:  # torch reports allocation failures so
        text = str(err).lower()
        if not isinstance(err, MemoryError) and not any(
                s in text for s in ("out of memory", "can't allocate", "cannot allocate")):
            raise
        print(f"synthmorph {args.command}: error: out of memory (try -e 192, or the CPU "
              "with --cpu when the GPU is too small)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
