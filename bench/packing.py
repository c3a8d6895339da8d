"""Sequence packing (issue 22 item 5): non-padding target tokens per second with and without `fit(..., pack=True)` on a
long-tailed length mix (most examples short, a few near seq_len, as chat data is), the same examples consumed by both.

Each run is a Trainer on a fresh LoRA model, captured on two warm-up steps (not timed), then timed over the steps of one
epoch of the examples: one example per row without packing (data.batch_at), first-fit packed rows with it
(data.packed_batch_at). Printed: steps, seconds, non-padding target tokens (the records' real_tokens), tokens/s, the
padding fraction of the positions, and FLOPs and kernels per step.

  python bench/packing.py                                   # llama d=256, 2 layers, vocab 4096; 96 examples, 4 x 256
  python bench/packing.py --examples 200 --seq-len 512 --model '{"hidden_size": 576, "num_hidden_layers": 4}'
"""
from __future__ import annotations
import argparse, json, math, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
from tinygrad import Device, GlobalCounters, Tensor
from tinylora import LoraConfig, inject
from tinylora.data import batch_at, pack_rows, packed_batch_at
from tinylora.models.decoder import Model
from tinylora.train import Trainer, TrainConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)

def long_tailed(n: int, seq_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
  """n text examples: 90% of 8-40 tokens, 10% of 3/4 seq_len to seq_len + 1 (a full row), every token trained."""
  rng = np.random.default_rng(seed)
  long = rng.random(n) < 0.1
  lengths = np.where(long, rng.integers(3 * seq_len // 4, seq_len + 2, n), rng.integers(8, 41, n))
  return [(rng.integers(0, MODEL["vocab_size"], k).tolist(), [1] * int(k)) for k in lengths]

def run(cfg: dict, examples: list, batch_size: int, seq_len: int, pack: bool) -> dict:
  Tensor.manual_seed(0)
  model = inject(Model.from_config(cfg), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
  trainer = Trainer(model, TrainConfig(lr=1e-4, iters=10 ** 6, warmup=0))
  if pack:
    rows = pack_rows(examples, seq_len)
    steps, draw = math.ceil(len(rows) / batch_size), lambda s: packed_batch_at(examples, s, batch_size, seq_len, rows=rows)
  else: steps, draw = math.ceil(len(examples) / batch_size), lambda s: batch_at(examples, s, batch_size, seq_len)
  for s in range(2): trainer.train_step([draw(s)])  # capture (compile) the step; not timed
  GlobalCounters.reset()
  trainer.train_step([draw(0)])
  kernels, flops = GlobalCounters.kernel_count, GlobalCounters.global_ops
  batches = [draw(s) for s in range(steps)]
  start = time.perf_counter()
  for b in batches: trainer.train_step([b])
  seconds = time.perf_counter() - start
  real = sum(int(np.count_nonzero(b[2])) for b in batches)
  positions = sum(b[0].size for b in batches)
  occupied = sum(int(np.count_nonzero(b[4])) if pack else int(np.count_nonzero(b[2])) for b in batches)
  return dict(pack=pack, steps=steps, seconds=seconds, real_tokens=real, tokens_per_s=real / seconds,
              padding=1 - occupied / positions, step_gflop=flops / 1e9, step_kernels=kernels)

def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--examples", type=int, default=96)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--model", default="{}", help="JSON overrides of the model config")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  cfg = {**MODEL, **json.loads(a.model)}
  examples = long_tailed(a.examples, a.seq_len, a.seed)
  lengths = np.array([len(t) for t, _ in examples])
  print(f"{Device.DEFAULT} | {a.examples} examples, lengths median {int(np.median(lengths))}, mean {lengths.mean():.1f}, "
        f"max {lengths.max()} | batch {a.batch_size} x {a.seq_len} | model {json.dumps(cfg)} | load {os.getloadavg()}")
  results = [run(cfg, examples, a.batch_size, a.seq_len, pack) for pack in (False, True)]
  print("\n| packing | steps | seconds | non-padding target tokens | tokens/s | padding | GFLOP/step | kernels/step |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {'yes' if r['pack'] else 'no'} | {r['steps']} | {r['seconds']:.1f} | {r['real_tokens']} | {r['tokens_per_s']:.0f} | "
          f"{100 * r['padding']:.1f}% | {r['step_gflop']:.2f} | {r['step_kernels']} |")
  print(f"\npacking: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x the non-padding tokens/s | load {os.getloadavg()}")

if __name__ == "__main__":
  main()
