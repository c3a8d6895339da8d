"""Training with a float16 or bfloat16 base: which dtypes a device can compute, checked before anything is built on
them, and the dynamic loss scale float16 training needs (as torch.amp.GradScaler). The LoRA tensors, their gradients
and the AdamW state stay float32 whatever the base's dtype; the loss and the attention softmax are computed in float32."""
from __future__ import annotations
import functools, shutil, subprocess
from dataclasses import dataclass
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinylora.engine import clang_command
from tinylora.errors import LoraError

MODEL_DTYPES = (dtypes.float32, dtypes.float16, dtypes.bfloat16)

def check_dtype(dtype: DType, device: str | None = None) -> DType:
  """Returns `dtype` if a model can be built and trained in it on `device` (default: tinygrad's default device), else
  raises LoraError saying why and what to do; bfloat16 is tried once per device and compiler."""
  if dtype not in MODEL_DTYPES: raise LoraError(f"model dtype {dtype}: expected float32, float16 or bfloat16")
  if dtype == dtypes.bfloat16 and (err := _bfloat16_error(Device.canonicalize(device))): raise LoraError(err)
  return dtype

def bfloat16_compile_error(command: list[str]) -> str | None:
  """The first error the compile `command` (engine.clang_command: C on stdin) reports for a small bfloat16 function
  (clang < 15 has no __bf16 on x86), or None when it compiles."""
  src = "__bf16 f(__bf16 *x) { return (__bf16)((float)x[0] * 2.0f); }"
  try: out = subprocess.run([*command, "-o", "/dev/null"], input=src, capture_output=True, text=True)
  except OSError as e: return f"{command[0]}: {e.strerror}"
  if out.returncode == 0: return None
  return next((l.strip() for l in out.stderr.splitlines() if "error" in l), out.stderr.strip()[:200] or f"exit status {out.returncode}")

@functools.cache
def _bfloat16_error(device: str) -> str | None:
  if (command := clang_command(device)) is not None:
    if (err := bfloat16_compile_error(command)) is None: return None
    cc = command[0]
    newer = next((c for c in ("clang-19", "clang-18", "clang-17", "clang-16", "clang-15") if shutil.which(c)), None)
    fix = f"{newer} is installed: run with CC={newer}" if newer else \
      "install clang >= 15 (Debian 12: apt-get install clang-19, which .ci/setup.sh does) and run with CC=clang-19"
    return f"bfloat16 on {device}: tinygrad compiles CPU kernels with {cc!r}, which cannot compile bfloat16 ({err}); " \
           f"{fix}, or use float16 or float32"
  try: (Tensor([1.5, 2.0], dtype=dtypes.bfloat16, device=device) * 2).realize()
  except Exception as e: return f"bfloat16 on {device}: tinygrad cannot compute it there ({type(e).__name__}: {e}); use float16 or float32"
  return None

@dataclass
class LossScale:
  """Dynamic loss scaling for a float16 base: the loss is multiplied by `value` before the backward, so small
  activation gradients do not flush to zero in float16, and the LoRA gradients are divided by it again in float32.
  A step whose gradients overflow is skipped and halves the scale; `growth_interval` good steps in a row double it.
  `max_skips` skipped steps in a row are not an overflow any more but divergence, and raise."""
  value: float = 2.0 ** 16
  growth_interval: int = 2000
  max_skips: int = 20
  skips_in_a_row: int = 0
  good_in_a_row: int = 0

  def update(self, overflow: bool, step: int) -> None:
    if not overflow:
      self.skips_in_a_row, self.good_in_a_row = 0, self.good_in_a_row + 1
      if self.good_in_a_row % self.growth_interval == 0: self.value *= 2
      return
    self.value, self.skips_in_a_row, self.good_in_a_row = self.value / 2, self.skips_in_a_row + 1, 0
    if self.skips_in_a_row >= self.max_skips:
      raise LoraError(f"step {step}: non-finite gradients in {self.skips_in_a_row} steps in a row although the float16 "
                      f"loss scale fell to {self.value:g}: training diverged; no update was applied and nothing was saved")
