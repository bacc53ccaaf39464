"""``python -m kornia_siglip2``: the command line of :mod:`kornia_siglip2.cli`."""

from kornia_siglip2.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
