"""``python -m kornia_siglip2.train``: the training recipe (:mod:`kornia_siglip2.training.recipe`) under torchrun."""

from kornia_siglip2.training.recipe import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
