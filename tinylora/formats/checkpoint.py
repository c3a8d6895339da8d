"""The Trainer's checkpoints: `<dir>/step_NNNNNN/` holds the adapter (PEFT files), `optimizer.safetensors` (AdamW's
moments and bias-correction terms) and `trainer_state.json`; `<dir>/latest.json` names the newest complete one. Each
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

def _optimizer_tensors(opt: Any) -> dict[str, Tensor]:
  """AdamW's state by file key: first and second moments per parameter, and the running beta powers."""
  return ({f"m.{i}": m for i, m in enumerate(opt.m)} | {f"v.{i}": v for i, v in enumerate(opt.v)}
          | {"b1_t": opt.b1_t, "b2_t": opt.b2_t})

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

def load(directory: str | os.PathLike, model: Any, opt: Any) -> dict:
  """Restores the LoRA tensors of the model's active adapters and optimizer `opt`'s state from the checkpoint
  latest.json names, every array checked before any is assigned; returns its trainer state (with an integer "step")."""
  ckpt = latest(directory)
  state = read_json(ckpt / STATE)
  if not isinstance(state.get("step"), int): raise LoraError(f"{ckpt / STATE}: no integer 'step'")
  optimizer, _ = read_safetensors(ckpt / OPTIMIZER)
  adapter, _ = read_safetensors(ckpt / peft.WEIGHTS)
  targets = peft.state({p: l.adapter for p, l in lora_layers(model).items()}) | _optimizer_tensors(opt)
  arrays = adapter | optimizer
  check_arrays(str(ckpt), arrays, {k: t.shape for k, t in targets.items()}, floats=True)  # all before any is assigned
  for k, t in targets.items(): t.assign(Tensor(arrays[k].astype(np.float32), dtype=t.dtype, device=t.device)).realize()
  return state
