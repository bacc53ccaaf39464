"""Training manifests under faults (issue 29): every error names the file and the line; sizes are verified.

Each case failed on main: wrong sizes in a manifest let 24 of 25 batches exceed the token budget without a word;
``int('abc')``, negative / zero sizes, a number or a folder as image path, Latin-1 text and an Excel BOM in a CSV
gave messages naming neither the manifest nor the line (or were accepted); whitespace, numeric and list captions
and boolean widths were accepted; a folder manifest accepted the empty captions JSONL refuses; a bad image met
mid-epoch gave a Pillow message naming no file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kornia_siglip2.training.data import (
    ByteTokenizer,
    ImageTextDataset,
    TokenBudgetBatchSampler,
    collate_packed,
    read_manifest,
)
from kornia_siglip2.training.synthetic import write_synthetic_dataset

PATCH, PATCHES, BUDGET = 8, 16, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_manifests")
    return write_synthetic_dataset(root / "data", 24, seed=1, min_side=12, max_side=60)


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class TestTokenBudget:
    def test_wrong_sizes_in_the_manifest_are_refused(self, data):
        """Main: the sampler trusted the manifest's sizes; with wrong ones batches exceeded the budget."""
        rows = _rows(data)
        for row in rows:
            row["width"], row["height"] = 8, 8  # one patch each, as the manifest claims
        manifest = _write(data.parent / "wrong-sizes.jsonl", rows)
        dataset = ImageTextDataset(read_manifest(manifest), ByteTokenizer(12), PATCH, PATCHES)
        with pytest.raises(ValueError, match=r"wrong-sizes\.jsonl line 1\).*8 x 8"):
            dataset.sizes()

    @pytest.mark.parametrize("drop_sizes", [False, True])
    def test_no_batch_exceeds_the_budget(self, data, drop_sizes):
        """The batches actually collated (real preprocessing), not the plan, stay within the budget."""
        rows = _rows(data)
        if drop_sizes:
            for row in rows:
                del row["width"], row["height"]
        manifest = _write(data.parent / f"sizes-{drop_sizes}.jsonl", rows)
        dataset = ImageTextDataset(read_manifest(manifest), ByteTokenizer(12), PATCH, PATCHES)
        sampler = TokenBudgetBatchSampler(dataset.sizes(), BUDGET, PATCH, (4, PATCHES), seed=0)
        tokens = [collate_packed([dataset[item] for item in batch]).num_tokens for batch in sampler]
        assert len(tokens) > 1 and max(tokens) <= BUDGET


def _jsonl(tmp_path: Path, line: str, *, before: str = '{"image": "ok.png", "caption": "fine"}\n') -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text(before + line + "\n")
    return path


class TestJsonlFields:
    @pytest.mark.parametrize(
        ("row", "fragment"),
        [
            ({"image": "a.png", "caption": "x", "width": "abc", "height": 4}, "width must be a positive integer"),
            ({"image": "a.png", "caption": "x", "width": -4, "height": 4}, "width must be a positive integer"),
            ({"image": "a.png", "caption": "x", "width": 4, "height": 0}, "height must be a positive integer"),
            ({"image": "a.png", "caption": "x", "width": True, "height": 4}, "width must be a positive integer"),
            ({"image": "a.png", "caption": "x", "width": 4.5, "height": 4}, "width must be a positive integer"),
            ({"image": "a.png", "caption": "x", "width": 4}, "both width and height"),
            ({"image": 5, "caption": "x"}, "must be an image path"),
            ({"image": ["a.png"], "caption": "x"}, "must be an image path"),
            ({"image": "a.png", "caption": "   "}, "empty or only whitespace"),
            ({"image": "a.png", "caption": 5}, "must be a string"),
            ({"image": "a.png", "caption": ["a", "b"]}, "must be a string"),
            ({"image": "a.png", "caption": True}, "must be a string"),
            ({"image": "a.png", "caption": "x", "regions": [{"box": [0, 0, 1, 1], "text": 7}]}, "non-empty 'text'"),
            ({"image": "a.png", "caption": "x", "regions": [{"box": [0, 0, True, 1], "text": "t"}]}, "4 numbers"),
        ],
    )
    def test_bad_field_names_file_and_line(self, tmp_path, row, fragment):
        path = _jsonl(tmp_path, json.dumps(row))
        with pytest.raises(ValueError, match=fragment) as error:
            read_manifest(path)
        assert f"{path} line 2" in str(error.value)

    def test_image_path_that_is_a_folder(self, tmp_path):
        (tmp_path / "folder.png").mkdir()
        path = _jsonl(tmp_path, json.dumps({"image": "folder.png", "caption": "x"}))
        with pytest.raises(ValueError, match=r"line 2: image .*folder\.png is a folder"):
            read_manifest(path)

    def test_latin1_text_names_the_line(self, tmp_path):
        path = tmp_path / "m.jsonl"
        path.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "caf\xe9"}\n')
        with pytest.raises(ValueError, match=r"m\.jsonl line 2 is not UTF-8 text \(byte 0xe9\)"):
            read_manifest(path)

    def test_deep_json_line_names_the_line(self, tmp_path):
        path = _jsonl(tmp_path, "[" * 100_000 + "]" * 100_000)
        with pytest.raises(ValueError, match="line 2 is not valid JSON"):
            read_manifest(path)


class TestCsv:
    def test_excel_bom_is_read(self, tmp_path):
        """Main: the BOM became part of the first column's name, so 'image' was missing on every line."""
        path = tmp_path / "m.csv"
        path.write_bytes("image,caption\na.png,a cat\n".encode("utf-8-sig"))
        records = read_manifest(path)
        assert records[0].image == tmp_path / "a.png" and records[0].caption == "a cat"

    def test_latin1_csv_names_the_line(self, tmp_path):
        path = tmp_path / "m.csv"
        path.write_bytes(b"image,caption\na.png,ok\nb.png,caf\xe9\n")
        with pytest.raises(ValueError, match=r"m\.csv line 3 is not UTF-8"):
            read_manifest(path)

    @pytest.mark.parametrize(
        ("line", "fragment"),
        [("a.png,x,abc,4", "width must be a positive integer"), ("a.png,  ,4,4", "empty or only whitespace")],
    )
    def test_bad_field_names_line(self, tmp_path, line, fragment):
        path = tmp_path / "m.csv"
        path.write_text(f"image,caption,width,height\nok.png,fine,4,4\n{line}\n")
        with pytest.raises(ValueError, match=fragment) as error:
            read_manifest(path)
        assert f"{path} line 3" in str(error.value)


def test_folder_manifest_refuses_empty_captions_as_jsonl_does(tmp_path):
    """Main: a folder manifest accepted an empty caption file."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"a\.txt line 1: the caption is empty"):
        read_manifest(tmp_path)


def test_bad_image_mid_epoch_names_file_and_line(data, tmp_path):
    """Main: a truncated image stopped training with a Pillow message naming neither the file nor the line."""
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(data.parent, folder)
    rows = _rows(folder / data.name)
    dataset = ImageTextDataset(read_manifest(folder / data.name), ByteTokenizer(12), PATCH, PATCHES)
    image = folder / rows[2]["image"]
    image.write_bytes(image.read_bytes()[:60])  # truncated after the header was read
    with pytest.raises((OSError, ValueError)) as error:
        dataset[2]
    assert rows[2]["image"] in str(error.value) and f"{data.name} line 3" in str(error.value)


@pytest.mark.parametrize("damage", ["truncated-jpeg", "decompression-bomb"])
def test_other_bad_images_name_file_and_line(data, tmp_path, monkeypatch, damage):
    """Main: a truncated JPEG or a decompression bomb stopped training with a Pillow message naming no file."""
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.jpg", quality=95)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(folder / "b.jpg", quality=95)
    manifest = _write(folder / "m.jsonl", [{"image": "a.jpg", "caption": "red"}, {"image": "b.jpg", "caption": "g"}])
    dataset = ImageTextDataset(read_manifest(manifest), ByteTokenizer(12), PATCH, PATCHES)
    if damage == "truncated-jpeg":
        path = folder / "b.jpg"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 30 is then a bomb (over twice the limit)
    with pytest.raises(Exception) as error:  # the decoder picks the type; the message is the point
        dataset[1]
    assert "b.jpg" in str(error.value) and "m.jsonl line 2" in str(error.value)
