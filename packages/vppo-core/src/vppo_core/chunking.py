"""The chunked walk over positions that the log-prob and the exact-dependency kernels share (never a float32
``[B·L, V]`` tensor): how wide a chunk is, a reusable-buffer chunker, and the per-chunk tempering and log-softmax.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MIN_BLOCK",
    "Chunker",
    "as_rows",
    "check_temperature",
    "chunk_width",
    "compute_dtype",
    "log_softmax_into",
    "tempered",
    "vocab_block",
]

# chunk_size=None: as many positions as fit a float32 [positions, V] chunk of this many bytes. 64 MiB is ~110
# positions at V = 151,936: small enough to stay far below the naive path, big enough that per-chunk overhead
# (a few kernel launches) is negligible next to the V-wide work.
DEFAULT_CHUNK_BYTES = 64 * 2**20
# The hidden-state path walks the vocabulary with every position at once (vocab_block): by default [B·L, block]
# float32 blocks of 16 MiB, and never narrower than DEFAULT_MIN_BLOCK entries. Measured at B·L = 1,024 (H = 3,584,
# V = 151,936; `bench_race.py --ablations`, vppo-core README "Benchmarks"): forward + backward within 1.10x of the
# default from 1,024 to 16,384 entries in bf16, while 256-entry blocks were 1.27x slower (thin matmuls); timing
# differences under ~20 % are noise on that machine. 16 MiB keeps the forward under a sixteenth of the naive path's
# memory at B·L = 1,024.
DEFAULT_BLOCK_BYTES = 16 * 2**20
DEFAULT_MIN_BLOCK = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype except float64 (kept, so gradcheck and exactness tests can run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_width(chunk_size: int | None, batch: int, vocab: int) -> int:
    """Number of sequence positions (dim 1) per chunk, so that a chunk holds about ``chunk_size`` positions.

    ``chunk_size=None`` picks the positions whose float32 ``[positions, vocab]`` chunk fits ``DEFAULT_CHUNK_BYTES``.
    """
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (positions per chunk) or None, got {chunk_size!r}")
    return max(1, chunk_size // max(1, batch))


def vocab_block(chunk_size: int | None, rows: int, vocab: int) -> int:
    """Vocabulary entries per block of a walk over the *vocabulary* with all ``rows`` positions at once.

    A block ``[rows, block]`` holds as many logits as ``chunk_size`` positions' full rows would (``chunk_size · V``),
    so the memory bound a caller sets with ``chunk_size`` is the same whichever dimension is walked.
    ``chunk_size=None``: blocks of ``DEFAULT_BLOCK_BYTES`` of float32, at least ``DEFAULT_MIN_BLOCK`` entries wide.
    """
    if chunk_size is None:
        return max(1, min(vocab, max(DEFAULT_MIN_BLOCK, DEFAULT_BLOCK_BYTES // 4 // max(1, rows))))
    return max(1, min(vocab, chunk_width(chunk_size, 1, vocab) * vocab // max(1, rows)))


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0 (it divides the logits), got {temperature!r}")
    return float(temperature)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, L, *] -> a [1, B·L, *] *view* when the layout allows it (then every chunk is contiguous), else x itself.

    A slice like ``logits[:, P-1:-1]`` of a bigger output cannot be viewed so; it is then chunked as [B, w, *]
    slices (never copied whole).
    """
    if x.shape[0] == 1:
        return x
    try:
        return x.view(1, x.shape[0] * x.shape[1], *x.shape[2:])
    except RuntimeError:
        return x


class Chunker:
    """Walks dim 1 of a [b, n, ...] tensor in chunks of ``width`` and owns ``n_buffers`` reusable float buffers.

    Reusing the buffers matters on CPU: a fresh 64 MiB block per chunk is a fresh mmap, i.e. page faults on every
    chunk, which costs as much as the log-softmax itself (measured: about 2x slower).
    """

    def __init__(self, b, n, vocab, width, dtype, device, n_buffers: int = 2):
        self.b, self.n, self.width, self.vocab = b, n, width, vocab
        rows = b * min(width, n)
        self.buffers = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(n_buffers)]

    def slices(self):
        for start in range(0, self.n, self.width):
            yield slice(start, min(start + self.width, self.n))

    def views(self, sl: slice) -> tuple[torch.Tensor, ...]:
        """The buffers as contiguous [b, k, vocab] tensors for the chunk ``sl`` (k = its length)."""
        k = sl.stop - sl.start
        return tuple(buf[: self.b * k].view(self.b, k, self.vocab) for buf in self.buffers)


def tempered(chunk: torch.Tensor, buf: torch.Tensor, temperature: float) -> torch.Tensor:
    """chunk / temperature in the compute dtype, written into ``buf`` unless chunk can be read as is."""
    if chunk.dtype == buf.dtype and temperature == 1.0:
        return chunk
    buf.copy_(chunk)
    if temperature != 1.0:
        buf.div_(temperature)
    return buf


def log_softmax_into(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log_softmax(z, -1) written into the preallocated ``out`` (same shape)."""
    return torch.ops.aten._log_softmax.out(z, -1, False, out=out)
