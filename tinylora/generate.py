"""Autoregressive generation with a KV cache: one prefill call over the prompt, then a TinyJit'd one-token decode step
whose position is a bound Variable, so every step after the second replays the same kernels.

A LoRA-injected model generates with its adapters unmerged: the forward calls each LoraLinear wrapper as it is when
`generate` starts (the jitted step is rebuilt per call, so enabling, disabling or merging between calls is honoured).
"""
from __future__ import annotations
from typing import Iterable
import numpy as np
from tinygrad import Tensor, TinyJit, UOp
from tinylora.errors import LoraError
from tinylora.models.llama import Model

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
  """A KV cache of `max_len` positions and a TinyJit'd one-token decode step for one model, batch 1."""
  def __init__(self, model: Model, max_len: int):
    if max_len < 2: raise LoraError(f"a decoder needs room for at least 2 positions, found max_len={max_len}")
    self.model, self.cache = model, model.make_cache(1, max_len)
    self.pos = UOp.variable("start_pos", 1, max_len - 1)
    self.jit = TinyJit(self._step)

  def _step(self, token: Tensor, start_pos: UOp) -> Tensor: return self.model(token, start_pos, self.cache)[0, -1].realize()

  def prefill(self, tokens: list[int]) -> np.ndarray:
    """Caches the prompt at positions [0, len(tokens)) and returns the logits that follow it."""
    return self.model(Tensor([tokens]), 0, self.cache)[0, -1].numpy()

  def step(self, token: int, pos: int) -> np.ndarray:
    """Caches `token` at position `pos` (after everything before it is cached) and returns the next logits."""
    return self.jit(Tensor([[token]]), self.pos.bind(pos)).numpy()

def generate(model: Model, tokens: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: Iterable[int] = (), seed: int | None = None) -> list[int]:
  """Returns up to `max_new_tokens` new tokens following `tokens` (the prompt is not repeated). Generation stops early
  at the first token in `stop_tokens`, which is not included. `seed` makes sampling reproducible."""
  if not tokens: raise LoraError("generate needs at least one prompt token")
  if max_new_tokens < 0: raise LoraError(f"max_new_tokens must be >= 0, found {max_new_tokens}")
  if temperature < 0: raise LoraError(f"temperature must be >= 0, found {temperature}")
  if not 0 < top_p <= 1: raise LoraError(f"top_p must be in (0, 1], found {top_p}")
  if (bad := [t for t in tokens if not 0 <= t < model.config.vocab_size]):
    raise LoraError(f"prompt token {bad[0]} is outside the vocabulary of {model.config.vocab_size}")
  if max_new_tokens == 0: return []
  stop, rng = set(stop_tokens), np.random.default_rng(seed)
  decoder = Decoder(model, len(tokens) + max_new_tokens)
  logits, out = decoder.prefill(tokens), []
  for i in range(max_new_tokens):
    token = sample(logits, temperature, top_p, rng)
    if token in stop: break
    out.append(token)
    if i + 1 < max_new_tokens: logits = decoder.step(token, len(tokens) + i)
  return out
