"""How a folder's weights reach ONNX Runtime: views of the mapped data file (no copy), the same numbers.

ONNX Runtime given the data file's bytes copies every tensor into memory of its own (on a 2B int4 folder 4.9 GiB
of anonymous memory after loading; ``benchmarks/long_context.py`` measures it); given one OrtValue per tensor
that views the mapped file, it computes from those views or from its own prepacked copies. Held here:

- every initializer ONNX Runtime is given is a view into the mapping (its address inside the mapped range);
- the outputs equal those of the bytes route bit for bit (text and image, fp32, int4 and int8 vision folders);
- the twin: views one element off their offsets give other numbers (the comparison can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import merge.contract.folder as folder_module
from merge.contract.folder import CombinedFolder
from merge.runtime import CombinedModel

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8))


def _outputs(folder) -> tuple[np.ndarray, np.ndarray]:
    completion = CombinedModel(folder).complete(["Describe.", "Hi"], [[IMAGE], []], max_new_tokens=4)
    return completion.generation.tokens, completion.generation.prefill_logits


def test_initializers_are_views_of_the_mapped_file(combined):
    folder = CombinedFolder.open(combined("tiny", "int4"))
    session = folder.session()
    names, values = session._merge_mapped_initializers
    assert len(names) == len(folder.external) > 0
    start = np.frombuffer(folder.data, np.uint8).ctypes.data
    for name, value in zip(names, values, strict=True):
        assert start <= value.data_ptr() < start + len(folder.data), f"{name} is a copy, not a view"


@pytest.mark.parametrize(("precision", "vision"), [("fp32", "fp32"), ("int4", "fp32"), ("fp32", "int8")])
def test_views_give_the_numbers_of_the_bytes_route(precision, vision, combined, monkeypatch):
    folder = combined("tiny", precision, vision)
    viewed = _outputs(folder)
    with monkeypatch.context() as m:
        m.setattr(CombinedFolder, "_mapped_initializers", lambda self: None)  # the bytes route
        given_bytes = _outputs(folder)
    assert np.array_equal(viewed[0], given_bytes[0])
    assert np.array_equal(viewed[1], given_bytes[1])


def test_twin_views_off_their_offsets_give_other_numbers(combined, monkeypatch):
    folder = combined("tiny")
    expected = _outputs(folder)
    real = CombinedFolder._mapped_initializers

    def shifted(self):
        for tensor in self.external:
            if tensor.data_type == 1 and tensor.nbytes() and int(tensor.external.get("offset", 0)) >= 4:
                tensor.external = {**tensor.external, "offset": str(int(tensor.external["offset"]) - 4)}
        return real(self)

    monkeypatch.setattr(CombinedFolder, "_mapped_initializers", shifted)
    got = _outputs(folder)
    assert not np.array_equal(got[1], expected[1])


def test_the_bytes_route_stays_for_types_numpy_cannot_view(combined, monkeypatch):
    monkeypatch.setattr(folder_module, "_NUMPY_TYPES", {})
    folder = CombinedFolder.open(combined("tiny"))
    session = folder.session()
    assert not hasattr(session, "_merge_mapped_initializers")
    assert session.get_outputs()
