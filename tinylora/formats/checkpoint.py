"""The Trainer's checkpoints: `<dir>/step_NNNNNN/` holds the adapter (PEFT files), `optimizer.safetensors` (the
optimizer's state: Adam's moments and bias-correction terms, or SGD's and Muon's momentum) and `trainer_state.json`; `<dir>/latest.json` names the newest complete one. Each
file is written atomically and `latest.json` last, so a crash at any moment leaves the previous checkpoint loadable."""
from __future__ import annotations
import os, pathlib, shutil
from typing import Any
import numpy as np
from tinygrad import Tensor
from tinylora.errors import LoraError
from tinylora.formats import peft
from tinylora.formats.common import saved_adapter
from tinylora.io import check_arrays, read_json, read_safetensors, write_json, write_safetensors
from tinylora.lora import lora_layers

LATEST, OPTIMIZER, STATE = "latest.json", "optimizer.safetensors", "trainer_state.json"

def optimizer_state(opt: Any) -> dict[str, Tensor | list[Tensor]]:
  """The state of a tinygrad optimizer by attribute: Adam's moments `m`, `v` per parameter and running beta powers
  `b1_t`, `b2_t`; SGD's and Muon's momentum `b` per parameter (none without momentum)."""
  return {name: getattr(opt, name) for name in ("m", "v", "b", "b1_t", "b2_t") if hasattr(opt, name)}

def _optimizer_tensors(opt: Any) -> dict[str, Tensor]:
  """The optimizer's state by file key: `m.3` for the 4th parameter's first moment, `b1_t` for a single tensor."""
  return {k: t for name, state in optimizer_state(opt).items()
          for k, t in (((f"{name}.{i}", t) for i, t in enumerate(state)) if isinstance(state, list) else [(name, state)])}

def save(directory: str | os.PathLike, model: Any, opt: Any, state: dict, keep: int) -> pathlib.Path:
  """Writes the model's active adapter, optimizer `opt` and `state` (a JSON object with an integer "step") into a new
  folder, then points latest.json at it and deletes all but the newest `keep` checkpoints. Returns the new folder."""
  directory = pathlib.Path(directory)
  ckpt = directory / f"step_{state['step']:06d}"
  peft.write(model, *saved_adapter(model, None), ckpt)
  write_safetensors(ckpt / OPTIMIZER, {k: t.numpy() for k, t in _optimizer_tensors(opt).items()})
  write_json(ckpt / STATE, state)
  write_json(directory / LATEST, {"checkpoint": ckpt.name})
  for old in sorted(directory.glob("step_*"))[:-keep]:
    if old != ckpt: shutil.rmtree(old, ignore_errors=True)
  return ckpt

def exists(directory: str | os.PathLike) -> bool:
  """Whether `directory` is a checkpoint directory (holds latest.json), not, say, a plain adapter directory."""
  return (pathlib.Path(directory) / LATEST).exists()

def latest(directory: str | os.PathLike) -> pathlib.Path:
  """The checkpoint folder latest.json names (an adapter directory load_adapter reads)."""
  directory = pathlib.Path(directory)
  name = read_json(directory / LATEST).get("checkpoint")
  if not isinstance(name, str) or not name.startswith("step_"):
    raise LoraError(f"{directory / LATEST}: expected {{\"checkpoint\": \"step_NNNNNN\"}}, found checkpoint={name!r}")
  return directory / name

def load(directory: str | os.PathLike, model: Any, opt: Any, optimizer: str) -> dict:
  """Restores the LoRA tensors of the model's active adapters and optimizer `opt`'s state from the checkpoint
  latest.json names, every array checked before any is assigned; returns its trainer state (with an integer "step").
  A checkpoint of another optimizer than `optimizer` (its name in the Trainer's config) is refused."""
  ckpt = latest(directory)
  state = read_json(ckpt / STATE)
  if not isinstance(state.get("step"), int): raise LoraError(f"{ckpt / STATE}: no integer 'step'")
  saved = (state.get("config") or {}).get("optimizer", "adamw")  # checkpoints from before the choice were AdamW's
  if saved != optimizer:
    raise LoraError(f"{ckpt}: a checkpoint of a {saved} run, and this Trainer's optimizer is {optimizer}: its state cannot "
                    f"be restored into another optimizer (train with optimizer={saved!r} to resume it)")
  optimizer, _ = read_safetensors(ckpt / OPTIMIZER)
  adapter, _ = read_safetensors(ckpt / peft.WEIGHTS)
  targets = peft.state({p: l.adapter for p, l in lora_layers(model).items()}) | _optimizer_tensors(opt)
  arrays = adapter | optimizer
  check_arrays(str(ckpt), arrays, {k: t.shape for k, t in targets.items()}, floats=True)  # all before any is assigned
  for k, t in targets.items(): t.assign(Tensor(arrays[k].astype(np.float32), dtype=t.dtype, device=t.device)).realize()
  return state
