"""What a refusal must leave alone: the net and the files of any directory involved (test code only).

    with unchanged(net, tmp_path / "adapter"):
        with pytest.raises(pet_hooks.PetStateError, match="..."):
            pet_hooks.load_adapter(net, tmp_path / "adapter")

On leaving the block the net has the same cells of the same classes, the same parameters (names, shapes,
dtypes, ``requires_grad`` flags) with bit-for-bit the same values, PET or none as before, and each
directory holds the same files with the same bytes (or still does not exist). The bad-input table
(tests/project/test_bad_input.py) checks more (patches, the environment) for its rows; this is for refusals
tested one by one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, Optional

import numpy as np

from pet_hooks.surgery.core import has_pet


def net_state(net) -> dict:
    return {"classes": [(name, type(cell)) for name, cell in net.cells_and_names()],
            "params": [(p.name, tuple(p.shape), str(p.dtype), p.requires_grad) for p in net.get_parameters()],
            "values": {p.name: p.asnumpy().copy() for p in net.get_parameters()},
            "pet": has_pet(net)}


def dir_state(path) -> Optional[Dict[str, Optional[bytes]]]:
    """relative path -> bytes of every file under ``path`` (None for a directory); None if ``path`` is absent."""
    path = str(path)
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            return {"": handle.read()}
    files: Dict[str, Optional[bytes]] = {}
    for root, dirs, names in os.walk(path):
        for name in dirs:
            files[os.path.relpath(os.path.join(root, name), path)] = None
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                files[os.path.relpath(os.path.join(root, name), path)] = handle.read()
    return files


def assert_net_unchanged(before: dict, net) -> None:
    after = net_state(net)
    assert after["classes"] == before["classes"], "the net's cells or their classes changed"
    assert after["params"] == before["params"], "the net's parameters (names, shapes, dtypes, flags) changed"
    assert after["pet"] == before["pet"], "the net's PET changed"
    for name, value in before["values"].items():
        np.testing.assert_array_equal(after["values"][name], value, err_msg=name)


@contextmanager
def unchanged(net, *directories):
    """Assert that ``net`` and ``directories`` are exactly as before when the block ends without an error."""
    before = net_state(net)
    files = {str(d): dir_state(d) for d in directories}
    yield
    assert_net_unchanged(before, net)
    for directory, state in files.items():
        assert dir_state(directory) == state, f"{directory} changed"
