"""How a message's arrays travel: packed into ONE tensor of Flower's ``Parameters``.

Flower 1.41 turns every tensor of a message into objects of its own (an ``Array`` plus
its chunks), and a SuperNode pulls and pushes each object with its own HTTP request
(two at a time). A UNet of 115 arrays then took 20-23 s each way per node in the
loopback deployment test, for 0.18 MB, and a 0.2-s request per object. Packed, the same
message is one object (plus one chunk per 5 MB).

The packed tensor is the original tensors' bytes (numpy's serialised form, untouched)
behind a small header, so packing and unpacking copy bytes and parse no array. The
strategy packs what it sends and unpacks replies before anything else reads them;
the nodes' :class:`clients.PhaseRouter` does the same on its side. Everything between
sees plain ``Parameters``. Anything not packed here passes :func:`unpack` unchanged, so a
client that answers with plain ``Parameters`` still works.
"""

from __future__ import annotations

import numpy as np
from flwr.common import Parameters

MAGIC = b"fedgen-packed-v1"
_LENGTHS = np.dtype("<u8")


def pack(parameters: Parameters) -> Parameters:
    """``parameters`` as one tensor: MAGIC, the tensor count and each tensor's length
    (little-endian uint64), then the tensors. Zero or one tensor is left as it is."""
    tensors = parameters.tensors
    if len(tensors) < 2:
        return parameters
    lengths = np.array([len(t) for t in tensors], dtype=_LENGTHS)
    blob = b"".join([MAGIC, np.array([len(tensors)], dtype=_LENGTHS).tobytes(),
                     lengths.tobytes(), *tensors])
    return Parameters(tensors=[blob], tensor_type=parameters.tensor_type)


def is_packed(parameters: Parameters) -> bool:
    return len(parameters.tensors) == 1 and parameters.tensors[0].startswith(MAGIC)


def unpack(parameters: Parameters) -> Parameters:
    """The inverse of :func:`pack`; anything else is returned as it is. A packed tensor
    whose header does not add up raises ValueError."""
    if not is_packed(parameters):
        return parameters
    blob = memoryview(parameters.tensors[0])
    start = len(MAGIC)
    width = _LENGTHS.itemsize
    if len(blob) < start + width:
        raise ValueError("packed parameters: truncated header")
    count = int(np.frombuffer(blob[start:start + width], dtype=_LENGTHS)[0])
    start += width
    if count > (len(blob) - start) // width:
        raise ValueError(f"packed parameters: {count} tensors do not fit the payload")
    lengths = np.frombuffer(blob[start:start + count * width], dtype=_LENGTHS)
    start += count * width
    if start + int(lengths.sum()) != len(blob):
        raise ValueError(f"packed parameters: {int(lengths.sum())} bytes of tensors "
                         f"declared, {len(blob) - start} present")
    tensors = []
    for n in lengths.tolist():
        tensors.append(bytes(blob[start:start + n]))
        start += n
    return Parameters(tensors=tensors, tensor_type=parameters.tensor_type)
