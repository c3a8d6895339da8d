"""Continuous batching: up to `rows` sequences decode together, each at its own position and with its own adapter (or
none), joining and leaving between steps. Two TinyJit'd steps serve every request: `prefill` writes a chunk of one
row's prompt into the KV cache (row, start position and which adapter are data or bound Variables) and `decode` adds
one token to every row (positions and adapters are data). So the compiled shapes are two, whatever the batch's mix of
lengths and adapters; the steps are captured again only when the model's adapters change (load, delete).
"""
from __future__ import annotations
import numpy as np
from tinygrad import Tensor, UOp
from tinylora.device_policy import captured_step
from tinylora.engine import realize
from tinylora.errors import LoraError
from tinylora.generate import module_state
from tinylora.lora import BASE, list_adapters, routed_rows
from tinylora.models.decoder import Model, RowPositions

class BatchDecoder:
  """A KV cache of `rows` sequences of up to `max_len` positions and the two steps that fill it. A row is free or
  holds one sequence; `prefill` and `decode` say which row and where, the caller keeps track of its rows."""
  def __init__(self, model: Model, rows: int = 8, max_len: int = 2048, chunk: int = 32):
    if rows < 1 or chunk < 1 or max_len < 2: raise LoraError(f"a batch decoder needs rows >= 1, chunk >= 1, max_len >= 2: {rows}, {chunk}, {max_len}")
    if max_len > (limit := model.config.max_position_embeddings):
      raise LoraError(f"max_len {max_len} is beyond the model's max_position_embeddings {limit}")
    self.model, self.rows, self.max_len, self.chunk = model, rows, max_len, chunk
    # room past max_len for a last prompt chunk's padding; an idle row sits at position max_len, where nothing is read
    self.cache = model.make_cache(rows, max_len + chunk)
    self.row, self.start = UOp.variable("row", 0, rows - 1), UOp.variable("start", 0, max_len - 1)
    self.end = UOp.variable("end", 1, max_len)
    self.state: tuple | None = None

  def _steps(self) -> None:
    """(Re)captures both steps when the model's modules or adapters changed since they were captured."""
    if self.state == (state := (module_state(self.model), tuple(list_adapters(self.model)))): return
    self.state, self.adapters = state, state[1]
    model, cache, adapters = self.model, self.cache, self.adapters

    def routed(routing: Tensor):  # routing (adapters, B): 1 where row b uses that adapter
      return routed_rows(model, {n: routing[i].reshape(-1, 1, 1) for i, n in enumerate(adapters)})

    def prefill(tokens: Tensor, pick: Tensor, routing: Tensor, row: UOp, start: UOp) -> Tensor:
      with routed(routing):  # tokens (1, chunk) at positions [start, start+chunk) of row `row`; pick (1, chunk, 1)
        hidden = model.hidden(tokens, start, cache.row(row))
        return realize(model.logits((hidden * pick).sum(1)))  # (1, vocab): the logits after the picked position
    def decode(tokens: Tensor, positions: Tensor, routing: Tensor, end: UOp) -> Tensor:
      with routed(routing):  # tokens (rows, 1), row b's token at positions[b]
        return realize(model(tokens, RowPositions(positions, end), cache)[:, -1])
    self._prefill, self._decode = captured_step(prefill), captured_step(decode)

  def warm_up(self, row: int) -> None:
    """Captures (compiles) both steps now, using free row `row`, so that the next request does not wait for them."""
    self.prefill(row, [0], 0)
    self.decode({row: (0, 1, BASE)})

  def _routing(self, adapters: list[str]) -> Tensor:
    """(adapters of the model, rows): 1 where the row uses that adapter (a row of zeros for a model without any)."""
    if unknown := sorted({a for a in adapters if a != BASE and a not in self.adapters}):
      raise LoraError(f"unknown adapter(s) {unknown}; the model has {list(self.adapters) or 'none'} (and {BASE!r} for the base)")
    return Tensor(np.array([[float(a == n) for a in adapters] for n in self.adapters] or [[0.0] * len(adapters)], dtype=np.float32))

  def prefill(self, row: int, tokens: list[int], start: int, adapter: str = BASE) -> np.ndarray:
    """Caches `tokens` (at most `chunk`) at positions [start, start+len) of row `row` and returns the logits (vocab,)
    after the last of them. Positions past them are written with padding, which later tokens overwrite before any
    step reads them."""
    if not 0 <= row < self.rows or not 1 <= len(tokens) <= self.chunk or not 0 <= start or start + len(tokens) > self.max_len:
      raise LoraError(f"prefill of {len(tokens)} token(s) at {start} in row {row} does not fit {self.rows} rows of "
                      f"{self.max_len} positions in chunks of at most {self.chunk}")
    self._steps()
    pick = np.zeros((1, self.chunk, 1), np.float32)
    pick[0, len(tokens) - 1] = 1
    padded = Tensor([tokens + [0] * (self.chunk - len(tokens))])
    return self._prefill(padded, Tensor(pick), self._routing([adapter]), self.row.bind(row), self.start.bind(start)).numpy()[0]

  def decode(self, tokens: dict[int, tuple[int, int, str]]) -> dict[int, np.ndarray]:
    """One step for the rows in `tokens` (row -> (token, position, adapter)): caches each token at its row's position
    and returns each row's next logits (vocab,). The other rows are left as they are."""
    if not tokens: return {}
    if bad := [(r, p) for r, (_, p, _) in tokens.items() if not 0 <= r < self.rows or not 0 <= p < self.max_len]:
      raise LoraError(f"decode rows and positions {bad} do not fit {self.rows} rows of {self.max_len} positions")
    self._steps()
    ids, positions, adapters = [0] * self.rows, [self.max_len] * self.rows, [BASE] * self.rows
    for r, (token, pos, adapter) in tokens.items(): ids[r], positions[r], adapters[r] = token, pos, adapter
    end = 1 + max(p for _, p, _ in tokens.values())
    logits = self._decode(Tensor([[t] for t in ids]), Tensor(positions), self._routing(adapters), self.end.bind(end)).numpy()
    return {r: logits[r] for r in tokens}
