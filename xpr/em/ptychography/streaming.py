"""ptycho on a scan larger than its memory budget: the counts read from the file batch by batch.

`StreamedCounts` stands in for the (N, n, n) float32 counts in FFT order that ptycho otherwise
holds: indexing it with a slice of patterns (what the model's batches do) reads the patterns from
the data file (xpr.io.stem4d.Scan4D: h5py chunks, .npy slabs, RosettaSciIO's dask arrays),
prepares them as calibration does for the whole scan (flip, transpose, bin, clip, centre, pad:
calibration.StreamedPatterns.prepare), puts them in FFT order and on the backend. Reads go by
blocks of whole model batches, and the last few blocks are kept (one per thread of the model, plus
one), so a block is read once per loss evaluation.

`PackedHoldout` holds the held-out pixel set as bits (1/32 of the counts' float32 bytes) and
unpacks a batch's when asked; it is drawn chunk by chunk from the same random sequence as
reconstruct.held_out_pixels draws at once, so a streamed reconstruction sees exactly the pixels,
batches and order of the in-memory one and returns the same result.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class StreamedCounts:
    """(N, n, n) counts in FFT order, read from the data file when a slice of them is asked for.

    patterns: calibration.StreamedPatterns (prepared, padded batches from the file); backend:
    xpr.backend of the reconstruction; block_patterns: patterns read at once (a multiple of the
    model's batch size, so no batch spans two blocks); cached_blocks: blocks kept.
    """

    def __init__(self, patterns, backend, block_patterns: int, cached_blocks: int = 2):
        self.patterns = patterns
        self.backend = backend
        self.shape = tuple(patterns.shape)
        self.dtype = np.dtype(backend.real_dtype)
        self.block_patterns = max(1, int(block_patterns))
        self.cached_blocks = max(1, int(cached_blocks))
        self._cache = OrderedDict()
        self._lock = threading.Lock()
        self.blocks_read = 0

    @property
    def nbytes_resident(self) -> int:
        """Bytes of the blocks kept at most."""
        return self.cached_blocks * self.block_patterns * int(np.prod(self.shape[1:])) \
            * self.dtype.itemsize

    def _read_block(self, index: int):
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        start = index * self.block_patterns
        raw = self.patterns.scan.read(start, start + self.block_patterns)
        prepared = np.fft.ifftshift(self.patterns.prepare(raw), axes=(-2, -1))
        block = self.backend.xp.asarray(prepared, dtype=self.dtype)
        with self._lock:
            self._cache[index] = block
            self._cache.move_to_end(index)
            while len(self._cache) > self.cached_blocks:
                self._cache.popitem(last=False)
            self.blocks_read += 1
        return block

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("StreamedCounts is read by contiguous slices of patterns")
        start, stop, _ = index.indices(self.shape[0])
        if stop <= start:
            return self.backend.xp.zeros((0,) + self.shape[1:], dtype=self.dtype)
        size = self.block_patterns
        parts = []
        for block in range(start // size, (stop - 1) // size + 1):
            values = self._read_block(block)
            parts.append(values[max(start - block * size, 0):min(stop - block * size, size)])
        return parts[0] if len(parts) == 1 else self.backend.xp.concatenate(parts)

    def blocks(self):
        """Every block in order (one pass over the file; for sums over the whole scan)."""
        for block in range(-(-self.shape[0] // self.block_patterns)):
            yield self._read_block(block)


class PackedHoldout:
    """The held-out pixels (N, n, n) as bits; `holdout[slice]` is a batch's as a bool array."""

    def __init__(self, shape, fraction: float, seed: int, xp, chunk_patterns: int = 256):
        self.shape = tuple(shape)
        self.xp = xp
        rng = np.random.default_rng(seed)
        self.pixels = int(np.prod(self.shape[1:]))
        self.bits = np.empty((self.shape[0], -(-self.pixels // 8)), dtype=np.uint8)
        for start in range(0, self.shape[0], chunk_patterns):
            stop = min(start + chunk_patterns, self.shape[0])
            chosen = rng.random((stop - start,) + self.shape[1:]) < fraction
            self.bits[start:stop] = np.packbits(chosen.reshape(stop - start, -1), axis=1)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("PackedHoldout is read by slices of patterns")
        bits = self.bits[index]
        values = np.unpackbits(bits, axis=1, count=self.pixels).astype(bool)
        return self.xp.asarray(values.reshape((len(bits),) + self.shape[1:]))

    def __invert__(self):
        raise TypeError("invert a batch of the held-out set, not the whole set")
