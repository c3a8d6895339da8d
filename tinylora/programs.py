"""Compiled kernels kept across processes. tinygrad stores compiler binaries in its disk cache (CACHEDB) but lowers
every kernel again in each process (range rewrites, linearizing, rendering: Python, and most of a first train step on a
CPU); its lowered programs live only in memory. Here the kernels of the Trainer's steps are stored lowered and compiled
in tinygrad's disk cache, under tinygrad's own program key plus its version, and read back by later processes into
tinygrad's in-memory program cache.
CACHELEVEL=0 turns this off with the rest of tinygrad's disk cache; a BEAM search (BEAM, JITBEAM) compiles as usual."""
from __future__ import annotations
import hashlib, importlib.metadata
from tinygrad import Device, UOp
from tinygrad.codegen import to_program_cache, to_program_key, to_program as lower
from tinygrad.engine.realize import lower_and_compile
from tinygrad.helpers import BEAM, diskcache_get, diskcache_put, getenv
from tinygrad.renderer import Renderer
from tinygrad.uop.ops import Ops

TABLE, TINYGRAD = "tinylora_program", importlib.metadata.version("tinygrad")

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
