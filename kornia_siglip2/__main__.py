"""``python -m kornia_siglip2``: the command line of :mod:`kornia_siglip2.cli`."""

import sys

if __name__ == "__main__":
    try:
        from kornia_siglip2.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python imports: one line, as everywhere else in the CLI
        print("kornia-siglip2: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(main())
