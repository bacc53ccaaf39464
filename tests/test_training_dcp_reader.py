"""Tests for kornia_siglip2.training.dcp_reader: DCP metadata checked without running it."""

from __future__ import annotations

import pickle

import pytest
from training_helpers import RunsACommand

from kornia_siglip2.errors import ValueCheckError
from kornia_siglip2.training.dcp_reader import check_metadata_pickle


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reduce_to_os_system_is_refused_in_every_protocol(tmp_path, protocol):
    data = pickle.dumps([{"payload": RunsACommand("true")}], protocol=protocol)
    with pytest.raises(ValueCheckError, match="system"):
        check_metadata_pickle(data, tmp_path / ".metadata")


def test_plain_data_and_allowed_classes_pass(tmp_path):
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    value = {
        "a": [1, 2.0, "x", (torch.Size([2]), torch.float16, torch.strided)],
        "b": ChunkStorageMetadata(torch.Size([0]), torch.Size([2])),
    }
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        check_metadata_pickle(pickle.dumps(value, protocol=protocol), tmp_path / ".metadata")


def test_truncated_pickle_is_refused(tmp_path):
    with pytest.raises(ValueCheckError, match="well-formed"):
        check_metadata_pickle(pickle.dumps({"a": [1, 2]})[:-3], tmp_path / ".metadata")


def test_metadata_calling_a_non_global_is_refused(tmp_path):
    """A REDUCE whose callable is not an allowed global (here a plain string) is refused, not run."""
    hostile = b"\x80\x04" + pickle.SHORT_BINUNICODE + b"\x01x" + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP
    with pytest.raises(ValueCheckError, match="calls"):
        check_metadata_pickle(hostile, tmp_path / ".metadata")


@pytest.mark.parametrize(
    ("module", "name"),
    [("torch", "load"), ("torch.distributed.checkpoint", "metadata.Metadata"), ("torch", "Size.__class__")],
)
def test_metadata_global_outside_the_list_is_refused(tmp_path, module, name):
    """A torch function, or an allowed class reached through a dotted name, is not on the list."""

    def text(value: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(value)]) + value.encode()

    hostile = b"\x80\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + pickle.EMPTY_TUPLE + pickle.REDUCE
    with pytest.raises(ValueCheckError, match=f"references {module}.{name}"):
        check_metadata_pickle(hostile + pickle.STOP, tmp_path / ".metadata")
