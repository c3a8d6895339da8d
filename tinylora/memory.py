"""How much memory tinygrad allocates over a block of code: the one tracker the benchmarks and tests use."""
from __future__ import annotations
import contextlib
from dataclasses import dataclass
from typing import Iterator
from tinygrad import GlobalCounters
from tinygrad.device import Buffer

@dataclass
class Peak:
  start: int    # bytes tinygrad held allocated when the block began (GlobalCounters.mem_used)
  peak: int     # the most it held at any moment inside the block
  largest: int  # the largest single buffer allocated inside the block

  @property
  def added(self) -> int: return self.peak - self.start

@contextlib.contextmanager
def peak_memory() -> Iterator[Peak]:
  """Yields a Peak kept up to date while the block runs. tinygrad counts allocated bytes but keeps no high-water mark,
  so Buffer.allocate is wrapped for the block only (restored when it ends, in any way)."""
  p, allocate = Peak(GlobalCounters.mem_used, GlobalCounters.mem_used, 0), Buffer.allocate
  def tracked(self: Buffer, *args, **kwargs) -> Buffer:
    ret = allocate(self, *args, **kwargs)
    p.peak, p.largest = max(p.peak, GlobalCounters.mem_used), max(p.largest, self.nbytes)
    return ret
  Buffer.allocate = tracked
  try: yield p
  finally: Buffer.allocate = allocate
