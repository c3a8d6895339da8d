"""Walking and editing a model's object tree the way nn.state.get_state_dict names it (attributes, lists, dicts)."""
from __future__ import annotations
from typing import Any, Iterator, Mapping
from tinygrad import Tensor, nn

def named_modules(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any, Any]]:
  """Yields (dotted path, module, parent container, key in parent) for every object below `obj` that is not a Tensor
  or a plain value, each once, parents before children."""
  seen: set[int] = set()
  def walk(o: Any, path: str) -> Iterator[tuple[str, Any, Any, Any]]:
    children = o.__dict__ if hasattr(o, "__dict__") else o if isinstance(o, dict) else \
               dict(enumerate(o)) if isinstance(o, list) else {}
    for k, v in list(children.items()):
      if isinstance(v, (Tensor, str, bytes, int, float, bool, type(None))) or id(v) in seen: continue
      seen.add(id(v))
      child = f"{path}.{k}" if path else str(k)
      yield child, v, o, k
      yield from walk(v, child)
  yield from walk(obj, prefix)

class FrozenMapping(Mapping):
  """A read-only mapping that the tree walks (nn.state.get_state_dict, named_modules) do not descend into, for metadata
  an object carries beside its tensors (a GGUF's tokenizer vocabulary: tens of thousands of strings); unlike
  types.MappingProxyType it copies and pickles with the object."""
  __slots__ = ("_items",)
  def __init__(self, items: Mapping[str, Any] | None = None): self._items = dict(items or {})
  def __getitem__(self, key: str) -> Any: return self._items[key]
  def __iter__(self) -> Iterator[str]: return iter(self._items)
  def __len__(self) -> int: return len(self._items)
  def __repr__(self) -> str: return f"FrozenMapping({len(self._items)} keys)"

def replace_module(parent: Any, key: Any, value: Any) -> None:
  if isinstance(parent, (list, dict)): parent[key] = value
  else: setattr(parent, key, value)

def unique_state_dict(obj: Any) -> dict[str, Tensor]:
  """nn.state.get_state_dict(obj) with each tensor once, under its first name: a tensor shared by two modules (a tied
  lm_head, plain or quantized) is stored and counted once."""
  state: dict[str, Tensor] = {}
  seen: set[int] = set()
  for key, t in nn.state.get_state_dict(obj).items():
    if id(t) not in seen: state[key] = t
    seen.add(id(t))
  return state
