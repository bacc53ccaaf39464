"""One decoder: awkward files read alike by training, inference and the embed pipeline, and as PIL says."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kornia_siglip2 import _embed as embed
from kornia_siglip2.images import image_size, image_tensor, load_image, load_image_reduced
from kornia_siglip2.preprocess import NaFlexImagePreprocessor
from kornia_siglip2.training.data import ByteTokenizer, ImageTextDataset, ImageTextRecord
from kornia_siglip2.zero_shot import _to_batch

Image = pytest.importorskip("PIL.Image")

HEIGHT, WIDTH = 24, 40  # stored size; the EXIF-rotated file is seen as WIDTH x HEIGHT


def _gradient(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 3 % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def awkward_files(tmp_path_factory) -> dict[str, Path]:
    """EXIF-rotated JPEG, RGBA / LA / palette-with-transparency PNGs, CMYK JPEG, 16-bit PNG, animated GIF."""
    folder = tmp_path_factory.mktemp("awkward")
    rgb = _gradient()
    files = {}

    files["exif_rotated.jpg"] = folder / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(files["exif_rotated.jpg"], quality=95, exif=exif)

    files["rgba.png"] = folder / "rgba.png"
    alpha = np.tile(np.linspace(0, 255, WIDTH).astype(np.uint8), (HEIGHT, 1))
    Image.fromarray(np.dstack([rgb, alpha])).save(files["rgba.png"])

    files["la.png"] = folder / "la.png"
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).save(files["la.png"])  # (H, W, 2) uint8: LA

    files["palette_transparent.png"] = folder / "palette_transparent.png"
    palette = Image.fromarray(rgb).quantize(8)
    palette.info["transparency"] = 0
    palette.save(files["palette_transparent.png"], transparency=0)

    files["cmyk.jpg"] = folder / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk.jpg"], quality=95)

    files["sixteen_bit.png"] = folder / "sixteen_bit.png"
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 2).save(files["sixteen_bit.png"])  # uint16: I;16

    files["animated.gif"] = folder / "animated.gif"
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ((200, 10, 10), (10, 200, 10))]
    frames[0].save(files["animated.gif"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    return files


def _quiet(function, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 16-bit file warns (tested below)
        return function(*args)


@pytest.mark.parametrize(
    "name",
    [
        "exif_rotated.jpg",
        "rgba.png",
        "la.png",
        "palette_transparent.png",
        "cmyk.jpg",
        "sixteen_bit.png",
        "animated.gif",
    ],
)
def test_training_and_inference_decode_alike(awkward_files, name):
    """The training dataset, zero-shot inference and the embed pipeline decode every file to the same tensor."""
    path = awkward_files[name]
    dataset = ImageTextDataset([ImageTextRecord(path, "a caption")], ByteTokenizer(), patch_size=4, max_num_patches=64)
    training = _quiet(dataset.loader, path)
    inference = _quiet(_to_batch, [path], torch.device("cpu"))[0]
    embedding = _quiet(embed.decode_pillow, path)
    assert training.dtype == torch.uint8 and training.shape[0] == 3
    assert torch.equal(training, inference) and torch.equal(training, embedding)
    # the sampler plans with the size the decoder returns (EXIF rotation included)
    assert dataset.sizes() == [tuple(training.shape[1:])] == [image_size(path)]
    # and the training item is the inference preprocessing of those pixels
    item = _quiet(dataset.__getitem__, 0)
    expected = NaFlexImagePreprocessor(4, 64)(inference[None])
    assert torch.equal(item["grid_thw"], expected.grid_thw)
    torch.testing.assert_close(item["patches"], expected.patches.float(), atol=0, rtol=0)


def test_exif_rotation_against_numpy(awkward_files):
    """Orientation 6: the stored pixels turned 90 degrees clockwise (numpy's rot90, independent of PIL's EXIF code)."""
    with Image.open(awkward_files["exif_rotated.jpg"]) as opened:
        stored = np.asarray(opened.convert("RGB"))
    expected = torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1)
    assert torch.equal(load_image(awkward_files["exif_rotated.jpg"]), expected)
    assert tuple(expected.shape[1:]) == (WIDTH, HEIGHT)


def test_alpha_composited_on_white_against_formula(awkward_files):
    """RGBA: ``rgb * a + 255 * (1 - a)`` in float64, to within PIL's integer rounding (one level)."""
    with Image.open(awkward_files["rgba.png"]) as opened:
        rgba = np.asarray(opened).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    expected = torch.from_numpy(rgba[..., :3] * alpha + 255 * (1 - alpha)).permute(2, 0, 1)
    torch.testing.assert_close(load_image(awkward_files["rgba.png"]).double(), expected, atol=1, rtol=0)


def test_animated_gif_reads_its_first_frame(awkward_files):
    image = load_image(awkward_files["animated.gif"])
    assert image[:, 0, 0].tolist() == [200, 10, 10] and bool((image == image[:, :1, :1]).all())


def test_sixteen_bit_clips_and_warns(awkward_files):
    with pytest.warns(UserWarning, match=r"sixteen_bit\.png is a high-bit-depth image"):
        image = load_image(awkward_files["sixteen_bit.png"])
    stored = _gradient()[..., 1].astype(np.int64) * 2
    assert torch.equal(image, torch.from_numpy(np.minimum(stored, 255).astype(np.uint8))[None].expand(3, -1, -1))


def test_bytes_and_pil_equal_the_file(awkward_files):
    path = awkward_files["exif_rotated.jpg"]
    with Image.open(path) as opened:
        from_pil = image_tensor(opened)
    assert torch.equal(load_image(path.read_bytes()), load_image(path)) and torch.equal(from_pil, load_image(path))


def test_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_image(broken)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="bytes"):
        load_image(b"not an image either")


def test_reduced_decode_falls_back_for_rotated_and_non_jpeg(awkward_files):
    """Only plain RGB JPEGs are decoded reduced; the rest is the full decode, with the full size."""
    for name in ("exif_rotated.jpg", "cmyk.jpg", "rgba.png"):
        pixels, size = load_image_reduced(awkward_files[name], lambda height, width: (4, 4))
        assert torch.equal(pixels, load_image(awkward_files[name])) and size == tuple(pixels.shape[1:])
