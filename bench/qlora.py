"""QLoRA memory and speed: the same model with an fp16, 8-bit and 4-bit (group 64) base, LoRA r=16 on all seven
projections, AdamW through tinylora's Trainer. Prints weight bytes, peak bytes allocated during training steps, the
largest buffer a step allocates (a dequantized copy of a frozen weight would show up here), tokens/s, and the model
sizes that fit a memory budget at these bytes per parameter.

  python bench/qlora.py [--hidden 256 --layers 2 --ffn 704 --vocab 1024 --batch 2 --seq 128 --steps 6] [--json out.json]

With --linear ROWS,IN,OUT it times one frozen linear instead: forward and input gradient (a captured step, as the
Trainer's), float32 against GGUF-style packed Q4 and Q8 (group 32) weights, e.g. --linear 256,576,1536.
"""
import argparse, json, pathlib, tempfile, time
import numpy as np
from tinygrad import Device, Tensor, dtypes, nn
import tinylora as tl
from tinylora.engine import peak_memory
from tinylora import load_pretrained, save_pretrained
from tinylora.models import Model
from tinylora.device_policy import base_forward, captured_step
from tinylora.quant import QuantizedLinear, quantize
from tinylora.tree import unique_state_dict
from tinylora.train import Trainer, TrainConfig

def run(model, args) -> dict:
  # already allocated: the peak below adds what training allocates on top
  weights = sum(t.nbytes() for t in unique_state_dict(model).values())
  tl.inject(model, tl.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
  trainer = Trainer(model, TrainConfig(lr=1e-3, iters=args.steps, warmup=0))
  rng = np.random.default_rng(0)
  tok = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
  batch = (tok[:, :-1], tok[:, 1:], np.ones((args.batch, args.seq), np.float32))
  with peak_memory() as memory:
    times = []
    for _ in range(args.steps):
      t = time.perf_counter(); trainer.train_step([batch]); times.append(time.perf_counter() - t)
  steady = float(np.median(times[2:])) if len(times) > 2 else times[-1]
  return {"weight_bytes": weights, "peak_bytes": memory.added + weights, "largest_step_buffer": memory.largest,
          "tokens_per_s": args.batch * args.seq / steady, "first_step_s": times[0]}

def linear_step_ms(rows: int, fin: int, fout: int, bits: int | None, steps: int) -> float:
  """Median ms of x -> (W x, dL/dx) for one frozen linear: float32 (bits None) or packed with `bits`, group 32."""
  lin = nn.Linear(fin, fout, bias=False)
  layer = lin if bits is None else QuantizedLinear.from_linear(lin, bits, 32)
  Tensor.realize(*nn.state.get_parameters(layer))
  x, g = Tensor.randn(rows, fin).realize(), Tensor.randn(rows, fout).realize()
  def step(x: Tensor, g: Tensor) -> None:
    y = base_forward(layer, x)
    Tensor.realize(y, *(y * g).sum().gradient(x))
  jit, times = captured_step(step), []
  for _ in range(2 + steps):
    t = time.perf_counter(); jit(x, g); times.append(time.perf_counter() - t)
  return float(np.median(times[2:])) * 1e3

def linear_main(shape: str, steps: int) -> None:
  rows, fin, fout = map(int, shape.split(","))
  base = linear_step_ms(rows, fin, fout, None, steps)
  print(f"device {Device.DEFAULT}; one linear {rows}x{fin} -> {fout}, forward + input gradient, median of {steps}")
  print(f"float32 {base:8.1f} ms")
  for bits in (4, 8):
    ms = linear_step_ms(rows, fin, fout, bits, steps)
    print(f"Q{bits} g32 {ms:8.1f} ms  {ms / base:5.2f}x float32")

def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for k, v in dict(hidden=256, layers=2, heads=8, kv_heads=4, ffn=704, vocab=1024, batch=2, seq=128, steps=6).items():
    p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
  p.add_argument("--json")
  p.add_argument("--linear", metavar="ROWS,IN,OUT", help="time one linear instead (see above)")
  args = p.parse_args()
  if args.linear: return linear_main(args.linear, args.steps)
  cfg = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.ffn, "num_hidden_layers": args.layers,
         "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
         "max_position_embeddings": args.seq}
  Tensor.manual_seed(0)
  with tempfile.TemporaryDirectory() as d:
    save_pretrained(Model.from_config(cfg), d, dtype=dtypes.float16)
    results = {"fp16": run(load_pretrained(d), args),
               "8-bit g64": run(quantize(load_pretrained(d), bits=8, group_size=64), args),
               "4-bit g64": run(quantize(load_pretrained(d), bits=4, group_size=64), args)}
  fp16 = results["fp16"]["weight_bytes"]
  d_ff_max = max(args.hidden * args.ffn, args.hidden * args.vocab)
  print(f"device {Device.DEFAULT}; model {cfg}; batch {args.batch}x{args.seq}")
  print(f"{'base':10} {'weights MB':>10} {'x fp16':>7} {'peak MB':>8} {'largest step buffer MB':>23} {'tok/s':>7} {'first step s':>13}")
  for name, r in results.items():
    print(f"{name:10} {r['weight_bytes'] / 1e6:10.2f} {r['weight_bytes'] / fp16:7.3f} {r['peak_bytes'] / 1e6:8.2f} "
          f"{r['largest_step_buffer'] / 1e6:23.2f} {r['tokens_per_s']:7.0f} {r['first_step_s']:13.1f}")
  print(f"(one fp32 copy of the largest frozen weight would be {d_ff_max * 4 / 1e6:.2f} MB)")
  if args.json: pathlib.Path(args.json).write_text(json.dumps({"config": cfg, "results": results}, indent=2))

if __name__ == "__main__":
  main()
