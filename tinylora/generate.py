"""Autoregressive generation with a KV cache and a TinyJit'd one-token step whose position is a bound Variable.

Each model keeps its recently used decoders (cache + jitted step, one per batch size and adapter set, at most
DECODERS_PER_MODEL) between calls, and prompts are fed through that same step one token at a time, so every prompt
length and every call replays the same kernels instead of compiling a prefill graph per prompt length and a new step
per call. With `cache_prompt=True` a prompt prefix the cache already holds is not computed again. The decoder is
rebuilt when the model's modules change (injection, merge, unload, enabling or disabling adapters) or a longer sequence
is asked for: a LoRA-injected model generates with its adapters as they are when `generate` is called.
"""
from __future__ import annotations
from collections import OrderedDict
from typing import Callable, Iterable, Iterator
import contextlib, weakref
import numpy as np
from tinygrad import Tensor, UOp
from tinylora.device_policy import captured_step
from tinylora.engine import realize
from tinylora.errors import LoraError
from tinylora.lora import mixed_batch
from tinylora.models.decoder import KVCache, Model
from tinylora.tree import named_modules

def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
  """Greedy when temperature is 0, else a draw from softmax(logits / temperature) restricted to the smallest set of
  tokens whose probability reaches top_p (nucleus sampling)."""
  if temperature == 0: return int(np.argmax(logits))
  p = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
  p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-p, kind="stable")
    p[order[int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1:]] = 0
    p /= p.sum()
  return int(rng.choice(len(p), p=p))

class Decoder:
  """A KV cache of `max_len` positions for `rows` sequences and a TinyJit'd one-token decode step for one model. With
  `adapter_names` (one name per row) each row runs its own adapter (a mixed batch, see tinylora.mixed_batch)."""
  def __init__(self, model: Model, max_len: int, rows: int = 1, adapter_names: tuple[str, ...] | None = None):
    if max_len < 2: raise LoraError(f"a decoder needs room for at least 2 positions, found max_len={max_len}")
    # a weak reference: the decoder is kept in a WeakKeyDictionary keyed by the model, which it must not keep alive
    self.model, self.max_len = weakref.ref(model), max_len
    self.cache = model.make_cache(len(adapter_names) if adapter_names else rows, max_len)
    self.pos = UOp.variable("start_pos", 0, max_len - 1)
    self.jit = captured_step(_decode_step(self.model, self.cache, adapter_names))
    self.state, self.tokens = module_state(model), []  # the tokens whose keys and values the cache holds, by position

  def prefill(self, tokens: list[int]) -> np.ndarray:
    """Caches the prompt at positions [0, len(tokens)) and returns the logits that follow it. Positions whose tokens
    the cache already holds (a prefix shared with the previous sequence, e.g. a system prompt) are not computed again."""
    start = next((i for i, (a, b) in enumerate(zip(tokens, self.tokens)) if a != b), min(len(tokens), len(self.tokens)))
    for pos in range(min(start, len(tokens) - 1), len(tokens)): logits = self.step(tokens[pos], pos)
    return logits

  def step(self, token: int, pos: int) -> np.ndarray:
    """Caches `token` at position `pos` (after everything before it is cached) and returns the next logits."""
    if pos > len(self.tokens): raise LoraError(f"position {pos} follows uncached positions {len(self.tokens)}..{pos - 1}")
    self.tokens[pos:] = [token]
    return self.step_rows([token], pos)[0]

  def step_rows(self, tokens: list[int], pos: int) -> np.ndarray:
    """Caches one token per row at position `pos` and returns each row's next logits (rows, vocab)."""
    return self.jit(Tensor([[t] for t in tokens]), self.pos.bind(pos)).numpy()

def _decode_step(model: weakref.ref[Model], cache: KVCache, adapter_names: tuple[str, ...] | None) -> Callable:
  """The one-token step a Decoder captures. It holds no reference to the Decoder, so a dropped Decoder is freed at once
  with its KV cache and captured kernels, not at the next cycle collection."""
  def step(tokens: Tensor, start_pos: UOp) -> Tensor:
    m = model()
    with mixed_batch(m, list(adapter_names), len(adapter_names)) if adapter_names else contextlib.nullcontext():
      return realize(m(tokens, start_pos, cache)[:, -1])
  return step

def module_state(model: Model) -> tuple:
  """What a captured decode step depends on besides tensor values: which modules sit where, and their adapter flags."""
  return tuple((path, id(m), *(getattr(m, a, None) for a in ("merged", "enabled", "active"))) for path, m, _, _ in named_modules(model))

DECODERS_PER_MODEL = 4  # decoders kept per model; each holds a KV cache and a captured step
_decoders: weakref.WeakKeyDictionary[Model, OrderedDict[tuple, Decoder]] = weakref.WeakKeyDictionary()

def decoder_for(model: Model, length: int, rows: int = 1, adapter_names: tuple[str, ...] | None = None) -> Decoder:
  """The model's decoder (one per batch size and adapter_names), rebuilt if the model changed or `length` positions do
  not fit (sizes grow by powers of two, at least 256, at most the model's max_position_embeddings). The model keeps its
  DECODERS_PER_MODEL most recently used decoders; an older one is dropped with its KV cache (and rebuilt if asked again)."""
  decoders = _decoders.setdefault(model, OrderedDict())
  decoder = decoders.get(key := (rows, adapter_names))
  if decoder is None or decoder.max_len < length or decoder.state != module_state(model):
    size = max(length, min(max(256, 1 << (length - 1).bit_length()), model.config.max_position_embeddings))
    decoder = decoders[key] = Decoder(model, size, rows, adapter_names)
  decoders.move_to_end(key)
  while len(decoders) > DECODERS_PER_MODEL: decoders.popitem(last=False)
  return decoder

def _check(model: Model, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> None:
  if max_new_tokens < 0: raise LoraError(f"max_new_tokens must be >= 0, found {max_new_tokens}")
  if temperature < 0: raise LoraError(f"temperature must be >= 0, found {temperature}")
  if not 0 < top_p <= 1: raise LoraError(f"top_p must be in (0, 1], found {top_p}")
  for prompt in prompts:
    if not prompt: raise LoraError("generate needs at least one prompt token")
    if (bad := [t for t in prompt if not 0 <= t < model.config.vocab_size]):
      raise LoraError(f"prompt token {bad[0]} is outside the vocabulary of {model.config.vocab_size}")

def stream_generate(model: Model, tokens: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    stop_tokens: Iterable[int] = (), seed: int | None = None, cache_prompt: bool = False) -> Iterator[int]:
  """`generate` of one prompt, yielding each new token as soon as it is sampled (the arguments are checked at once)."""
  _check(model, [tokens], max_new_tokens, temperature, top_p)
  return _stream(model, tokens, max_new_tokens, temperature, top_p, set(stop_tokens), np.random.default_rng(seed), cache_prompt)

def _stream(model: Model, tokens: list[int], max_new_tokens: int, temperature: float, top_p: float, stop: set[int],
            rng: np.random.Generator, cache_prompt: bool) -> Iterator[int]:
  if max_new_tokens == 0: return
  decoder = decoder_for(model, len(tokens) + max_new_tokens)
  if not cache_prompt: decoder.tokens = []
  logits = decoder.prefill(tokens)
  for i in range(max_new_tokens):
    token = sample(logits, temperature, top_p, rng)
    if token in stop: return
    yield token
    if i + 1 < max_new_tokens: logits = decoder.step(token, len(tokens) + i)

def generate(model: Model, tokens: list[int] | list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: int | None = None,
             adapter_names: list[str] | None = None, cache_prompt: bool = False) -> list[int] | list[list[int]]:
  """Returns up to `max_new_tokens` new tokens following `tokens` (the prompt is not repeated). Generation stops early
  at the first token in `stop_tokens`, which is not included. `seed` makes sampling reproducible. `cache_prompt=True`
  reuses the keys and values the previous call left for a shared prompt prefix (e.g. a system prompt): only valid while
  no weight changed since that call (training, merging, loading), which the decoder cannot see.
  `tokens` may be a list of prompts (of any lengths): they decode together, one batch row each, and the result is one
  list of new tokens per row (the rows sit at the same positions, each fed its own prompt and then its own samples).
  With `adapter_names` (one adapter name per prompt, "__base__" for none) every row decodes with its own adapter in
  that same batched pass."""
  batched = isinstance(tokens, list) and bool(tokens) and isinstance(tokens[0], list)
  prompts = tokens if batched else [tokens]
  if adapter_names is not None and (not batched or len(tokens) != len(adapter_names)):
    raise LoraError(f"with adapter_names, tokens must be a list of {len(adapter_names)} prompt(s), one per adapter name")
  if batched and not all(isinstance(p, list) for p in prompts):
    raise LoraError("tokens must be one prompt (a list of token ids) or a list of prompts, not a mix")
  _check(model, prompts, max_new_tokens, temperature, top_p)
  stop, rng = set(stop_tokens), np.random.default_rng(seed)
  if not batched: return list(_stream(model, tokens, max_new_tokens, temperature, top_p, stop, rng, cache_prompt))
  decoder = decoder_for(model, max(map(len, prompts)) + max_new_tokens, len(prompts), adapter_names and tuple(adapter_names))
  outs, done = [[] for _ in prompts], [max_new_tokens == 0] * len(prompts)
  fed = [p[0] for p in prompts]
  for pos in range(max(map(len, prompts)) + max_new_tokens - 1):
    if all(done): break
    logits = decoder.step_rows(fed, pos)
    for r, prompt in enumerate(prompts):
      if pos + 1 < len(prompt): fed[r] = prompt[pos + 1]
      elif not done[r]:
        token = sample(logits[r], temperature, top_p, rng)
        if token in stop: done[r] = True
        else: outs[r].append(token)
        done[r] = done[r] or len(outs[r]) == max_new_tokens
        fed[r] = token
  return outs
