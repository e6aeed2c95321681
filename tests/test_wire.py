"""How arrays travel (fedgen.wire): packed into one tensor, unpacked to the same bytes, and
a reply whose arrays cannot be read is rejected by screening instead of crashing a round."""

import json

import numpy as np
import pytest
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays

from fedgen.wire import MAGIC, is_packed, pack, unpack
from tests.conftest import InProcessProxy, run_in_process, tiny_config


def _arrays():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(3, 4)).astype(np.float32), np.arange(7, dtype=np.int64),
            np.zeros((0,), dtype=np.float64), np.array(2.5, dtype=np.float16)]


def test_pack_then_unpack_gives_back_the_same_tensors_and_arrays():
    plain = ndarrays_to_parameters(_arrays())
    packed = pack(plain)
    assert len(packed.tensors) == 1 and is_packed(packed)
    assert packed.tensors[0].startswith(MAGIC)
    assert packed.tensor_type == plain.tensor_type
    back = unpack(packed)
    assert back.tensors == plain.tensors           # byte for byte
    for a, b in zip(parameters_to_ndarrays(back), _arrays()):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("arrays", [[], [np.ones((2, 2), np.float32)]])
def test_zero_or_one_tensor_travels_as_it_is(arrays):
    plain = ndarrays_to_parameters(arrays)
    assert pack(plain) is plain and not is_packed(plain)
    assert unpack(plain) is plain


def test_plain_parameters_pass_unpack_unchanged():
    plain = ndarrays_to_parameters(_arrays())
    assert unpack(plain) is plain


@pytest.mark.parametrize("cut", [len(MAGIC) + 3, len(MAGIC) + 8 + 4, -5])
def test_a_packed_tensor_whose_header_does_not_add_up_raises(cut):
    blob = pack(ndarrays_to_parameters(_arrays())).tensors[0]
    with pytest.raises(ValueError, match="packed parameters"):
        unpack(Parameters(tensors=[blob[:cut]], tensor_type="numpy.ndarray"))


def test_a_header_declaring_too_many_tensors_raises():
    blob = MAGIC + np.array([10**12], dtype="<u8").tobytes() + b"x" * 16
    with pytest.raises(ValueError, match="do not fit"):
        unpack(Parameters(tensors=[blob], tensor_type="numpy.ndarray"))


class GarbageProxy(InProcessProxy):
    """Answers classify rounds with ``payload`` in place of its arrays."""

    def __init__(self, cid, cfg, node, payload):
        super().__init__(cid, cfg, node)
        self.payload = payload

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        if ins.config.get("phase") != "classify":
            return res
        return FitRes(res.status, Parameters(tensors=self.payload, tensor_type="numpy.ndarray"),
                      res.num_examples, res.metrics)


@pytest.mark.parametrize("payload,words", [
    ([MAGIC + b"\x05" + b"\x00" * 3], "unreadable arrays (packed parameters"),
    ([b"not an array", b"nor this"], "unreadable arrays"),
])
def test_an_unreadable_reply_is_rejected_and_the_round_goes_on(tmp_path, payload, words):
    cfg = tiny_config(tmp_path, method="fedavg", arms="real", classifier_rounds=1)
    nodes = [InProcessProxy("node-0", cfg, 0), GarbageProxy("node-1", cfg, 1, payload),
             InProcessProxy("node-2", cfg, 2)]
    run_in_process(cfg, nodes)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "completed"
    (rejected,) = results["rejected"]
    assert rejected["node"] == "partition 1" and words in rejected["reason"]
    assert results["arms"]["real"]["train_samples_per_round"] == sum(
        p.replied[-1].num_examples for k, p in enumerate(nodes) if k != 1)
