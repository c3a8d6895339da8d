"""llama.cpp LoRA adapter files (convert_lora_to_gguf.py's format, loaded with `--lora`): one `.gguf` of general.type
adapter with tensors `<gguf name>.lora_a` (r, in) and `.lora_b` (out, r) in float32, llama's Q/K rows permuted on B,
and adapter.lora.alpha."""
from __future__ import annotations
import pathlib
from typing import Any
import numpy as np
from tinylora.config import LoraConfig
from tinylora.errors import LoraError
from tinylora.formats.common import finite_arrays
from tinylora.formats.gguf import gguf_name, permute_qk, qk_heads, writer
from tinylora.lora import Adapter

FILE_NAME = "adapter.gguf"  # the file's name when saved into an output directory (tinylora train --format gguf)

def write(model: Any, layers: dict[str, Adapter], config: LoraConfig, path: pathlib.Path) -> None:
  """Writes the adapters as one llama.cpp LoRA file `path`, atomically, with adapter.lora.alpha such that llama.cpp's
  scale alpha / r equals each layer's scale (folded into B where layers differ in rank or scale)."""
  if config.use_dora: raise LoraError("llama.cpp adapters are LoRA only; save a DoRA adapter as peft or mlx")
  if not hasattr(model, "config"): raise LoraError("a GGUF adapter needs a tinylora.models model (its architecture and heads)")
  names = {p: gguf_name(f"{p}.weight") for p in layers}
  arrays = finite_arrays({f"{names[p]}.lora_{n}": t for p, a in layers.items() for n, t in (("a", a.lora_A), ("b", a.lora_B))})
  scales, ranks = {l.scale for l in layers.values()}, {l.r for l in layers.values()}
  alpha = scales.pop() * ranks.pop() if len(scales) == 1 and len(ranks) == 1 else 1.0
  with writer(path, model.config, "adapter") as (w, gguf):
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for p, layer in layers.items():
      if p == "lm_head" and model.config.tie_word_embeddings:
        raise LoraError("llama.cpp ignores an adapter on a tied lm_head; save this adapter as PEFT or mlx instead")
      A, B = arrays[f"{names[p]}.lora_a"], arrays[f"{names[p]}.lora_b"] * (layer.scale * layer.r / alpha)
      if (heads := qk_heads(model.config, f"{p}.weight")) is not None: B = permute_qk(B, heads)
      w.add_tensor(f"{names[p]}.lora_a", np.ascontiguousarray(A, np.float32))
      w.add_tensor(f"{names[p]}.lora_b", np.ascontiguousarray(B, np.float32))
