"""Data-parallel scaling of tinylora's Trainer: tokens/s per device at 1..N devices (the per-device batch fixed, so N
devices train an N times larger batch), and the bytes each step moves between devices.

The bytes are computed (the LoRA gradients a data-parallel step all-reduces, next to the frozen base a full fine-tune
would all-reduce) and read from the captured step graph (`Trainer.cross_device_bytes`: every COPY between devices).

  python bench/parallel.py                                     # CPU:0, CPU:1: tinygrad's virtual CPU devices
  python bench/parallel.py --devices CUDA:0,CUDA:1,CUDA:2,CUDA:3 --counts 1,2,4
  python bench/parallel.py --devices NV:0,NV:1 --model '{"hidden_size": 2048, "intermediate_size": 8192, ...}'
  HCQ2=1 python bench/parallel.py                              # each CPU device runs its kernels on its own thread
  RING=2 python bench/parallel.py --devices CPU:0,CPU:1,CPU:2,CPU:3 --counts 1,2,4   # tinygrad's ring all-reduce
The bench model is bench/run.py's; --model overrides its config. --sizes adds computed gradient and base bytes for
other shapes (default: the bench model and a Llama-3.2-1B-shaped model), built lazily so no base weight is allocated.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinygrad import Tensor, nn
from tinylora import LoraConfig, inject, trainable_parameters
from tinylora.models.decoder import Model, ModelConfig
from tinylora.train import Trainer, TrainConfig
from run import MODEL, TARGETS, build_model, make_batch, machine, table

LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True)

def sizes(cfg: dict, r: int) -> dict:
  """LoRA gradient bytes (what a data-parallel LoRA step all-reduces) and base bytes (what full fine-tuning would), in
  float32, from a model built lazily: the base weights are never realized."""
  model = Model(ModelConfig.from_hf(cfg))
  base = sum(t.numel() for t in {id(t): t for t in nn.state.get_parameters(model)}.values())
  inject(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
  lora = sum(t.numel() for t in trainable_parameters(model))
  return dict(base_params=base, lora_params=lora, lora_grad_bytes=4 * lora, base_grad_bytes=4 * base)

def allreduce_bytes(grad_bytes: int, n: int) -> dict:
  """Bytes each device receives in one all-reduce of `grad_bytes`: naive (each gets every other device's buffer, what
  tinygrad does for 2 devices and small buffers) and ring (2 (n-1)/n of the buffer, the bandwidth-optimal schedule)."""
  return dict(naive=(n - 1) * grad_bytes, ring=2 * (n - 1) * grad_bytes // n)

def scaling(cfg: dict, devices: tuple[str, ...], counts: list[int], per_device_batch: int, seq: int, r: int, steps: int) -> list[dict]:
  rows = []
  for n in counts:
    batch = per_device_batch * n
    trainer = Trainer(build_model(cfg, r), TrainConfig(lr=1e-4, warmup=0), devices=devices[:n])
    step_batch = [make_batch(cfg, batch, seq)]
    start = time.perf_counter()
    for _ in range(2): trainer.train_step(step_batch)  # TinyJit capture (compiles), then the first replay
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):  # train_step reads the loss and norm back, so each step has finished on every device
      st = time.perf_counter()
      trainer.train_step(step_batch)
      times.append(time.perf_counter() - st)
    step_s = statistics.median(times)
    grad_bytes = sum(p.numel() * p.dtype.itemsize for p in trainer.params)
    rows.append(dict(devices=n, batch=batch, seq=seq, first_two_steps_s=first, step_s=step_s, step_s_all=times,
                     tokens_per_s=batch * seq / step_s, tokens_per_s_per_device=batch * seq / step_s / n,
                     lora_grad_bytes=grad_bytes, cross_device_bytes=trainer.cross_device_bytes(),
                     allreduce_per_device=allreduce_bytes(grad_bytes, n)))
    del trainer
  for row in rows:
    row["efficiency"] = row["tokens_per_s_per_device"] / rows[0]["tokens_per_s_per_device"]
    row["copied"] = "not visible (HCQ2)" if row["cross_device_bytes"] is None else f"{row['cross_device_bytes']:,}"
  return rows

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="CPU:0,CPU:1", help="comma-separated tinygrad devices, the first N used for N")
  p.add_argument("--counts", default=None, help="comma-separated device counts to measure (default: 1 and all)")
  p.add_argument("--per-device-batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--steps", type=int, default=5, help="timed steps per device count (median reported)")
  p.add_argument("--model", default="{}", help="JSON overrides of the bench model config")
  p.add_argument("--json", help="write all results here")
  args = p.parse_args()
  devices = tuple(args.devices.split(","))
  counts = [int(c) for c in args.counts.split(",")] if args.counts else sorted({1, len(devices)})
  cfg = {**MODEL, **json.loads(args.model)}
  rows = scaling(cfg, devices, counts, args.per_device_batch, args.seq, args.rank, args.steps)
  print(f"## data parallel: {', '.join(devices[:max(counts)])}, {platform.machine()}, HCQ2={os.environ.get('HCQ2', '0')}\n")
  print(table(rows, [("devices", "devices", "d"), ("batch", "batch", "d"), ("step_s", "step s", ".3f"),
                     ("tokens_per_s", "tokens/s", ".0f"), ("tokens_per_s_per_device", "tokens/s per device", ".0f"),
                     ("efficiency", "efficiency", ".2f"), ("lora_grad_bytes", "LoRA grad bytes", ",d"),
                     ("copied", "copied between devices per step", "s")]))
  shapes = {"bench model": cfg, "Llama-3.2-1B shape": LLAMA_1B}
  volumes = [dict(model=name, **sizes(c, args.rank)) for name, c in shapes.items()]
  for v in volumes: v["ratio"] = v["base_grad_bytes"] / v["lora_grad_bytes"]
  print("\n## bytes all-reduced per step (float32 gradients)\n")
  print(table(volumes, [("model", "model", "s"), ("base_params", "base params", ",d"), ("lora_params", "LoRA params", ",d"),
                        ("lora_grad_bytes", "LoRA grads bytes", ",d"), ("base_grad_bytes", "full fine-tune grads bytes", ",d"),
                        ("ratio", "full / LoRA", ".0f")]))
  if args.json:
    with open(args.json, "w") as f: json.dump(dict(machine=machine(), args=vars(args), scaling=rows, volumes=volumes), f, indent=1)

if __name__ == "__main__": main()
