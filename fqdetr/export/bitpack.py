"""Dense bit packing of integer codes: n codes of b bits take ceil(n * b / 8) bytes.

Code i occupies bits [i * b, (i + 1) * b) of the byte stream, least significant bit
first, so two 4-bit codes share a byte (the first in the low nibble) and 3-bit codes
straddle byte boundaries. Signed codes are stored offset by -qmin (a b-bit unsigned
field), so every stored field is a valid code of the bit-width.
"""
import numpy as np
import torch

from fqkernels import checks, reference


def packed_nbytes(count, bits):
    """Bytes that ``count`` codes of ``bits`` bits take."""
    return (count * bits + 7) // 8


def pack_codes(codes, bits, signed=True):
    """codes (any integer tensor, every value in qrange(bits, signed)) -> uint8 [packed_nbytes]."""
    checks.check_bits(bits)
    qmin, qmax = reference.qrange(bits, signed)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < qmin or flat.max() > qmax):
        raise ValueError(f"codes: expected values in [{qmin}, {qmax}] for {bits}-bit codes, got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    fields = (flat - qmin).cpu().numpy().astype(np.uint8)
    bit_matrix = (fields[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [n, bits], LSB first
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed, count, bits, signed=True, what="codes"):
    """uint8 bytes from pack_codes -> int32 [count] codes; ValueError naming ``what`` when the
    byte count does not match ``count`` codes of ``bits`` bits or the padding bits are set."""
    checks.check_bits(bits, f"{what}: bits")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D uint8 tensor of packed codes, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    expected = packed_nbytes(count, bits)
    if packed.numel() != expected:
        raise ValueError(f"{what}: {packed.numel()} bytes do not hold {count} codes of {bits} bits "
                         f"(expected {expected} bytes): the codes do not fit their bit-width")
    stream = np.unpackbits(packed.numpy(), bitorder="little")
    if stream[count * bits:].any():
        raise ValueError(f"{what}: bits set past the last {bits}-bit code: not packed at {bits} bits")
    bit_matrix = stream[: count * bits].reshape(count, bits).astype(np.int32)
    fields = bit_matrix @ (1 << np.arange(bits, dtype=np.int32))
    return torch.from_numpy(fields) + reference.qrange(bits, signed)[0]
