"""Faster matmul kernels on tinygrad's CPU backend: measured kernel shapes in place of its hand-coded defaults.

tinygrad 0.14 optimises a CPU matmul by upcasting 4x4 outputs and unrolling the reduction by 4, which renders each
output as a horizontal sum of float4 products (`acc += a[0]*b[0] + a[1]*b[1] + ...`): 25-28 GFLOP/s here, and 9-16
when the reduction runs down the columns of an operand. Measured on a 2-core AMD EPYC (bench/RESULTS.md), 1024 tokens:
- reduction axis contiguous in both inputs (x @ W.T): upcast 4 x 8 outputs, unroll 4 -> 44-46 GFLOP/s;
- an output axis contiguous in an input (dy @ W, weight gradients): upcast that axis 16 and the other 4, as outer
  products into scalar accumulators that clang vectorises -> 46-49 GFLOP/s.
`install()` puts these in front of tinygrad's heuristic for CPU kernels holding one ADD reduction over two output axes,
all at least 64 long; every other kernel, and any plan tinygrad rejects, keeps tinygrad's own choice. The numbers are
the same up to float rounding (another summation order)."""
from __future__ import annotations
from typing import Any
import tinygrad.codegen.opt.heuristic as heuristic
import tinygrad.engine.realize as realize
from tinygrad.codegen.opt import Opt, OptOps, KernelOptError
from tinygrad.uop.ops import Ops

_hand_coded, _compile_kernel = heuristic.hand_coded_optimizations, realize._compile_kernel

def _contiguous_in_an_input(k: Any, axis: int) -> bool:
  return any(any(c is k.rngs[axis] for c in b.src[1].get_idx().split_uop(Ops.ADD)) for b in k.bufs if b in k.reduceop.backward_slice)

def cpu_matmul_optimizations(k: Any) -> Any:
  if k.ren.target.device != "CPU" or k.reduceop is None or k.reduceop.arg[0] is not Ops.ADD: return _hand_coded(k)
  outs, reds = k.upcastable_dims, k.unrollable_dims
  if len(outs) != 2 or len(reds) != 1 or any(not isinstance(k.full_shape[a], int) or k.full_shape[a] < 64 for a in outs + reds):
    return _hand_coded(k)
  o0, o1 = outs
  if _contiguous_in_an_input(k, o1): plan = [Opt(OptOps.UPCAST, o1, 16), Opt(OptOps.UPCAST, o0, 4)]
  elif _contiguous_in_an_input(k, o0): plan = [Opt(OptOps.UPCAST, o0, 16), Opt(OptOps.UPCAST, o1, 4)]
  else: plan = [Opt(OptOps.UPCAST, o1, 4), Opt(OptOps.UPCAST, o0, 8), Opt(OptOps.UNROLL, 0, 4)]
  optimized = k.copy()
  try:
    for opt in plan: optimized.apply_opt(opt)
  except KernelOptError: return _hand_coded(k)
  return optimized

def _compile_kernel_with_cpu_matmuls(task: tuple) -> tuple:
  # tinygrad compiles in spawned worker processes, which import this module afresh: install there too
  install()
  return _compile_kernel(task)

def install():
  """Makes tinygrad use the kernel shapes above for CPU matmuls in this process and its compile workers. The Trainer
  calls it for models on the CPU; it changes no other device's kernels. Idempotent."""
  heuristic.hand_coded_optimizations = cpu_matmul_optimizations
  realize._compile_kernel = _compile_kernel_with_cpu_matmuls
