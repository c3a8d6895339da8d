"""Schedules and compiled kernels kept across processes. tinygrad stores compiler binaries in its disk cache (CACHEDB)
but schedules every step again in each process (rangeify: Python) and lowers every kernel again (range rewrites,
linearizing, rendering: Python); its schedules and lowered programs live only in memory, and together they were most of
a first train step on a CPU. Here the schedules and kernels of tinylora's TinyJit'd steps (device_policy.captured_jit:
the Trainer's, generate's decode step) are stored in tinygrad's disk cache, and read back by later processes into
tinygrad's in-memory caches, under the keys tinygrad itself uses there.
CACHELEVEL=0 turns this off with the rest of tinygrad's disk cache, SCACHE=0 the schedules with tinygrad's own schedule
cache; a BEAM search (BEAM, JITBEAM) compiles as usual."""
from __future__ import annotations
import functools, hashlib, importlib.metadata
from typing import Callable
from tinygrad import Device, Tensor, UOp
from tinygrad.codegen import to_program_cache, to_program_key, to_program as lower
from tinygrad.engine.realize import lower_and_compile
from tinygrad.helpers import BEAM, SCACHE, ContextVar, diskcache_get, diskcache_put, getenv
from tinygrad.renderer import Renderer
from tinygrad.schedule import schedule_cache
from tinygrad.tensor import transform_to_call
from tinygrad.uop.ops import CallInfo, KernelInfo, Ops

TABLE, SCHEDULES, TINYGRAD = "tinylora_program", "tinylora_schedule", importlib.metadata.version("tinygrad")

# ---- schedules

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

# ---- compiled kernels

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
  def renderer(c: UOp) -> Renderer: return Device[c.device if isinstance(c.device, str) else c.device[0]].renderer
  keys = {c: to_program_key(c.src[0], renderer(c)) for c in linear.src if c.op is Ops.CALL and c.src[0].op is Ops.SINK}
  known = {c: prg for c in keys if (prg := stored(c.src[0], renderer(c))) is not None}
  after = lower_and_compile(linear.replace(src=tuple(c.replace(src=(known[c], *c.src[1:])) if c in known else c for c in linear.src)))
  new = {keys[c]: a.src[0] for c, a in zip(linear.src, after.src) if c in keys and c not in known}  # one per kernel
  for key, prg in new.items(): diskcache_put(TABLE, _disk_key(key), prg)
  return after
