"""Frozen linears with a hand-written backward that suits tinygrad's kernels."""
from __future__ import annotations
from typing import Any
from tinygrad import Tensor, UOp, dtypes, function, nn

def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
  """x @ weight.T + bias, whose input gradient dy @ weight is computed against a transposed copy of the weight, in a
  kernel of its own. On tinygrad's CPU backend a matmul reducing down the columns of its right operand (dy @ weight) runs
  ~4x slower than the same product against a transposed copy (3.8 vs 15 GFLOP/s measured), and the input gradients of
  linears that share an input (q/k/v, gate/up) otherwise end up summed in one kernel with several reductions, which
  gets none of tinygrad's matmul optimisations. The cost: the copies, which tinygrad schedules at the start of a step,
  so a training step holds one extra copy of the frozen weights. The forward is inlined as usual; weight and bias get
  their usual gradients."""
  def backward(dy: UOp, call: UOp) -> tuple[UOp, ...]:
    dy, x, w = Tensor(dy).contiguous(), Tensor(call.src[1]), Tensor(call.src[2])
    dy2 = dy.reshape(-1, dy.shape[-1])
    grads = ((dy @ w.T.contiguous().T).contiguous(), dy2.T @ x.reshape(-1, x.shape[-1]), dy2.sum(0))
    return tuple(g.uop for g in grads[:len(call.src) - 1])
  return function(lambda x, w, *b: x.linear(w.T, *b), grad_fxn=backward)(x, weight, *([] if bias is None else [bias]))

def on_device(x: Tensor, names: tuple[str, ...]) -> bool:
  """Whether x lives on one of the named device types (CPU, CUDA, NV, ...)."""
  return isinstance(x.device, str) and x.device.split(":")[0] in names

def base_forward(module: Any, x: Tensor) -> Tensor:
  """module(x), through `linear` when the module is a float32 nn.Linear on the CPU. Measured on CPU: float16 weights
  gain nothing from it (their matmuls are bound by the float16 conversion) and QuantizedLinear bases lose (the plain
  forward fuses their dequantization into the matmul; the transposed copy would materialise it). Measured on CUDA
  (H200, bench model): tinygrad's own backward is faster there (0.053 vs 0.058 s per step) and needs no weight copy
  (431 vs 588 MB peak)."""
  if isinstance(module, nn.Linear) and module.weight.dtype == dtypes.float32 and on_device(x, ("CPU",)):
    return linear(x, module.weight, module.bias)
  return module(x)
