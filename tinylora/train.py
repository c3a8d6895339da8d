"""Training the LoRA tensors: masked LM loss, learning-rate schedule, a TinyJit'd step with gradient accumulation,
clipping and a non-finite guard, and crash-safe checkpoints that resume on the same trajectory."""
from __future__ import annotations
import contextlib, functools, math, os, pathlib, time
from dataclasses import dataclass, asdict, field
from typing import Any, Callable, Iterator, Sequence
import numpy as np
from tinygrad import Context, Device, Tensor, function, nn, dtypes
from tinylora.config import is_int, is_number
from tinylora.data import Example, batch_at, eval_batches, pack_rows, packed_batch_at, packed_eval_batches
from tinylora.device_policy import captured_step
from tinylora.engine import captured_copy_bytes, realize, tqdm
from tinylora.errors import LoraError
from tinylora.formats import checkpoint
from tinylora.lora import trainable_parameters
from tinylora.models import Model
from tinylora.models.decoder import callable_as_function
from tinylora.precision import LossScale, check_dtype

LOGITS_CHUNK_BYTES = 128 << 20  # at most the float32 logits of one chunk of positions in chunked_lm_loss

def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
  """Next-token cross-entropy of each position: logits (..., vocab) and targets (...) -> (...)."""
  logits = logits.float()
  target_logit = (logits * (Tensor.arange(logits.shape[-1]) == targets.unsqueeze(-1))).sum(-1)
  return logits.logsumexp(-1) - target_logit

def lm_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
  """Mean next-token cross-entropy over the positions where mask is 1 (prompt and padding have mask 0)."""
  return (token_nll(logits, targets) * mask).sum() / mask.sum().maximum(1)

def _chunk_rows(most: int) -> int:
  """The largest power of two <= most (at least 1): tinygrad 0.14 crashed running the precompiled chunk at 5 and 6 rows."""
  return 1 << max(0, most.bit_length() - 1)

def chunked_lm_loss(model: Any, tokens: Tensor, targets: Tensor, mask: Tensor, chunk_bytes: int = LOGITS_CHUNK_BYTES,
                    positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
  """lm_loss(model(tokens), targets, mask), with the output head of a tinylora Model applied to chunks of positions whose
  float32 logits take at most `chunk_bytes`. Each chunk is a tinygrad function that returns only its masked sum, so no
  step holds more than a chunk's logits and their gradient, at the cost of computing the logits twice. Plain lm_loss
  for other models, for logits within one chunk, and for heads that cannot run as a function (quantized, on several
  devices, or with dropout in training). Packed rows pass their `positions` and `segments` (Model.hidden): the loss is
  then the mean over every scored target of the batch, as for unpacked rows."""
  if not isinstance(model, Model):
    if positions is not None or segments is not None: raise LoraError(f"packed rows need a tinylora Model, found {type(model).__name__}")
    return lm_loss(model(tokens), targets, mask)
  h = model.hidden(tokens, positions=positions, segments=segments)
  rows, n = _chunk_rows(chunk_bytes // (4 * model.config.vocab_size)), math.prod(h.shape[:-1])
  if n <= rows or not callable_as_function(model.lm_head): return lm_loss(model.logits(h), targets, mask)
  # positions padded (masked out) to whole chunks: one chunk shape to compile, and no odd-sized last chunk, at which
  # tinygrad 0.14 crashed
  pad = -n % rows
  h = h.reshape(n, h.shape[-1]).pad(((0, pad), None))
  targets, mask = targets.reshape(n).pad(((0, pad),)), mask.reshape(n).pad(((0, pad),))
  # precompiled: a chunk's logits live only inside its own kernels and the backward recomputes them; the head is an
  # argument so that its tensors are the function's inputs (LoRA ones get gradients)
  chunk = function(lambda head, h, t, m: (token_nll(model.logits(h), t) * m).sum(), precompile=True, precompile_backward=True)
  total = sum(chunk(model.lm_head, h[i:i + rows], targets[i:i + rows], mask[i:i + rows]) for i in range(0, n + pad, rows))
  return total / mask.sum().maximum(1)

SCHEDULES = ("cosine", "linear", "constant")
# the optimizers (tinygrad's) and the optimizer_config keys each takes besides lr and weight_decay ("betas" = (b1, b2))
OPTIMIZERS: dict[str, tuple[Callable[..., nn.optim.Optimizer], tuple[str, ...]]] = {
  "adamw": (nn.optim.AdamW, ("betas", "b1", "b2", "eps")), "adam": (nn.optim.Adam, ("betas", "b1", "b2", "eps")),
  "sgd": (nn.optim.SGD, ("momentum", "nesterov")), "muon": (nn.optim.Muon, ("momentum", "nesterov", "ns_steps"))}

def learning_rate(step: int, lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                  schedule: str = "cosine") -> float:
  """Linear warmup to `lr`, then down to `lr * min_lr_ratio` at `total_steps` along a cosine or a straight line, or
  `lr` throughout ("constant")."""
  if step < warmup_steps: return lr * (step + 1) / warmup_steps
  progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
  decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]
  return lr * (min_lr_ratio + (1 - min_lr_ratio) * decay)

@dataclass
class TrainConfig:
  lr: float = 2e-4
  iters: int = 200
  warmup: int = 10
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  accum_steps: int = 1
  # recompute each decoder layer in the backward: less memory, more FLOPs (bench/RESULTS.md, "Figures behind code comments")
  grad_checkpoint: bool = False
  optimizer: str = "adamw"
  optimizer_config: dict = field(default_factory=dict)  # the optimizer's other settings (OPTIMIZERS), e.g. {"betas": [0.9, 0.98]}
  lr_schedule: str = "cosine"  # after the warmup: cosine or linear decay to lr * min_lr_ratio, or constant

  def __post_init__(self):
    def check(ok: bool, name: str, expected: str):
      if not ok: raise LoraError(f"TrainConfig.{name} = {getattr(self, name)!r}: expected {expected}")
    check(is_number(self.lr) and self.lr > 0, "lr", "a finite number > 0")
    check(is_int(self.iters) and self.iters >= 1, "iters", "an integer >= 1")
    check(is_int(self.warmup) and 0 <= self.warmup <= self.iters, "warmup", f"an integer in [0, iters={self.iters}]")
    check(is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
    check(is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    check(is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0: no clipping)")
    check(is_int(self.accum_steps) and self.accum_steps >= 1, "accum_steps", "an integer >= 1")
    check(isinstance(self.grad_checkpoint, bool), "grad_checkpoint", "True or False")
    check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
    check(self.lr_schedule in SCHEDULES, "lr_schedule", f"one of {', '.join(SCHEDULES)}")
    keys = OPTIMIZERS[self.optimizer][1]
    check(isinstance(self.optimizer_config, dict) and set(self.optimizer_config) <= set(keys), "optimizer_config",
          f"a dict of {self.optimizer}'s settings: {', '.join(keys)} (weight_decay is TrainConfig.weight_decay)")
    check(self.optimizer != "adam" or self.weight_decay == 0, "weight_decay", "0 with adam (adamw decays the weights)")

  def lr_at(self, step: int) -> float:
    return learning_rate(step, self.lr, self.iters, self.warmup, self.min_lr_ratio, self.lr_schedule)

  def make_optimizer(self, params: list[Tensor]) -> nn.optim.Optimizer:
    settings = dict(self.optimizer_config)
    if "betas" in settings: settings["b1"], settings["b2"] = settings.pop("betas")
    if self.optimizer != "adam": settings["weight_decay"] = self.weight_decay
    try: return OPTIMIZERS[self.optimizer][0](params, lr=self.lr, **settings)
    except (TypeError, ValueError) as e: raise LoraError(f"TrainConfig.optimizer_config = {self.optimizer_config!r}: {e}") from None

def to_devices(model: Any, devices: str | Sequence[str]) -> Any:
  """Puts every tensor of `model` in place on one device, or a copy on each of several devices (the replicas of data
  parallel training); tensors shared between modules (tied weights) stay shared. Returns the model."""
  target = devices if isinstance(devices, str) else tuple(devices)
  for t in {id(t): t for t in nn.state.get_parameters(model)}.values(): t.to_(target).realize()
  return model

def _check_devices(devices: str | Sequence[str]) -> tuple[str, ...]:
  names = (devices,) if isinstance(devices, str) else tuple(devices)
  if not names or not all(isinstance(d, str) for d in names):
    raise LoraError(f"devices must be device names such as ('CUDA:0', 'CUDA:1'), found {devices!r}")
  canonical = tuple(Device.canonicalize(d) for d in names)
  if len(set(canonical)) != len(canonical): raise LoraError(f"devices {names} name one device twice")
  for d in canonical:
    try: Device[d]
    except Exception as e: raise LoraError(f"device {d!r} of devices {names} cannot be opened: {e}") from e
  return canonical

class Trainer:
  """Updates only the model's LoRA tensors with AdamW. One optimizer step = `accum_steps` micro-batches:
  `_accumulate` (TinyJit) adds each micro-batch's gradients into buffers and returns (loss, gradient norm);
  the host checks both are finite and only then does `_apply` (TinyJit) clip and step, so no non-finite value reaches
  the LoRA tensors, the optimizer state or a checkpoint (the gradient buffers hold it until the next step clears them).

  `devices=("CUDA:0", "CUDA:1", ...)` trains data parallel: the model (frozen base and adapter) is copied onto every
  device, each micro-batch is split along its batch axis, and tinygrad sums the LoRA gradients across the devices
  inside the same TinyJit'd step; the update is the one a single device computes for the whole batch.

  A float16 or bfloat16 base trains as it is, the LoRA tensors, gradients and AdamW state in float32. With a float16
  base the loss is scaled (`loss_scale`, tinylora.precision.LossScale): a step whose gradients overflow float16 is
  skipped (`last_skipped`, no update, `step` unchanged) and lowers the scale.

  `config.grad_checkpoint` holds for the Trainer's own steps (training and evaluate): the model's `grad_checkpoint` is
  set while they run and restored after, so the model behaves as before outside them.

  `loss_fn(model, tokens, targets, mask)` returns the loss, or (loss, {name: scalar tensor}) to report metrics as well
  (tinylora.preference's reward margins and accuracy): their means over the last step's micro-batches are in
  `metrics`, over the last `evaluate`'s batches in `eval_metrics`. Packed batches (tinylora.data.make_packed_batch:
  tokens, targets, mask, positions, segments) reach it with `positions=` and `segments=` as well."""
  def __init__(self, model: Any, config: TrainConfig, loss_fn: Callable[..., Tensor | tuple[Tensor, dict[str, Tensor]]] | None = None,
               devices: str | Sequence[str] | None = None):
    self.model, self.config, self.step = model, config, 0
    self.params = trainable_parameters(model)
    if not self.params: raise LoraError("model has no LoRA tensors to train; inject(model, config) first")
    self.devices = None if devices is None else _check_devices(devices)
    if self.devices is not None: to_devices(model, self.devices)  # before the optimizer state is made beside the params
    if config.grad_checkpoint and not hasattr(model, "grad_checkpoint"):
      raise LoraError(f"{type(model).__name__} does not support grad_checkpoint")
    self.loss_fn = loss_fn or chunked_lm_loss
    base_dtypes = {t.dtype for t in nn.state.get_parameters(model)}
    if dtypes.bfloat16 in base_dtypes: check_dtype(dtypes.bfloat16, self.params[0].device if self.devices is None else self.devices[0])
    self.loss_scale = LossScale() if dtypes.float16 in base_dtypes else None
    self.last_skipped = False
    self.opt = config.make_optimizer(self.params)
    # real buffers now, so checkpoints can be restored into them before the first step; realized together, as each
    # Tensor.realize walks every live tensor
    for name, state in checkpoint.optimizer_state(self.opt).items():
      setattr(self.opt, name, [t.contiguous() for t in state] if isinstance(state, list) else state.contiguous().is_param_(False))
    self.grads = [Tensor.zeros(*p.shape, dtype=p.dtype, device=p.device).contiguous() for p in self.params]
    # see captured_step: nothing a step reads may be left to compute
    Tensor.realize(*nn.state.get_parameters(self.opt), *nn.state.get_parameters(model), *self.grads)
    self._accumulate, self._apply = captured_step(self._accumulate_fn), captured_step(self._apply_fn)
    self._eval = captured_step(self._eval_fn)
    self.shape: tuple | None = None
    self.metric_names: list[str] = []
    self.metrics: dict[str, float] = {}
    self.eval_metrics: dict[str, float] = {}

  def _loss(self, tokens: Tensor, targets: Tensor, mask: Tensor, **packing: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The loss_fn's loss and metrics; their names are kept here, as TinyJit's replays do not run this."""
    out = self.loss_fn(self.model, tokens, targets, mask, **packing)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    self.metric_names = list(metrics)
    return loss, [m.detach().float() for m in metrics.values()]

  def _eval_fn(self, tokens: Tensor, targets: Tensor, mask: Tensor, **packing: Tensor) -> Tensor:
    loss, metrics = self._loss(tokens, targets, mask, **packing)
    return realize(Tensor.stack(loss.float(), *metrics))

  def _accumulate_fn(self, tokens: Tensor, targets: Tensor, mask: Tensor, accumulate: Tensor, scale: Tensor | None = None,
                     **packing: Tensor) -> Tensor:
    """Adds this micro-batch's gradients to the buffers (`accumulate` 0: the first micro-batch of a step, which replaces
    them instead); returns (loss, norm of the summed gradients, *metrics)."""
    loss, metrics = self._loss(tokens, targets, mask, **packing)
    # float16: the backward runs on loss * scale, whose gradients are divided by it again in float32
    grads = loss.gradient(*self.params) if scale is None else [d / scale[0] for d in (loss * scale[0]).gradient(*self.params)]
    # where, not g * accumulate: a refused step's nan would survive multiplication by 0 and poison every later step
    acc = [g.assign((accumulate != 0).where(g, 0) + d) for g, d in zip(self.grads, grads)]
    norm = Tensor.stack(*[a.float().square().sum() for a in acc]).sum().sqrt()
    return realize(Tensor.stack(loss.float(), norm, *metrics), *acc)

  def _apply_fn(self, lr: Tensor) -> Tensor:
    n = self.config.accum_steps
    norm = Tensor.stack(*[g.float().square().sum() for g in self.grads]).sum().sqrt() / n
    coef = (self.config.grad_clip / (norm + 1e-6)).minimum(1.0) / n if self.config.grad_clip > 0 else Tensor(1.0 / n)
    for p, g in zip(self.params, self.grads): p.grad = (g * coef).cast(p.dtype)
    self.opt.lr.assign(lr)
    return realize(norm, *self.opt.schedule_step())

  @contextlib.contextmanager
  def _grad_checkpointing(self) -> Iterator[None]:
    """The model as the Trainer's config asks for the Trainer's own steps (its grad_checkpoint), restored after: the
    steps read it when they capture, and a model handed back after training computes as it did before."""
    if not self.config.grad_checkpoint:
      yield
      return
    was, self.model.grad_checkpoint = self.model.grad_checkpoint, True
    try: yield
    finally: self.model.grad_checkpoint = was

  def _put(self, x: Tensor, axis: int | None = None) -> Tensor:
    """x on the Trainer's devices: split along `axis` across them, or (axis None) a copy on each."""
    return x if self.devices is None else x.shard(self.devices, axis).realize()

  def _batch(self, tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray,
             *packing: np.ndarray) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """The batch's (tokens, targets, mask) on the devices, and a packed batch's positions and segments by name."""
    if self.devices is not None and len(tokens) % len(self.devices):
      raise LoraError(f"a batch of {len(tokens)} sequences does not split evenly across the {len(self.devices)} devices "
                      f"{self.devices}; use a batch size that is a multiple of {len(self.devices)}")
    ts = (Tensor(tokens, dtype=dtypes.int32), Tensor(targets, dtype=dtypes.int32), Tensor(mask, dtype=dtypes.float32),
          *(Tensor(a, dtype=dtypes.int32) for a in packing))
    self._check_shape(*ts)
    ts = tuple(self._put(t, axis=0) for t in ts)
    return ts[:3], dict(zip(("positions", "segments"), ts[3:]))

  def cross_device_bytes(self) -> int | None:
    """Bytes one micro-batch's step copies between devices, all devices together (engine.captured_copy_bytes). With
    data parallel training that is the all-reduce of the LoRA gradients and of the loss's two sums; the frozen base
    never moves. None before the first train_step (which captures the step), and where the captured step hides its copies."""
    return captured_copy_bytes(self._accumulate)

  def _check_shape(self, *ts: Tensor):
    shape = tuple(t.shape for t in ts)
    if self.shape is None: self.shape = shape
    # TinyJit would replay a shape-changed batch with wrong answers; catch it here
    if shape != self.shape: raise LoraError(f"batch shapes changed from {self.shape} to {shape}; pad every batch to one shape")

  def train_step(self, batches: list[tuple[np.ndarray, ...]]) -> tuple[float, float]:
    """One optimizer step over `accum_steps` micro-batches of (tokens, targets, mask), or packed ones of (tokens,
    targets, mask, positions, segments); returns (mean loss, grad norm). With a float16 base, gradients that overflow
    skip the step (`last_skipped`; the grad norm returned is not finite)."""
    if len(batches) != self.config.accum_steps:
      raise LoraError(f"train_step got {len(batches)} micro-batches, expected accum_steps={self.config.accum_steps}")
    losses, metrics, self.last_skipped = [], [], False
    scale = () if self.loss_scale is None else (self._put(Tensor([self.loss_scale.value])),)
    with Context(TRAINING=1), self._grad_checkpointing():
      for i, batch in enumerate(batches):
        batch, packing = self._batch(*batch)
        loss, norm, *values = self._accumulate(*batch, self._put(Tensor([0.0 if i == 0 else 1.0])), *scale, **packing).numpy().tolist()
        if self.loss_scale is not None and math.isfinite(loss) and not math.isfinite(norm):
          self.loss_scale.update(overflow=True, step=self.step + 1)  # raises after max_skips in a row
          self.last_skipped = True
          return loss, norm
        if not (math.isfinite(loss) and math.isfinite(norm)):
          raise LoraError(f"step {self.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                          f"(loss={loss}, grad norm={norm}); no update was applied and nothing was saved")
        losses.append(loss)
        metrics.append(values)
      c = self.config
      grad_norm = self._apply(self._put(Tensor([c.lr_at(self.step)]))).item()
    if self.loss_scale is not None: self.loss_scale.update(overflow=False, step=self.step + 1)
    self.step += 1
    self.metrics = dict(zip(self.metric_names, np.mean(metrics, 0).tolist()))
    return sum(losses) / len(losses), grad_norm

  def evaluate(self, batches) -> float:
    """Mean loss over batches of (tokens, targets, mask) (or packed ones), without dropout and without touching any
    state but `eval_metrics` (the loss_fn's metrics, averaged over the batches)."""
    def run(batch, packing): return self._eval(*batch, **packing).numpy().tolist()
    with self._grad_checkpointing(): values = [run(*self._batch(*batch)) for batch in batches]
    self.eval_metrics = dict(zip(self.metric_names, np.mean([v[1:] for v in values], 0).tolist())) if values else {}
    return sum(v[0] for v in values) / max(1, len(values))

  # ---- checkpoints (their files: tinylora/formats/checkpoint.py)

  def save_checkpoint(self, directory: str | os.PathLike, keep: int = 2, extra: dict | None = None) -> pathlib.Path:
    """Writes a complete checkpoint into a new folder, then atomically points `latest` at it; a crash at any moment
    leaves the previous checkpoint loadable. Keeps the newest `keep` checkpoints."""
    if not is_int(keep) or keep < 1: raise LoraError(f"keep = {keep!r}: expected an integer >= 1 (checkpoints to keep)")
    scale = {} if self.loss_scale is None else {"loss_scale": self.loss_scale.value}
    state = {"step": self.step, "config": asdict(self.config), **scale, **(extra or {})}
    return checkpoint.save(directory, self.model, self.opt, state, keep)

  def load_checkpoint(self, directory: str | os.PathLike) -> dict:
    """Restores LoRA tensors, optimizer state and step from the checkpoint `latest.json` names; returns its state."""
    state = checkpoint.load(directory, self.model, self.opt, self.config.optimizer)
    self.step = int(state["step"])
    if self.loss_scale is not None and is_number(state.get("loss_scale")): self.loss_scale.value = float(state["loss_scale"])
    return state

def fit(trainer: Trainer, train: list[Example], valid: list[Example] | None, batch_size: int, seq_len: int, seed: int = 0,
        pad_id: int = 0, val_every: int = 50, val_batches: int = 8, checkpoint_dir: str | os.PathLike | None = None,
        save_every: int = 100, keep: int = 2, progress: bool = True, draw: Callable[..., tuple] = batch_at,
        draw_eval: Callable[..., list] = eval_batches, pack: bool = False) -> list[dict]:
  """Runs `trainer` from its current step to `config.iters` on fixed-shape batches drawn by (seed, step), with a progress
  bar (loss, tokens/s, ETA), validation every `val_every` steps and checkpoints every `save_every` steps (and at the
  end), keeping the newest `keep`. Returns one record per step: step, loss, grad_norm, lr, tokens_per_s (all positions,
  padding included), real_tokens (the step's scored targets: nonzero loss weight, so no padding), elapsed_s, and
  val_loss where measured; with a float16 base also loss_scale, and a step skipped for a float16 overflow has a record
  with skipped=True (then the same step runs again at the lowered scale). A loss_fn's metrics join the record under
  their names (validation's as val_<name>).

  `draw(train, step, batch_size, seq_len, seed, pad_id)` gives the micro-batch of a global micro-step and
  `draw_eval(valid, batch_size, seq_len, pad_id, val_batches)` the validation batches: data.batch_at and
  data.eval_batches, or for preference pairs preference.pair_batch_at and preference.pair_eval_batches.

  `pack=True` packs several examples into each of the batch_size rows (data.pack_rows, once, then
  data.packed_batch_at and data.packed_eval_batches), each attending only to itself with its positions from 0, so an
  example's loss and gradients are those it has alone; the loss is the mean over the batch's scored targets either way.
  An epoch then takes fewer steps. It needs a tinylora Model and the default draws."""
  c, history = trainer.config, []
  if pack:
    if draw is not batch_at or draw_eval is not eval_batches:
      raise LoraError("pack=True packs supervised examples with data.packed_batch_at and data.packed_eval_batches; it "
                      "does not combine with other draws (draw=, draw_eval=), such as preference pairs")
    draw, draw_eval = functools.partial(packed_batch_at, rows=pack_rows(train, seq_len, seed)), packed_eval_batches
  valid_b = draw_eval(valid, batch_size, seq_len, pad_id, val_batches) if valid else []
  bar = tqdm(total=c.iters, desc="train", disable=not progress)
  bar.update(trainer.step)
  start, tokens = time.perf_counter(), 0
  while trainer.step < c.iters:
    micro = [draw(train, trainer.step * c.accum_steps + i, batch_size, seq_len, seed, pad_id) for i in range(c.accum_steps)]
    lr = c.lr_at(trainer.step)
    loss, grad_norm = trainer.train_step(micro)
    tokens += sum(b[0].size for b in micro)
    record = {"step": trainer.step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
              "tokens_per_s": tokens / (time.perf_counter() - start),
              "real_tokens": sum(int(np.count_nonzero(b[2])) for b in micro), **trainer.metrics}
    record["elapsed_s"] = time.perf_counter() - start  # since fit began, before validation and checkpointing
    if trainer.loss_scale is not None: record["loss_scale"] = trainer.loss_scale.value
    if trainer.last_skipped:
      history.append(record | {"step": trainer.step + 1, "skipped": True})
      continue
    if trainer.step == 1: record["first_step_s"] = record["elapsed_s"]
    if valid_b and (trainer.step % val_every == 0 or trainer.step == c.iters):
      record["val_loss"] = trainer.evaluate(valid_b)
      record |= {f"val_{k}": v for k, v in trainer.eval_metrics.items()}
      if progress: tqdm.write(f"step {trainer.step}: train loss {loss:.3f}, val loss {record['val_loss']:.3f}")
    if checkpoint_dir is not None and (trainer.step % save_every == 0 or trainer.step == c.iters):
      trainer.save_checkpoint(checkpoint_dir, keep)
    bar.set_description(f"loss {loss:.3f} | {record['tokens_per_s']:.0f} tok/s")
    bar.update(1)
    history.append(record)
  bar.update(close=True)
  return history
