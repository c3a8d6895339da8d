"""The engine room: every use of tinygrad below its public API, so that a tinygrad upgrade is this file's work.

Written against tinygrad 0.14.0. Its public API, which the rest of tinylora may import directly, is what
`tinygrad/__init__.py` exports (Tensor, TinyJit, function, UOp, Variable, dtypes, GlobalCounters, fetch, Context,
getenv, Device), `tinygrad.nn` (nn.state, nn.optim) and `tinygrad.dtype.DType` as a type. Everything else is internal
and used only here: tinygrad.codegen, tinygrad.engine.realize (capturing, run_linear, lower_and_compile),
tinygrad.schedule, tinygrad.uop (Ops, KernelInfo, CallInfo, graph_rewrite, symbolic), tinygrad.tensor.transform_to_call,
tinygrad.device (Buffer), tinygrad.helpers' ContextVars (TRAINING, BEAM, NOOPT, SCACHE, CAPTURING) and disk cache,
tinygrad.runtime, tinygrad.llm.gguf, TinyJit's cnt and captured graph, and walking a UOp's op/src/arg. tests/test_engine.py checks that no
other module of tinylora imports tinygrad below the public API.

- Context: `is_training`, `outside_capture`, `tqdm`.
- Autograd: `custom_gradient`, a forward with a hand-written backward over Tensors.
- Kernel shapes: `KernelShapes` (which kernel options a device policy chooses for which matmul kernels, in terms of
  `MatmulKernel` and `KernelOpt`), `kernel_shapes` (a block whose realized kernels carry them), `captured_jit` (a
  TinyJit that captures on its first call, with them).
- Stored schedules and programs: `realize`, `compiled`, `stored`, `to_program`, `schedule_key`.
- Measurement: `peak_memory`, `captured_copy_bytes`.
- Devices: `clang_command` (how the CPU device compiles C), `set_default_device`.
- GGUF: tinygrad's readers of llama.cpp's header values and tensor types (`readers`, `read_str`, ...,
  `ggml_data_to_tensor`, `GGML_QUANT_BLOCKS`), re-exported for tinylora.formats.gguf.
"""
from __future__ import annotations
import contextlib, dataclasses, functools, hashlib, importlib.metadata, math, warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence
from tinygrad import Device, GlobalCounters, Tensor, TinyJit, UOp, function
from tinygrad.codegen import to_program_cache, to_program_key, to_program as lower
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.codegen.simplify import pm_flatten_range, pm_load_collapse, pm_simplify_ranges, pm_split_ranges
from tinygrad.device import Buffer
from tinygrad.engine.realize import capturing, lower_and_compile, run_linear
from tinygrad.helpers import BEAM, DEV, NOOPT, SCACHE, TRAINING, Context, ContextVar, diskcache_get, diskcache_put, getenv
from tinygrad.helpers import tqdm  # noqa: F401  tinygrad's progress bar, which the training loop shows
# GGUF: tinygrad's value readers and dequantization, with which tinylora.formats.gguf reads llama.cpp files;
# GGML_QUANT_BLOCKS: ggml type -> (weights per block, bytes per block) of the block-quantized types tinygrad reads
from tinygrad.llm.gguf import _GGML_QUANT as GGML_QUANT_BLOCKS  # noqa: F401
from tinygrad.llm.gguf import ggml_data_to_tensor, read_int32, read_int64, read_str, read_uint32, read_uint64, readers  # noqa: F401
from tinygrad.renderer import Renderer
from tinygrad.runtime.support.compiler_cpu import ClangCompiler
from tinygrad.schedule import schedule_cache
from tinygrad.schedule.multi import multi_pm
from tinygrad.schedule.rangeify import pm_mops
from tinygrad.tensor import transform_to_call
from tinygrad.uop.ops import CallInfo, KernelInfo, Ops, graph_rewrite
from tinygrad.uop.symbolic import sym

# ---- context

def is_training() -> bool:
  """Whether tinygrad runs in training mode (`Context(TRAINING=1)`: dropout on, optimizers may step)."""
  return bool(TRAINING)

def outside_capture() -> contextlib.AbstractContextManager:
  """A block whose tensors are realized now even while a TinyJit captures: one-time work (a table every step reads)
  that a capture would otherwise record and redo in every replay."""
  return Context(CAPTURING=0)

def set_default_device(device: str) -> None:
  """Makes `device` (as DEV spells it: "CPU", "CUDA", "NULL", ...) tinygrad's default device for this process."""
  DEV.value = device

# ---- autograd

def custom_gradient(forward: Callable[..., Tensor], backward: Callable[..., Sequence[Tensor]]) -> Callable[..., Tensor]:
  """`forward` as a tinygrad function whose gradient is backward(dy, *inputs): one Tensor per input, in order, where
  dy is the gradient of forward's output. The backward's qualified name keys stored schedules (`schedule_key`)."""
  @functools.wraps(backward)
  def grad_fxn(dy: UOp, call: UOp) -> tuple[UOp, ...]:
    return tuple(g.uop for g in backward(Tensor(dy), *(Tensor(s) for s in call.src[1:])))
  return function(forward, grad_fxn=grad_fxn)

# ---- kernel shapes

@dataclass(frozen=True)
class MatmulKernel:
  """A kernel holding one ADD reduction over two output axes (a matmul), as a device policy sees it."""
  outputs: tuple[int, int]        # the lengths of the two output axes, in tinygrad's axis order
  reduction: int                  # the length of the reduction
  contiguous_output: int | None   # an output axis (0 or 1; 1 first) that is contiguous in an input, or None

@dataclass(frozen=True)
class KernelOpt:
  """One kernel option: upcast output axis `axis` (0 or 1) by `amount`, or unroll the reduction (axis 0) by it."""
  kind: Literal["upcast", "unroll"]
  axis: int
  amount: int

@dataclass(frozen=True)
class KernelShapes:
  """A device policy's kernel shapes: `plan` chooses the options of each matmul kernel compiled for one of `devices`
  (device types: "CPU", "CUDA", ...), or None to leave it to tinygrad's heuristic."""
  devices: tuple[str, ...]
  plan: Callable[[MatmulKernel], Sequence[KernelOpt] | None]

def _contiguous_in_an_input(k: Scheduler, axis: int) -> bool:
  return any(any(c is k.rngs[axis] for c in b.src[1].get_idx().split_uop(Ops.ADD)) for b in k.bufs if b in k.reduceop.backward_slice)

def _scheduler(sink: UOp, renderer: Renderer) -> Scheduler:
  """The kernel's Scheduler as tinygrad's compiler builds it: the range rewrites that come before its optimisations
  (full_rewrite_to_sink in tinygrad/codegen/__init__.py), then apply_opts' first step. Plans name axes of these ranges."""
  sink = graph_rewrite(graph_rewrite(sink, multi_pm), pm_mops, bottom_up=True)
  sink = graph_rewrite(graph_rewrite(sink, pm_load_collapse), pm_split_ranges + pm_flatten_range, ctx={})
  sink = graph_rewrite(graph_rewrite(sink, sym + pm_flatten_range), pm_flatten_range + pm_simplify_ranges, ctx={})
  k = Scheduler(sink, renderer)
  k.convert_loop_to_global()
  return k

def kernel_plan(sink: UOp, renderer: Renderer, plan: Callable[[MatmulKernel], Sequence[KernelOpt] | None]) -> list[Opt] | None:
  """tinygrad's options for kernel `sink` (its AST) that `plan` chooses, or None when the kernel is no matmul (one ADD
  reduction, two output axes, lengths known) or the plan chooses none."""
  k = _scheduler(sink, renderer)
  if k.reduceop is None or k.reduceop.arg[0] is not Ops.ADD: return None
  outs, reds = k.upcastable_dims, k.unrollable_dims
  if len(outs) != 2 or len(reds) != 1 or not all(isinstance(k.full_shape[a], int) for a in outs + reds): return None
  contiguous = next((i for i in (1, 0) if _contiguous_in_an_input(k, outs[i])), None)
  if (opts := plan(MatmulKernel((k.full_shape[outs[0]], k.full_shape[outs[1]]), k.full_shape[reds[0]], contiguous))) is None:
    return None
  return [Opt(OptOps.UPCAST, outs[o.axis], o.amount) if o.kind == "upcast" else Opt(OptOps.UNROLL, o.axis, o.amount)
          for o in opts]

@functools.lru_cache(maxsize=4096)  # distinct kernels of the steps a process captures; the programs stay in tinygrad's cache
def planned_kernel(sink: UOp, renderer: Renderer, shapes: KernelShapes) -> UOp:
  """`sink` (a kernel's AST) carrying its plan as opts_to_apply (which tinygrad applies instead of its hand-coded
  heuristic, in compile workers too), and compiled with it right away (so a plan tinygrad rejects never reaches a step;
  the program is cached for the step); `sink` itself when it has no plan, has options already, or anything fails
  (tinygrad's heuristic then decides). The options are part of the kernel, so its program is cached apart from the
  heuristic's."""
  if sink.tag is not None or not isinstance(sink.arg, KernelInfo) or sink.arg.opts_to_apply is not None or sink.arg.applied_opts:
    return sink
  if sum(u.op is Ops.REDUCE for u in sink.toposort()) != 1: return sink  # not a matmul: spare the rewrites below
  try:
    if (plan := kernel_plan(sink, renderer, shapes.plan)) is None: return sink
    planned = sink.replace(arg=dataclasses.replace(sink.arg, opts_to_apply=tuple(plan)))
    to_program(planned, renderer)
  except KernelOptError: return sink  # this kernel cannot take the plan
  except Exception as e:  # e.g. a tinygrad change: compile with its own heuristic rather than fail the step
    warnings.warn(f"tinylora: kernel shape not applied ({type(e).__name__}: {e}); using tinygrad's heuristic")
    return sink
  return planned

def _renderer(call: UOp) -> Renderer: return Device[call.device if isinstance(call.device, str) else call.device[0]].renderer

def planned_schedule(linear: UOp, shapes: KernelShapes) -> UOp:
  """A schedule (LINEAR of kernel CALLs) with every kernel for one of shapes.devices through `planned_kernel`. Nothing
  is planned while a BEAM search or NOOPT is asked for: the user's choice wins."""
  if BEAM.value or getenv("JITBEAM") or NOOPT: return linear
  def plan(call: UOp) -> UOp:
    if call.op is not Ops.CALL or call.src[0].op is not Ops.SINK: return call
    if (renderer := _renderer(call)).target.device not in shapes.devices: return call
    sink = planned_kernel(call.src[0], renderer, shapes)
    return call if sink is call.src[0] else call.replace(src=(sink, *call.src[1:]))
  return linear.replace(src=tuple(plan(c) for c in linear.src))

class _Planner:
  """At the head of tinygrad's `capturing` list (where a TinyJit collects the schedules of the call it captures), plans
  each schedule and compiles it through the disk cache (`compiled`), then hands it to the TinyJit capturing this call
  or, outside a capture, runs it as Tensor.realize would."""
  def __init__(self, jit: Any | None, shapes: KernelShapes): self.jit, self.shapes = jit, shapes
  def add_linear(self, linear: UOp, var_vals: dict[str, int]) -> None:
    if self.jit is not None: self.jit.add_linear(compiled(planned_schedule(linear, self.shapes)), var_vals)
    else: run_linear(compiled(planned_schedule(linear, self.shapes)), var_vals)

@contextlib.contextmanager
def kernel_shapes(shapes: KernelShapes) -> Iterator[None]:
  """Inside this block, kernels that Tensor.realize schedules carry `shapes` (see `planned_kernel`); when it ends, in
  any way, tinygrad schedules as before. No tensor data can be read inside (as in a TinyJit capture)."""
  planner = _Planner(capturing[0] if capturing else None, shapes)
  capturing.insert(0, planner)
  try: yield
  finally: capturing.remove(planner)

def captured_jit(step: Callable[..., Any], shapes: KernelShapes) -> TinyJit:
  """`step` as a TinyJit that captures on its first call: the kernels are scheduled and compiled once (TinyJit's usual
  eager first call would schedule them a second time) and the first call runs on the capture's memory plan. The eager
  call exists to realize one-time work, such as lazy weights, outside the capture, so every tensor the step reads must
  be realized before the first call. Kernels carry `shapes` (`kernel_shapes`); a step that realizes through `realize`
  and every kernel come from the disk cache where an earlier process scheduled and compiled them."""
  jit = TinyJit(kernel_shapes(shapes)(step))
  jit.cnt = 1  # TinyJit's call 0 runs eagerly, call 1 captures, later calls replay
  return jit

# ---- stored schedules and programs

# Schedules and compiled kernels kept across processes. tinygrad stores compiler binaries in its disk cache (CACHEDB)
# but schedules every step again in each process (rangeify: Python) and lowers every kernel again (range rewrites,
# linearizing, rendering: Python); its schedules and lowered programs live only in memory, and together they were most
# of a first train step on a CPU. Here the schedules and kernels of tinylora's TinyJit'd steps (`captured_jit`) are
# stored in tinygrad's disk cache, and read back by later processes into tinygrad's in-memory caches, under the keys
# tinygrad itself uses there. CACHELEVEL=0 turns this off with the rest of tinygrad's disk cache, SCACHE=0 the
# schedules with tinygrad's own schedule cache; a BEAM search (BEAM, JITBEAM) compiles as usual.

TABLE, SCHEDULES, TINYGRAD = "tinylora_program", "tinylora_schedule", importlib.metadata.version("tinygrad")

def schedule_key(function: UOp) -> str:
  """A content hash of `function` (what Tensor.realize schedules) that is the same in every process: tinygrad's UOp.key,
  except that a custom gradient counts by its name, not by its address in memory (tinygrad's key holds CallInfo's repr,
  with id(grad_fxn); the gradient is already part of the graph when it is scheduled), plus tinygrad's version and
  settings (ContextVars), which the scheduler reads."""
  keys: dict[UOp, bytes] = {}
  for u in function.toposort():
    arg = u.arg
    if isinstance(arg, CallInfo): arg = (getattr(arg.grad_fxn, "__qualname__", None), arg.name, arg.precompile, arg.precompile_backward, arg.aux)
    keys[u] = hashlib.sha256(str((u.op, u.dtype, arg)).encode() + b"".join(keys[s] for s in u.src)).digest()
  settings = sorted((name, var.value) for name, var in ContextVar._cache.items())
  return hashlib.sha256(repr((TINYGRAD, settings)).encode() + keys[function]).hexdigest()

def _bodies(function: UOp, schedule: Callable[[UOp, bytes], UOp | None]) -> None:
  """Calls schedule(body, key) for each function body tinygrad's scheduler lowers when it realizes `function` (each SINK
  that is not a kernel: the bodies of precompiled tinygrad functions, inner ones first, then `function`), with the key
  tinygrad caches that body's schedule under, until one returns None. tinygrad lowers inner bodies first and keys an
  outer one with their schedules in place, so an outer key is known once the inner schedules are."""
  done: dict[UOp, UOp] = {}
  for body in function.toposort():
    if body.op is not Ops.SINK or isinstance(body.arg, KernelInfo): continue
    if (linear := schedule(body, body.substitute(done, enter_calls=True).key)) is None: return
    done[body] = linear

def realize(first: Tensor, *rest: Tensor) -> Tensor:
  """Tensor.realize(first, *rest), whose schedules are read from the disk cache where an earlier process scheduled the
  same graph, and stored there otherwise. The graph is converted to tinygrad's scheduling function once more here to
  learn its keys; what is read goes into tinygrad's schedule cache, where Tensor.realize finds it."""
  if not SCACHE: return first.realize(*rest)
  todo = [t for t in (first, *rest) if not t.uop.is_virtual and not t.uop.has_buffer_identity()]  # Tensor.realize's predicate
  if not todo: return first
  function, known = transform_to_call(UOp.sink(*[t.uop for t in todo]))[0].src[0], set()
  disk_key = functools.cache(schedule_key)  # a body missing on disk is hashed once, to read and then to store
  def read(body: UOp, key: bytes) -> UOp | None:
    if (linear := schedule_cache.get(key)) is None and (linear := diskcache_get(SCHEDULES, disk_key(body))) is not None:
      schedule_cache[key] = linear
    if linear is not None: known.add(body)
    return linear
  def store(body: UOp, key: bytes) -> UOp | None:
    if (linear := schedule_cache.get(key)) is not None and body not in known: diskcache_put(SCHEDULES, disk_key(body), linear)
    return linear
  _bodies(function, read)
  Tensor.realize(*todo)
  _bodies(function, store)
  return first

def _disk_key(key: tuple) -> str:
  """tinygrad's program key (the kernel's content hash, the renderer's class and target, the settings that change code)
  and tinygrad's version, as a string."""
  ast_key, renderer_type, *rest = key
  return hashlib.sha256(repr((TINYGRAD, ast_key.hex(), renderer_type.__module__, renderer_type.__qualname__, *rest)).encode()).hexdigest()

def stored(ast: UOp, renderer: Renderer) -> UOp | None:
  """The compiled PROGRAM of kernel `ast` if this process or an earlier one has compiled it, else None. One read from
  disk goes into tinygrad's in-memory program cache, where tinygrad would have put the same program."""
  key = to_program_key(ast, renderer)
  if (prg := to_program_cache.get(key)) is None and (prg := diskcache_get(TABLE, _disk_key(key))) is not None:
    to_program_cache[key] = prg
  return prg

def to_program(ast: UOp, renderer: Renderer) -> UOp:
  """tinygrad's to_program (lowered and compiled), through the disk cache."""
  if (prg := stored(ast, renderer)) is None: prg = diskcache_put(TABLE, _disk_key(to_program_key(ast, renderer)), lower(ast, renderer))
  return prg

def compiled(linear: UOp) -> UOp:
  """A schedule (LINEAR of kernel CALLs) with every kernel compiled: read from the disk cache, or lowered and compiled by
  tinygrad (in its worker pool) and stored. A TinyJit capturing it then has nothing left to compile."""
  if BEAM.value or getenv("JITBEAM"): return linear
  keys = {c: to_program_key(c.src[0], _renderer(c)) for c in linear.src if c.op is Ops.CALL and c.src[0].op is Ops.SINK}
  known = {c: prg for c in keys if (prg := stored(c.src[0], _renderer(c))) is not None}
  after = lower_and_compile(linear.replace(src=tuple(c.replace(src=(known[c], *c.src[1:])) if c in known else c for c in linear.src)))
  new = {keys[c]: a.src[0] for c, a in zip(linear.src, after.src) if c in keys and c not in known}  # one per kernel
  for key, prg in new.items(): diskcache_put(TABLE, _disk_key(key), prg)
  return after

# ---- measurement

@dataclass
class Peak:
  start: int    # bytes tinygrad held allocated when the block began (GlobalCounters.mem_used)
  peak: int     # the most it held at any moment inside the block
  largest: int  # the largest single buffer allocated inside the block

  @property
  def added(self) -> int: return self.peak - self.start

@contextlib.contextmanager
def peak_memory() -> Iterator[Peak]:
  """Yields a Peak kept up to date while the block runs: how much memory tinygrad allocates over it, the one tracker the
  benchmarks and tests use. tinygrad counts allocated bytes but keeps no high-water mark, so Buffer.allocate is wrapped
  for the block only (restored when it ends, in any way)."""
  p, allocate = Peak(GlobalCounters.mem_used, GlobalCounters.mem_used, 0), Buffer.allocate
  def tracked(self: Buffer, *args, **kwargs) -> Buffer:
    ret = allocate(self, *args, **kwargs)
    p.peak, p.largest = max(p.peak, GlobalCounters.mem_used), max(p.largest, self.nbytes)
    return ret
  Buffer.allocate = tracked
  try: yield p
  finally: Buffer.allocate = allocate

def captured_copy_bytes(jit: TinyJit) -> int | None:
  """Bytes one call of the captured TinyJit `jit` copies between devices, all devices together, copies batched into
  device graphs included; None before it captured, and under HCQ2=1, whose compiled command queues do not show their
  copies."""
  def calls(linear: UOp) -> Iterator[UOp]:  # in order, repeats kept; a device graph's calls are its LINEAR's
    for c in linear.src:
      if c.src[0].op is Ops.CUSTOM_FUNCTION and c.src[0].arg == "graph": yield from calls(c.src[0].src[0])
      else: yield c
  if jit.captured is None: return None
  step = list(calls(jit.captured._linear))
  if any(c.src[0].op is Ops.CUSTOM_FUNCTION and c.src[0].arg == "hcq" for c in step): return None
  return sum(math.prod(c.src[1].shape) * c.src[1].dtype.itemsize for c in step if c.src[0].op is Ops.COPY)

# ---- devices

def clang_command(device: str, cc: str | None = None) -> list[str] | None:
  """The command with which tinygrad's compiler for `device` compiles C read from stdin, output flags left off: the
  compiler it runs ($CC, default clang) or `cc`. None when `device` does not compile C with clang."""
  compiler = Device[device].compiler
  if not isinstance(compiler, ClangCompiler): return None
  return [cc or getenv("CC", "clang"), "-c", "-x", "c", "-O2", "-ffreestanding", "-nostdlib",
          f"--target={compiler.arch}-none-unknown-elf", *compiler.args, "-"]
