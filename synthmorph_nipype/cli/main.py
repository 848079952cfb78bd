"""Entry point of ``synthmorph``: every user error becomes one line on stderr."""

from __future__ import annotations

import signal
import sys
import threading
import warnings

from ..errors import DataWarning, SynthMorphError
from .parser import parse


class Terminated(Exception):
    """SIGTERM arrived (raised in the main thread by the handler :func:`main` installs)."""


def _terminate(signum, frame):
    raise Terminated()


def _show_warning(command: str, default):
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"synthmorph {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv=None) -> int:
    """Run one command; user errors, interruptions and data warnings are one line each.

    SIGINT (Ctrl-C) and SIGTERM end the command with one line and the shell's codes (130,
    143); outputs are written to temporary names and renamed at the end, so an interrupted
    command leaves no partial outputs and no temporary files.
    """
    args = parse(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(args.command, warnings.showwarning)
            warnings.simplefilter("always", DataWarning)
            return _run(args)
    except KeyboardInterrupt:
        print(f"synthmorph {args.command}: interrupted (SIGINT); no partial outputs left",
              file=sys.stderr)
        return 130
    except Terminated:
        print(f"synthmorph {args.command}: terminated (SIGTERM); no partial outputs left",
              file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
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
