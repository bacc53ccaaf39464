"""pil_resize against Pillow itself: identical uint8 output (not a tolerance) for every shape and filter."""

import numpy as np
import pytest
import torch

import kornia_siglip2.resample as resample_module
from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.resample import (
    installed_pillow_version,
    pil_resize,
    pil_resize_coefficients,
    pil_resizes_height_first,
)

Image = pytest.importorskip("PIL.Image")
PIL_CODES = {"bilinear": 2, "bicubic": 3}

# tiny, strips both ways, up- and downscaling, one axis unchanged, large factors
SHAPE_PAIRS = [
    ((1, 1), (7, 5)),
    ((2, 3), (1, 1)),
    ((5, 400), (16, 224)),
    ((400, 5), (224, 16)),
    ((300, 1), (32, 32)),
    ((17, 31), (17, 64)),
    ((64, 64), (20, 64)),
    ((100, 1000), (224, 224)),
    ((333, 500), (224, 224)),
    ((480, 640), (57, 901)),
    ((30, 4000), (16, 2048)),
    ((1000, 100), (800, 80)),
]


def make_image(height, width, channels, kind, generator):
    """uint8 (C, H, W): noise, 0/255 edges (the cubic's overshoot clips) or a smooth gradient."""
    if kind == "noise":
        image = generator.integers(0, 256, (channels, height, width))
    elif kind == "edges":
        image = generator.integers(0, 2, (channels, height, width)) * 255
    else:
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([127 + 120 * np.sin(x / 5 + y / 7), x * 255 / width, y * 255 / height][:channels])
    return torch.from_numpy(image.astype(np.uint8))


def pillow_resize(image, size, resample):
    """Pillow's Image.resize on a (C, H, W) uint8 tensor, as transformers calls it (reducing_gap=None)."""
    array = image.permute(1, 2, 0).numpy()
    pil_image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    resized = np.asarray(pil_image.resize((size[1], size[0]), resample=PIL_CODES[resample], reducing_gap=None))
    return torch.from_numpy(resized.reshape(size[0], size[1], -1).copy()).permute(2, 0, 1)


def resize_in_order(image, size, resample, height_first):
    """Both 1-D passes in a forced order, to show the order matters and that the rule picks Pillow's."""
    work = image
    for dim in (1, 2) if height_first else (2, 1):
        if size[dim - 1] != work.shape[dim]:
            moved = work.movedim(dim, 0).contiguous()
            work = resample_module._resample_first_axis(moved, size[dim - 1], resample).movedim(0, dim)
    return work


class TestPilResize:
    def test_smoke(self, device):
        images = torch.randint(0, 256, (2, 3, 9, 14), dtype=torch.uint8, device=device)
        resized = pil_resize(images, (5, 20), "bicubic")
        assert resized.shape == (2, 3, 5, 20) and resized.dtype == torch.uint8 and resized.device == images.device
        # each image and channel is independent
        assert torch.equal(resized[1:, 2:], pil_resize(images[1:, 2:], (5, 20), "bicubic"))
        # same size: returned unchanged, as Pillow returns a copy
        assert pil_resize(images, (9, 14)) is images

    @pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
    @pytest.mark.parametrize("channels", [3, 1])
    def test_matches_pillow(self, resample, channels):
        generator = np.random.default_rng(channels)
        compared = 0
        for (height, width), size in SHAPE_PAIRS:
            for kind in ("noise", "edges", "smooth"):
                image = make_image(height, width, channels, kind, generator)
                expected = pillow_resize(image, size, resample)
                actual = pil_resize(image[None], size, resample)[0]
                differing = int((actual != expected).sum())
                assert differing == 0, f"{(height, width)} -> {size} {kind}: {differing} pixels differ"
                compared += 1
        assert compared == 3 * len(SHAPE_PAIRS)

    def test_pass_order(self):
        """At the boundary (H - H') - 2 (W - W') in {-1, 0, 1} the rule picks Pillow 13's order every time."""
        generator = np.random.default_rng(0)
        cases = order_matters = 0
        while cases < 150:
            height, width = (int(side) for side in generator.integers(2, 120, 2))
            new_height = int(generator.integers(1, height))
            shift = int(generator.integers(-1, 2))
            if (height - new_height - shift) % 2:
                continue
            new_width = width - (height - new_height - shift) // 2
            if not 1 <= new_width <= 240:
                continue
            image = make_image(height, width, 3, "edges", generator)
            size = (new_height, new_width)
            expected = pillow_resize(image, size, "bicubic")
            assert torch.equal(pil_resize(image[None], size, "bicubic")[0], expected), (height, width, size)
            height_first = pil_resizes_height_first(height, width, new_height, new_width)
            assert torch.equal(resize_in_order(image, size, "bicubic", height_first), expected)
            order_matters += not torch.equal(resize_in_order(image, size, "bicubic", not height_first), expected)
            cases += 1
        # the other order is wrong in most of these cases, so this test can tell the rules apart
        assert order_matters > 100

    def test_pass_order_by_pillow_version(self):
        # (H, W) -> (H', W'): 12.1 always width first; 12.2-12.3 height first for > 100:1 strips that shrink;
        # 13.0 height first when H - H' > 2 (W - W')
        cases = {
            (1000, 100, 224, 224): (False, False, True),
            (1000, 5, 224, 5): (False, True, True),
            (1000, 5, 996, 1): (False, True, False),
            (480, 640, 224, 224): (False, False, False),
            (300, 100, 100, 1): (False, False, True),
        }
        for (height, width, new_height, new_width), expected in cases.items():
            by_version = tuple(
                pil_resizes_height_first(height, width, new_height, new_width, version)
                for version in ("12.1.1", "12.3", (13, 0))
            )
            assert by_version == expected, (height, width, new_height, new_width)
        assert installed_pillow_version() == tuple(int(part) for part in Image.__version__.split(".")[:2])
        # the default follows the installed Pillow (the one transformers' PIL processors run)
        default = pil_resizes_height_first(1000, 100, 224, 224)
        assert default == pil_resizes_height_first(1000, 100, 224, 224, installed_pillow_version())
        # the version changes the pixels: on 0/255 edges the two orders differ by many levels
        image = make_image(1000, 100, 3, "edges", np.random.default_rng(0))[None]
        newer, older = (pil_resize(image, (224, 224), "bicubic", version) for version in ("13.0", "12.1"))
        assert (newer.int() - older.int()).abs().max() > 5
        with pytest.raises(ValueCheckError, match="pillow_version"):
            pil_resizes_height_first(10, 10, 5, 5, "thirteen")

    def test_layouts(self):
        # a channels-last or otherwise strided input gives the same pixels as a contiguous one
        images = torch.randint(0, 256, (2, 41, 37, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        assert not images.is_contiguous()
        resized = pil_resize(images, (13, 29), "bicubic")
        assert resized.is_contiguous() and torch.equal(resized, pil_resize(images.contiguous(), (13, 29), "bicubic"))

    def test_coefficients(self):
        for in_size, out_size in [(1, 9), (7, 3), (1000, 224), (224, 1000), (5, 5)]:
            for resample in ("bilinear", "bicubic"):
                starts, weights, ksize = pil_resize_coefficients(in_size, out_size, resample)
                assert len(starts) == out_size and len(weights) == out_size * ksize
                rows = torch.tensor(weights).view(out_size, ksize)
                # each normalized row sums to one in 22-bit fixed point, up to one rounding per weight
                assert ((rows.sum(-1) - 2**22).abs() <= ksize).all()
                assert min(starts) >= 0 and max(starts) < in_size
                if resample == "bilinear":
                    assert (rows >= 0).all()
        assert pil_resize_coefficients(7, 3, "bicubic") is pil_resize_coefficients(7, 3, "bicubic")  # cached

    def test_exception(self):
        with pytest.raises(ValueCheckError, match="uint8"):
            pil_resize(torch.rand(1, 3, 4, 4), (2, 2))
        with pytest.raises(ValueCheckError, match=r"\(B, C, H, W\)"):
            pil_resize(torch.zeros(3, 4, 4, dtype=torch.uint8), (2, 2))
        with pytest.raises(ValueCheckError, match="positive"):
            pil_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (0, 2))
        with pytest.raises(ValueCheckError, match="'bilinear' or 'bicubic'"):
            pil_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (2, 2), "lanczos")

    def test_dynamo(self, device):
        images = torch.randint(0, 256, (2, 3, 11, 6), dtype=torch.uint8, device=device)
        compiled = torch.compile(pil_resize, backend="aot_eager")
        assert torch.equal(compiled(images, (4, 9), "bicubic"), pil_resize(images, (4, 9), "bicubic"))
