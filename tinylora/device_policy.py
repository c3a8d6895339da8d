"""Per-device policies: one piece of math, arranged the way each device was measured to run it fastest
(bench/RESULTS.md, "Figures behind code comments: device policy and engine room"). Each choice is made per tensor or
per kernel; none patches tinygrad. How a choice reaches tinygrad is tinylora.engine's business.

- `base_forward`: a float32 nn.Linear on the CPU (frozen, as every base linear is) backpropagates through `linear`, a
  hand-written input gradient; float16 and quantized bases, and every other device, keep tinygrad's autograd.
- `merge_on_the_fly`: outside training, a LoRA linear on CUDA/NV multiplies by W + scale * B @ A formed on the fly, one
  matmul, instead of adding the low-rank delta from kernels of its own. It is chosen by training mode rather than by
  whether gradients are needed because tinygrad derives gradients from the finished graph (`loss.gradient`) after the
  forward has run, so no forward can know whether they will be asked for (one taken through the merged weight is
  right, only slower).
- `cpu_matmul_plan`: the kernel shapes of CPU matmuls in tinylora's TinyJit'd steps (`captured_step`: the Trainer's,
  generate's decode step; `cpu_matmul_shapes` for any block); every other kernel keeps tinygrad's choice.
"""
from __future__ import annotations
import contextlib, math
from typing import Any, Callable
from tinygrad import Tensor, TinyJit, dtypes, nn
from tinylora.engine import KernelOpt, KernelShapes, MatmulKernel, captured_jit, custom_gradient, is_training, kernel_shapes

# ---- frozen linears on the CPU

def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
  """x @ weight.T + bias, whose input gradient dy @ weight is computed against a transposed copy of the weight, in a
  kernel of its own. On tinygrad's CPU backend a matmul reducing down the columns of its right operand (dy @ weight)
  runs several times slower than the same product against a transposed copy, and the input gradients of linears that
  share an input (q/k/v, gate/up) otherwise end up summed in one kernel with several reductions, which gets none of
  tinygrad's matmul optimisations. The cost: the copies, which tinygrad schedules at the start of a step, so a training
  step holds one extra copy of the frozen weights. The forward is inlined as usual; weight and bias get their usual
  gradients."""
  def backward(dy: Tensor, x: Tensor, w: Tensor, *bias: Tensor) -> tuple[Tensor, ...]:
    dy = dy.contiguous()
    dy2 = dy.reshape(-1, dy.shape[-1])
    grads = (input_gradient(dy, w.T.contiguous()), dy2.T @ x.reshape(-1, x.shape[-1]), dy2.sum(0))
    return grads[:2 + len(bias)]
  return custom_gradient(lambda x, w, *b: x.linear(w.T, *b), backward)(x, weight, *([] if bias is None else [bias]))

LONG_REDUCTION, REDUCTION_CHUNK = 32768, 4096  # tinygrad's REDUCEOP_SPLIT_THRESHOLD; a chunk whose operand rows stay in cache

def input_gradient(dy: Tensor, wt: Tensor) -> Tensor:
  """dy @ wt.T, wt being a linear's transposed weight (in, out). A product over at least LONG_REDUCTION outputs (an
  output head's vocabulary) is the sum of products over REDUCTION_CHUNK outputs each, in kernels of their own:
  tinygrad's scheduler would split that reduction itself, into a partial-sum kernel with three output axes that no
  matmul plan shapes and that reads rows too long for the cache. Equal up to float rounding (another summation order)."""
  n = wt.shape[1]
  if n < LONG_REDUCTION: return (dy @ wt.T).contiguous()
  return Tensor.stack(*[(dy[..., i:i + REDUCTION_CHUNK] @ wt[:, i:i + REDUCTION_CHUNK].T).contiguous()
                        for i in range(0, n, REDUCTION_CHUNK)]).sum(0)

def on_device(x: Tensor, names: tuple[str, ...]) -> bool:
  """Whether x lives on one of the named device types (CPU, CUDA, NV, ...); a tensor on several devices (data
  parallel), on such devices only."""
  devices = x.device if isinstance(x.device, tuple) else (x.device,)
  return all(isinstance(d, str) and d.split(":")[0] in names for d in devices)

def base_forward(module: Any, x: Tensor) -> Tensor:
  """module(x), through `linear` when the module is a float32 nn.Linear on the CPU. float16 weights gain nothing from
  it (their matmuls are bound by the float16 conversion), quantized bases arrange their own products
  (tinylora.quant: a transient float copy per weight for training rows, the dequantization fused into the matmul
  otherwise), and on CUDA tinygrad's own backward is faster and needs no weight copy."""
  if isinstance(module, nn.Linear) and module.weight.dtype == dtypes.float32 and on_device(x, ("CPU",)):
    return linear(x, module.weight, module.bias)
  return module(x)

# ---- LoRA forwards outside training

MERGE_ON_THE_FLY = ("CUDA", "NV")  # NV renders the same kernels as CUDA; on the CPU the separate delta is as fast or faster

def merge_on_the_fly(base: Any, x: Tensor) -> bool:
  """Whether a LoRA linear over `base` should compute x @ (W + scale * B @ A).T, one matmul, for input x."""
  return not is_training() and isinstance(base, nn.Linear) and on_device(x, MERGE_ON_THE_FLY)

# ---- CPU matmul kernel shapes

def cpu_matmul_plan(m: MatmulKernel) -> list[KernelOpt] | None:
  """The measured shape for a CPU matmul kernel whose axes are all at least 64 long; None for smaller ones. tinygrad's
  heuristic upcasts 4x4 outputs and unrolls the reduction by 4, which renders each output as a horizontal sum of float4
  products, slower still when the reduction runs down the columns of an operand. Measured faster (bench/RESULTS.md):
  with the reduction contiguous in both inputs (x @ W.T), upcast 4 x 8 outputs and unroll 4; with an output axis
  contiguous in an input (dy @ W, weight gradients), upcast that axis 16 and the other 4, as outer products into
  scalar accumulators that clang vectorises. A product of a few rows (x @ W.T for 2 to 63 rows: a decode step's batch,
  a prefill chunk, their LoRA products) takes the first shape with the rows upcast as far as they divide 8; tinygrad's
  heuristic reads the weight once per row or two there. The numbers are the same up to float rounding (another
  summation order)."""
  rows, cols = m.outputs
  if m.contiguous_output is None and 2 <= rows < 64 and (up := math.gcd(rows, 8)) > 1:
    return [KernelOpt("upcast", 1, 4), KernelOpt("upcast", 0, up), KernelOpt("unroll", 0, 4)]
  if min(*m.outputs, m.reduction) < 64: return None
  if (a := m.contiguous_output) is None: return [KernelOpt("upcast", 1, 4), KernelOpt("upcast", 0, 8), KernelOpt("unroll", 0, 4)]
  return [KernelOpt("upcast", a, 16), KernelOpt("upcast", 1 - a, 4)]

CPU_MATMUL_SHAPES = KernelShapes(("CPU",), cpu_matmul_plan)

def cpu_matmul_shapes() -> contextlib.AbstractContextManager:
  """A block whose CPU matmul kernels carry `cpu_matmul_plan`'s shapes (engine.kernel_shapes)."""
  return kernel_shapes(CPU_MATMUL_SHAPES)

def captured_step(step: Callable[..., Any]) -> TinyJit:
  """`step` as tinylora's TinyJit'd steps are made (engine.captured_jit: captured on its first call, schedules and
  programs stored), with the CPU matmul shapes. The Trainer's steps and generate's decode step are made here."""
  return captured_jit(step, CPU_MATMUL_SHAPES)
