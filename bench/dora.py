"""DoRA's cost against LoRA: one adapted linear (forward, and forward + the gradients training needs) and a whole
Trainer step against the base model's forward, on the same shapes and device.
python bench/dora.py [--sections linear,step --dims 1024 --rank 16 --tokens 512 --steps 5 --json out.json]"""
import argparse, json, os, statistics, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MODEL, TARGETS, counted, interleaved, kernel_profile, make_batch, machine, timed  # bench/run.py's helpers
from tinygrad import Tensor, TinyJit, nn
from tinylora import LoraConfig, LoraLinear, inject
from tinylora.device_policy import base_forward, cpu_matmul_shapes
from tinylora.models.decoder import Model
from tinylora.train import Trainer, TrainConfig, lm_loss

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
                       flop_vs_base=counts[k][1] / counts["base"][1], load_avg=os.getloadavg()[0]))
  return rows

def step_rows(cfg: dict, batch: int, seq: int, r: int, steps: int) -> list[dict]:
  """A Trainer step with LoRA and with DoRA on every projection, and the loss of the model without adapters (its frozen
  forward, the yardstick), timed interleaved after 2 compiling calls each."""
  data = make_batch(cfg, batch, seq)
  Tensor.manual_seed(0)
  base = Model.from_config(cfg)
  loss = TinyJit(cpu_matmul_shapes()(lambda tokens, targets, mask: lm_loss(base(tokens), targets, mask).realize()))
  inputs = [Tensor(a) for a in data]
  fns, trainable = {"base forward": lambda: loss(*inputs)}, {"base forward": 0}
  for kind in ("lora", "dora"):
    Tensor.manual_seed(0)
    model = inject(Model.from_config(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False,
                                                      use_dora=kind == "dora"))
    trainer = Trainer(model, TrainConfig(lr=1e-4, warmup=0))
    fns[kind], trainable[kind] = lambda trainer=trainer: trainer.train_step([data]), sum(p.numel() for p in trainer.params)
  first = {k: [timed(f) for _ in range(2)] for k, f in fns.items()}
  counts, times = {k: counted(f) for k, f in fns.items()}, interleaved(fns, (), steps)
  rows = []
  for k, f in fns.items():
    kernel_s, by_name = kernel_profile(f)
    t = statistics.median(times[k])
    rows.append(dict(kind=k, batch=batch, seq=seq, r=r, step_s=t, tokens_per_s=batch * seq / t, step_gflop=counts[k][1] / 1e9,
                     kernels=counts[k][0], gflop_vs_base=counts[k][1] / counts["base forward"][1],
                     time_vs_base=t / statistics.median(times["base forward"]), first_steps_s=first[k], trainable=trainable[k],
                     load_avg=os.getloadavg()[0], kernel_s=kernel_s, slowest_kernels=[(n, c, round(s, 4)) for n, c, s in by_name[:8]]))
  return rows

def show(row: dict): print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sections", default="linear,step", help="comma-separated: linear,step")
  p.add_argument("--dims", default="1024", help="linear: comma-separated d")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--tokens", type=int, default=512, help="linear: tokens")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--model", default="{}", help="step: JSON overrides of bench/run.py's model config")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="step: timed steps of each kind (interleaved) after 2 compiling ones")
  p.add_argument("--json", help="write the results here")
  a = p.parse_args()
  sections, out = a.sections.split(","), {"machine": machine()}
  if "linear" in sections:
    out["linear"] = [row for d in map(int, a.dims.split(",")) for row in linear_rows(d, a.rank, a.tokens, a.reps)]
    for row in out["linear"]: show(row)
  if "step" in sections:
    out["step"] = step_rows({**MODEL, **json.loads(a.model)}, a.batch, a.seq, a.rank, a.steps)
    for row in out["step"]: show(row)
  if a.json: open(a.json, "w").write(json.dumps(out, indent=2))

if __name__ == "__main__":
  main()
