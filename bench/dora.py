"""DoRA's cost against LoRA: one adapted linear (forward, and forward + the gradients training needs) and a whole
Trainer step, on the same shapes and device. python bench/dora.py [--dims 1024 --rank 16 --tokens 512 --json out.json]"""
import argparse, json, os, statistics, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MODEL, TARGETS, counted, interleaved, make_batch, machine, timed  # bench/run.py's helpers
from tinygrad import Tensor, TinyJit, nn
from tinylora import LoraConfig, LoraLinear, inject
from tinylora.device_policy import base_forward, cpu_matmul_shapes
from tinylora.models.llama import Model
from tinylora.train import Trainer, TrainConfig

def linear_rows(d: int, r: int, T: int, reps: int) -> list[dict]:
  Tensor.manual_seed(0)
  base = nn.Linear(d, d, bias=False)
  Tensor.realize(*nn.state.get_parameters(base))
  lora, dora = LoraLinear(base, r, 2.0, init=False), LoraLinear(base, r, 2.0, init=False, use_dora=True)
  x, g = Tensor.randn(T, d).realize(), Tensor.randn(T, d).realize()
  def grads(f, *ts): return lambda x: [y := f(x), *(y * g).sum().gradient(x, *ts)]
  cases = {"forward": {"base": lambda x: base_forward(base, x), "lora": lora, "dora": dora},
           "fwd+grad": {"base": grads(lambda x: base_forward(base, x)), "lora": grads(lora, lora.lora_A, lora.lora_B),
                        "dora": grads(dora, dora.lora_A, dora.lora_B, dora.magnitude)}}
  rows = []
  for mode, fns in cases.items():
    jits = {k: TinyJit(cpu_matmul_shapes()(lambda x, f=f: Tensor.realize(*(o if isinstance(o := f(x), list) else [o]))))
            for k, f in fns.items()}
    for j in jits.values():
      for _ in range(3): j(x)
    counts, times = {k: counted(j, x) for k, j in jits.items()}, interleaved(jits, (x,), reps)
    for k in jits:
      rows.append(dict(d=d, r=r, tokens=T, mode=mode, variant=k, kernels=counts[k][0], gflop=counts[k][1] / 1e9,
                       ms=statistics.median(times[k]) * 1e3, vs_base=statistics.median(times[k]) / statistics.median(times["base"]),
                       flop_vs_base=counts[k][1] / counts["base"][1]))
  return rows

def step_row(cfg: dict, batch: int, seq: int, r: int, dora: bool, steps: int) -> dict:
  Tensor.manual_seed(0)
  model = inject(Model.from_config(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False, use_dora=dora))
  trainer = Trainer(model, TrainConfig(lr=1e-4, warmup=0))
  data = [make_batch(cfg, batch, seq)]
  first = [timed(lambda: trainer.train_step(data)) for _ in range(2)]
  kernels, flops = counted(lambda: trainer.train_step(data))
  times = [timed(lambda: trainer.train_step(data)) for _ in range(steps)]
  t = statistics.median(times)
  return dict(kind="dora" if dora else "lora", batch=batch, seq=seq, r=r, step_s=t, tokens_per_s=batch * seq / t,
              step_gflop=flops / 1e9, kernels=kernels, first_steps_s=first, trainable=sum(p.numel() for p in trainer.params))

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dims", default="1024", help="linear: comma-separated d")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--tokens", type=int, default=512, help="linear: tokens")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--model", default="{}", help="step: JSON overrides of bench/run.py's model config")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--json", help="write the results here")
  a = p.parse_args()
  out = {"machine": machine(), "linear": [row for d in map(int, a.dims.split(",")) for row in linear_rows(d, a.rank, a.tokens, a.reps)]}
  for row in out["linear"]: print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  cfg = {**MODEL, **json.loads(a.model)}
  out["step"] = [step_row(cfg, a.batch, a.seq, a.rank, dora, a.steps) for dora in (False, True)]
  for row in out["step"]: print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  if a.json: open(a.json, "w").write(json.dumps(out, indent=2))

if __name__ == "__main__":
  main()
