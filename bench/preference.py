"""Step time of a DPO and an ORPO step against a supervised step on the same rows, through tinylora's Trainer.

  python bench/preference.py [--model JSON] [--pairs 4] [--seq 64] [--steps 6]
A preference batch of P pairs is 2P rows; the supervised step gets the same 2P rows (mean cross-entropy on the
responses). Times are medians of the steps after the first (which captures and compiles)."""
from __future__ import annotations
import argparse, json, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
from tinygrad import Device, Tensor
import tinylora as tl
from tinylora.models.decoder import Model
from tinylora.preference import dpo_loss, make_pair_batch, orpo_loss
from tinylora.train import Trainer, TrainConfig

MODEL = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def step_times(config: dict, loss_fn, batch, steps: int) -> list[float]:
  Tensor.manual_seed(0)
  model = tl.inject(Model.from_config(config), tl.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
  trainer, times = Trainer(model, TrainConfig(lr=1e-4, iters=steps, warmup=0), loss_fn=loss_fn), []
  for _ in range(steps):
    start = time.perf_counter()
    trainer.train_step([batch])
    Device[Device.DEFAULT].synchronize()
    times.append(time.perf_counter() - start)
  return times

def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="{}")
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--steps", type=int, default=6)
  a = ap.parse_args()
  config, rng, half = {**MODEL, **json.loads(a.model)}, np.random.default_rng(0), a.seq // 2
  pairs = [tuple((prompt + r, [0] * half + [1] * half) for r in (rng.integers(0, config["vocab_size"], half).tolist() for _ in "cr"))
           for prompt in (rng.integers(0, config["vocab_size"], half).tolist() for _ in range(a.pairs))]
  batch = make_pair_batch(pairs, a.seq)
  sft = (batch[0], np.maximum(batch[1], 0), batch[2])  # the same rows and response mask, padding targets as make_batch's
  print(f"{Device.DEFAULT}: {config['num_hidden_layers']} layers, d={config['hidden_size']}, vocab {config['vocab_size']}, "
        f"{a.pairs} pairs = {2 * a.pairs} rows x {a.seq}")
  print("| step | first step (s) | median step (s) | x supervised |\n|---|---|---|---|")
  base = None
  for name, fn in (("supervised (lm_loss)", None), ("DPO", dpo_loss()), ("ORPO", orpo_loss())):
    t = step_times(config, fn, sft if fn is None else batch, a.steps)
    med = statistics.median(t[1:])
    base = base or med
    print(f"| {name} | {t[0]:.2f} | {med:.4f} | {med / base:.2f} |", flush=True)

if __name__ == "__main__": main()
