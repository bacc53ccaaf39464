"""Training: the packed data pipeline, the SigLIP 2 objective, checkpoints, the recipe (``kornia_siglip2.train``).

Nothing here is imported by ``import kornia_siglip2``: import the modules by their own names
(``kornia_siglip2.training.data``, ``.objective``, ``.recipe``, ``.checkpoint``, ``.synthetic``). This folder sits
above :mod:`kornia_siglip2.losses`: the EMA teacher and the views the student sees live next to the
self-distillation loss (:mod:`kornia_siglip2.losses.distill`).
"""
