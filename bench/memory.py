"""Peak training memory by model shape, base dtype and gradient checkpointing, and the losses of float16/bfloat16
training against float32.

  memory   tinygrad's allocator high-water mark (tinylora.engine.peak_memory) in each of the first three Trainer steps
           (JIT capture and first run, replays): the largest, and the last replay's (the steady state), at 4x512
           tokens, LoRA r=16 on q,k,v,o,gate,up,down of every layer, AdamW: for the bench model, a SmolLM2-135M-, a
           Llama-3.2-1B-, a Qwen3-0.6B- and a Gemma-3-1B-shaped config (the last two: large vocabularies); base
           float32 / float16 / bfloat16 / 4-bit g64 (tinylora.quant.quantize of a float16 model), with and without
           TrainConfig(grad_checkpoint). Each case runs
           in its own process on --device; DEV=NULL allocates and schedules every buffer as a real device would but runs
           no kernel, so its high-water mark is that of the same step without the compute (shapes too slow to run here).
           Also the last step's FLOPs (GlobalCounters.global_ops), which NULL counts as a real device would.
  losses   10 steps of the bench model (4x256 tokens of a learnable sequence task) in float16 and bfloat16 against the
           float32 run: the largest relative loss difference.

  python bench/memory.py --sections memory --models bench --device CPU
  python bench/memory.py --sections memory --models bench,smollm2-135m,llama-1b --device NULL
  python bench/memory.py --sections memory --models qwen3-0.6b,gemma3-1b --bases float32 --grad-checkpoint no --device NULL
  CC=clang-19 python bench/memory.py --sections losses          # bfloat16 on x86 needs clang >= 15
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
  "bench": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=4096),
  "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
  "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
  "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
  "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=256, vocab_size=262144, query_pre_attn_scalar=256, sliding_window=512,
                    tie_word_embeddings=True),
}
BASES = ["float32", "float16", "bfloat16", "4bit"]

def build(name: str, base: str, seq: int):
  from tinygrad import Tensor, dtypes
  import tinylora as tl
  from tinylora.models import Model
  from tinylora.quant import quantize
  Tensor.manual_seed(0)
  model = Model.from_config(dict(MODELS[name], max_position_embeddings=seq), dtype=getattr(dtypes, "float16" if base == "4bit" else base))
  if base == "4bit": quantize(model, bits=4, group_size=64)
  return tl.inject(model, tl.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))

def pattern_batch(vocab: int, batch: int, seq: int, step: int):
  """Sequences s, s+1, s+2, ... (mod vocab) from random starts: learnable from the previous token alone."""
  import numpy as np
  starts = np.random.default_rng(step).integers(0, vocab, (batch, 1))
  tokens = ((starts + np.arange(seq + 1)) % vocab).astype(np.int32)
  return tokens[:, :-1].copy(), tokens[:, 1:].copy(), np.ones((batch, seq), np.float32)

def measure_one(name: str, base: str, ckpt: bool, batch: int, seq: int, steps: int, loss: str = "chunked") -> dict:
  from tinygrad import Device, GlobalCounters
  from tinylora.errors import LoraError
  from tinylora.engine import peak_memory
  from tinylora.models.decoder import callable_as_function
  from tinylora.train import Trainer, TrainConfig, lm_loss
  try: model = build(name, base, seq)
  except LoraError as e: return dict(refused=str(e))
  full = (lambda m, tokens, targets, mask: lm_loss(m(tokens), targets, mask)) if loss == "full" else None
  trainer = Trainer(model, TrainConfig(iters=steps, warmup=0, grad_checkpoint=ckpt), loss_fn=full)
  held, st, peaks = GlobalCounters.mem_used, time.perf_counter(), []  # held: weights, LoRA tensors, gradients, AdamW state
  for step in range(steps):  # step 1 captures the Trainer's TinyJits and runs them, later steps replay them
    GlobalCounters.reset()
    with peak_memory() as peak: trainer.train_step([pattern_batch(MODELS[name]["vocab_size"], batch, seq, step)])
    peaks.append(peak.peak)
  # the last step's FLOPs and kernel launches (a replay when steps > 1; a device graph counts as one launch)
  return dict(held=held, peak=max(peaks), replay_peak=peaks[-1], step_peaks=peaks, largest=peak.largest, device=Device.DEFAULT,
              kernels=GlobalCounters.kernel_count, gflops=GlobalCounters.global_ops / 1e9,
              seconds=time.perf_counter() - st, checkpointed_layers=sum(map(callable_as_function, model.model.layers)) if ckpt else 0)

def memory(models: list[str], bases: list[str], checkpoint: list[bool], device: str, batch: int, seq: int, steps: int,
           loss: str = "chunked") -> list[dict]:
  rows = []
  for name in models:
    for base in bases:
      for ckpt in checkpoint:
        case = dict(model=name, base=base, grad_checkpoint=ckpt, batch=batch, seq=seq, loss=loss)
        env = dict(os.environ, DEV=device, NULL_ALLOW_COPYOUT="1")  # NULL: the loss read back is 0, not computed
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(dict(case, steps=steps))], env=env,
                             capture_output=True, text=True)
        if out.returncode: case["error"] = out.stderr.strip().splitlines()[-1]
        else: case.update(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(case), file=sys.stderr, flush=True)
        rows.append(case)
  return rows

def losses(batch: int, seq: int, steps: int) -> dict:
  from tinygrad import dtypes
  from tinylora.errors import LoraError
  from tinylora.train import Trainer, TrainConfig
  out = {}
  for base in ("float32", "float16", "bfloat16"):
    try: model = build("bench", base, seq)
    except LoraError as e:
      out[base] = dict(refused=str(e))
      continue
    trainer, run, skipped = Trainer(model, TrainConfig(lr=1e-3, iters=steps, warmup=2)), [], 0
    while trainer.step < steps:
      loss, _ = trainer.train_step([pattern_batch(MODELS["bench"]["vocab_size"], batch, seq, trainer.step)])
      if trainer.last_skipped: skipped += 1
      else: run.append(loss)
    out[base] = dict(losses=run, skipped=skipped)
    print(base, [round(l, 4) for l in run], file=sys.stderr, flush=True)
  ref = out["float32"]["losses"]
  for base in ("float16", "bfloat16"):
    if "losses" in out[base]: out[base]["max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(out[base]["losses"], ref))
  return out

def mb(n: int) -> str: return f"{n / 1e6:,.0f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"

def print_memory(rows: list[dict]):
  print("| model | base | grad checkpoint | device | held before the step | peak, first steps | peak, JIT replay |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    what = r.get("refused") or r.get("error")
    cells = [what] * 3 if what else [mb(r["held"]), mb(r["peak"]), mb(r["replay_peak"]) if "replay_peak" in r else "-"]
    ckpt = ("yes" if r["checkpointed_layers"] else "asked, not applied") if r["grad_checkpoint"] and not what else ("yes" if r["grad_checkpoint"] else "no")
    print(f"| {r['model']} | {r['base']} | {ckpt} | {r.get('device', '')} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="memory,losses")
  p.add_argument("--models", default="bench,smollm2-135m,llama-1b")
  p.add_argument("--bases", default=",".join(BASES))
  p.add_argument("--device", default=os.environ.get("DEV", "CPU"), help="device for the memory cases (NULL: run nothing)")
  p.add_argument("--grad-checkpoint", default="no,yes", help="the cases without (no) and with (yes) TrainConfig(grad_checkpoint)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--loss", choices=("chunked", "full"), default="chunked", help="the Trainer's default loss (chunked over "
                 "positions when the logits are large) or lm_loss on the whole logits, to compare")
  p.add_argument("--json", help="write every number to this file")
  p.add_argument("--one", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    c = json.loads(args.one)
    print(json.dumps(measure_one(c["model"], c["base"], c["grad_checkpoint"], c["batch"], c["seq"], c["steps"], c["loss"])))
    sys.exit(0)
  results = {}
  if "memory" in args.sections:
    results["memory"] = memory(args.models.split(","), args.bases.split(","),
                                [c == "yes" for c in args.grad_checkpoint.split(",")], args.device, 4, 512, args.steps, args.loss)
    print_memory(results["memory"])
  if "losses" in args.sections:
    results["losses"] = losses(4, 256, 10)
    for base in ("float16", "bfloat16"):
      r = results["losses"][base]
      print(f"{base}: " + (r["refused"] if "refused" in r else f"max relative loss difference to float32 over 10 steps {r['max_rel_diff']:.2%}"))
  if args.json:
    with open(args.json, "w") as f: json.dump(results, f, indent=1)
