"""Per-device policies: one piece of math, arranged the way each device was measured to run it fastest
(bench/RESULTS.md). Each choice is made per tensor or per kernel; none patches tinygrad.

- `base_forward`: a float32 nn.Linear on the CPU (frozen, as every base linear is) backpropagates through `linear`, a
  hand-written input gradient; float16 and quantized bases, and every other device, keep tinygrad's autograd.
- `merge_on_the_fly`: outside training, a LoRA linear on CUDA/NV multiplies by W + scale * B @ A formed on the fly, one
  matmul, instead of adding the low-rank delta from kernels of its own. It is chosen by TRAINING rather than by whether
  gradients are needed because tinygrad derives gradients from the finished graph (`loss.gradient`) after the forward
  has run, so no forward can know whether they will be asked for (one taken through the merged weight is right, only
  slower).
- `cpu_matmul_shapes`: while the steps of `captured_jit` (the Trainer's, generate's decode step) are scheduled, CPU
  matmul kernels carry kernel shapes measured on the CPU as their own options (`KernelInfo.opts_to_apply`, which
  tinygrad applies instead of its hand-coded heuristic, in compile workers too); every other kernel keeps tinygrad's
  choice.
"""
from __future__ import annotations
import contextlib, dataclasses, functools, warnings
from typing import Any, Callable, Iterator
from tinygrad import Device, Tensor, TinyJit, UOp, dtypes, function, nn
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.engine.realize import capturing, run_linear
from tinygrad.helpers import BEAM, NOOPT, TRAINING, getenv
from tinygrad.uop.ops import KernelInfo, Ops, graph_rewrite
from tinygrad.uop.symbolic import sym
from tinygrad.codegen.simplify import pm_flatten_range, pm_load_collapse, pm_simplify_ranges, pm_split_ranges
from tinygrad.schedule.multi import multi_pm
from tinygrad.schedule.rangeify import pm_mops
from tinylora.programs import compiled, to_program

# ---- frozen linears on the CPU

def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
  """x @ weight.T + bias, whose input gradient dy @ weight is computed against a transposed copy of the weight, in a
  kernel of its own. On tinygrad's CPU backend a matmul reducing down the columns of its right operand (dy @ weight)
  runs several times slower than the same product against a transposed copy, and the input gradients of linears that
  share an input (q/k/v, gate/up) otherwise end up summed in one kernel with several reductions, which gets none of
  tinygrad's matmul optimisations. The cost: the copies, which tinygrad schedules at the start of a step, so a training
  step holds one extra copy of the frozen weights. The forward is inlined as usual; weight and bias get their usual
  gradients."""
  def backward(dy: UOp, call: UOp) -> tuple[UOp, ...]:
    dy, x, w = Tensor(dy).contiguous(), Tensor(call.src[1]), Tensor(call.src[2])
    dy2 = dy.reshape(-1, dy.shape[-1])
    grads = ((dy @ w.T.contiguous().T).contiguous(), dy2.T @ x.reshape(-1, x.shape[-1]), dy2.sum(0))
    return tuple(g.uop for g in grads[:len(call.src) - 1])
  return function(lambda x, w, *b: x.linear(w.T, *b), grad_fxn=backward)(x, weight, *([] if bias is None else [bias]))

def on_device(x: Tensor, names: tuple[str, ...]) -> bool:
  """Whether x lives on one of the named device types (CPU, CUDA, NV, ...); a tensor on several devices (data
  parallel), on such devices only."""
  devices = x.device if isinstance(x.device, tuple) else (x.device,)
  return all(isinstance(d, str) and d.split(":")[0] in names for d in devices)

def base_forward(module: Any, x: Tensor) -> Tensor:
  """module(x), through `linear` when the module is a float32 nn.Linear on the CPU. float16 weights gain nothing from
  it (their matmuls are bound by the float16 conversion), quantized bases lose (the plain forward fuses their
  dequantization into the matmul; the transposed copy would materialise it), and on CUDA tinygrad's own backward is
  faster and needs no weight copy."""
  if isinstance(module, nn.Linear) and module.weight.dtype == dtypes.float32 and on_device(x, ("CPU",)):
    return linear(x, module.weight, module.bias)
  return module(x)

# ---- LoRA forwards outside training

MERGE_ON_THE_FLY = ("CUDA", "NV")  # NV renders the same kernels as CUDA; on the CPU the separate delta is as fast or faster

def merge_on_the_fly(base: Any, x: Tensor) -> bool:
  """Whether a LoRA linear over `base` should compute x @ (W + scale * B @ A).T, one matmul, for input x."""
  return not TRAINING and isinstance(base, nn.Linear) and on_device(x, MERGE_ON_THE_FLY)

# ---- CPU matmul kernel shapes

# tinygrad 0.14 optimises a CPU matmul by upcasting 4x4 outputs and unrolling the reduction by 4, which renders each
# output as a horizontal sum of float4 products; when the reduction runs down the columns of an operand it is slower
# still. Measured faster: reduction axis contiguous in both inputs (x @ W.T): upcast 4 x 8 outputs, unroll 4; an output
# axis contiguous in an input (dy @ W, weight gradients): upcast that axis 16 and the other 4, as outer products into
# scalar accumulators that clang vectorises. The numbers are the same up to float rounding (another summation order).

def _contiguous_in_an_input(k: Scheduler, axis: int) -> bool:
  return any(any(c is k.rngs[axis] for c in b.src[1].get_idx().split_uop(Ops.ADD)) for b in k.bufs if b in k.reduceop.backward_slice)

def cpu_matmul_plan(k: Scheduler) -> list[Opt] | None:
  """The measured shape for a CPU kernel holding one ADD reduction over two output axes, all at least 64 long; None
  for any other kernel."""
  if k.ren.target.device != "CPU" or k.reduceop is None or k.reduceop.arg[0] is not Ops.ADD: return None
  outs, reds = k.upcastable_dims, k.unrollable_dims
  if len(outs) != 2 or len(reds) != 1 or any(not isinstance(k.full_shape[a], int) or k.full_shape[a] < 64 for a in outs + reds):
    return None
  o0, o1 = outs
  if _contiguous_in_an_input(k, o1): return [Opt(OptOps.UPCAST, o1, 16), Opt(OptOps.UPCAST, o0, 4)]
  if _contiguous_in_an_input(k, o0): return [Opt(OptOps.UPCAST, o0, 16), Opt(OptOps.UPCAST, o1, 4)]
  return [Opt(OptOps.UPCAST, o1, 4), Opt(OptOps.UPCAST, o0, 8), Opt(OptOps.UNROLL, 0, 4)]

def _scheduler(sink: UOp, renderer: Any) -> Scheduler:
  """The kernel's Scheduler as tinygrad's compiler builds it: the range rewrites that come before its optimisations
  (full_rewrite_to_sink in tinygrad/codegen/__init__.py), then apply_opts' first step. Plans name axes of these ranges."""
  sink = graph_rewrite(graph_rewrite(sink, multi_pm), pm_mops, bottom_up=True)
  sink = graph_rewrite(graph_rewrite(sink, pm_load_collapse), pm_split_ranges + pm_flatten_range, ctx={})
  sink = graph_rewrite(graph_rewrite(sink, sym + pm_flatten_range), pm_flatten_range + pm_simplify_ranges, ctx={})
  k = Scheduler(sink, renderer)
  k.convert_loop_to_global()
  return k

@functools.cache
def planned_kernel(sink: UOp, renderer: Any) -> UOp:
  """`sink` (a kernel's AST) carrying its plan as opts_to_apply, and compiled with it right away (so a plan tinygrad
  rejects never reaches a step; the program is cached for the step); `sink` itself when it has no plan, has options
  already, or anything fails (tinygrad's heuristic then decides). The options are part of the kernel, so its program
  is cached apart from the heuristic's."""
  if sink.tag is not None or not isinstance(sink.arg, KernelInfo) or sink.arg.opts_to_apply is not None or sink.arg.applied_opts:
    return sink
  if sum(u.op is Ops.REDUCE for u in sink.toposort()) != 1: return sink  # not a matmul: spare the rewrites below
  try:
    if (plan := cpu_matmul_plan(_scheduler(sink, renderer))) is None: return sink
    planned = sink.replace(arg=dataclasses.replace(sink.arg, opts_to_apply=tuple(plan)))
    to_program(planned, renderer)
  except KernelOptError: return sink  # this kernel cannot take the plan
  except Exception as e:  # e.g. a tinygrad change: compile with its own heuristic rather than fail the step
    warnings.warn(f"tinylora: CPU matmul shape not applied ({type(e).__name__}: {e}); using tinygrad's heuristic")
    return sink
  return planned

def planned_schedule(linear: UOp) -> UOp:
  """A schedule (LINEAR of kernel CALLs) with every CPU kernel through `planned_kernel`. Nothing is planned while a
  BEAM search or NOOPT is asked for: the user's choice wins."""
  if BEAM.value or getenv("JITBEAM") or NOOPT: return linear
  def plan(call: UOp) -> UOp:
    if call.op is not Ops.CALL or call.src[0].op is not Ops.SINK: return call
    renderer = Device[call.device if isinstance(call.device, str) else call.device[0]].renderer
    if renderer.target.device != "CPU": return call
    sink = planned_kernel(call.src[0], renderer)
    return call if sink is call.src[0] else call.replace(src=(sink, *call.src[1:]))
  return linear.replace(src=tuple(plan(c) for c in linear.src))

class _Planner:
  """At the head of tinygrad's `capturing` list (where a TinyJit collects the schedules of the call it captures), plans
  each schedule and compiles it through tinylora.programs' disk cache, then hands it to the TinyJit capturing this call
  or, outside a capture, runs it as Tensor.realize would."""
  def __init__(self, jit: Any | None): self.jit = jit
  def add_linear(self, linear: UOp, var_vals: dict[str, int]) -> None:
    if self.jit is not None: self.jit.add_linear(compiled(planned_schedule(linear)), var_vals)
    else: run_linear(compiled(planned_schedule(linear)), var_vals)

@contextlib.contextmanager
def cpu_matmul_shapes() -> Iterator[None]:
  """Inside this block, kernels that Tensor.realize schedules carry the CPU matmul shapes (see `planned_kernel`); when
  it ends, in any way, tinygrad schedules as before. `captured_jit` wraps its steps in it. No tensor data can be
  read inside (as in a TinyJit capture)."""
  planner = _Planner(capturing[0] if capturing else None)
  capturing.insert(0, planner)
  try: yield
  finally: capturing.remove(planner)

def captured_jit(step: Callable[..., Any]) -> TinyJit:
  """`step` as a TinyJit that captures on its first call: the kernels are scheduled and compiled once (TinyJit's usual
  eager first call would schedule them a second time) and the first call runs on the capture's memory plan. The eager
  call exists to realize one-time work, such as lazy weights, outside the capture, so every tensor the step reads must
  be realized before the first call. CPU matmuls get their measured kernel shapes (`cpu_matmul_shapes`); a step that
  realizes through tinylora.programs.realize and every kernel come from tinylora's disk cache where an earlier process
  scheduled and compiled them. The Trainer's steps and generate's decode step are made here."""
  jit = TinyJit(cpu_matmul_shapes()(step))
  jit.cnt = 1  # tinygrad 0.14: call 0 runs eagerly, call 1 captures, later calls replay
  return jit
