"""tinylora benchmarks. Prints markdown tables and, with --json, writes every number to a file.

  linear   one LoRA linear vs its base linear (T tokens, d x d): kernels, FLOPs and time for the forward and for
           forward + gradients (dx, dA, dB; the base: dx), next to the alternatives for the LoRA forward and the merged
           linear. Times are medians of interleaved TinyJit replays on realized inputs.
  model    Llama d=512, 4 layers, 8/4 heads, ffn 1376, vocab 4096, LoRA r=16 on q,k,v,o,gate,up,down, batch 4x256,
           AdamW through tinylora's Trainer: FLOP ratios, kernels per step, tokens/s, peak memory, summed kernel time.
  torch    torch + PEFT tokens/s on the same model and batch (skipped when torch, transformers or peft is missing).
  checkpoint  the same model's train step with and without TrainConfig(grad_checkpoint): step time (median of
           interleaved steps after the first), FLOPs and kernels per step, and the memory tinygrad holds in the steady
           state (the model, adapter and optimizer state, and the step's JIT buffers).
  startup  time to the first train step in fresh processes, with an empty compile cache (CACHEDB in a temp dir) and
           again with that cache filled.

  python bench/run.py                                  # linear, model, torch, checkpoint, startup
  python bench/run.py --quick                          # d=1024, r=16, fewer steps, no startup
  python bench/run.py --sections linear --dims 1024,2048,4096 --ranks 8,16,64 --json out.json
  python bench/run.py --device CUDA --torch-device cuda --model '{"hidden_size": 2048, "num_hidden_layers": 8}'
tinygrad's own settings pass through the environment (e.g. BEAM=1, DEBUG=2); the device is --device or DEV.
"""
from __future__ import annotations
from typing import Callable
import argparse, contextlib, io, json, os, platform, re, statistics, subprocess, sys, tempfile, time
START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
from tinygrad import Tensor, TinyJit, GlobalCounters, Device, Context, nn
from tinylora import LoraConfig, LoraLinear, inject
from tinylora.device_policy import base_forward, cpu_matmul_shapes
from tinylora.engine import peak_memory, set_default_device
from tinylora.models.decoder import Model
from tinylora.train import Trainer, TrainConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256)

def sync(): Device[Device.DEFAULT].synchronize()

def timed(fn, *args, wait: bool = True) -> float:
  st = time.perf_counter()
  fn(*args)
  if wait: sync()
  return time.perf_counter() - st

def counted(fn, *args) -> tuple[int, int]:
  """(kernels, FLOPs) of one call."""
  GlobalCounters.reset()
  fn(*args)
  sync()
  return GlobalCounters.kernel_count, GlobalCounters.global_ops

def interleaved(fns: dict, args: tuple, reps: int, wait: bool = True) -> dict[str, list[float]]:
  """Times every function `reps` times, alternating between them so that a load change hits all alike."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items(): times[k].append(timed(fn, *args, wait=wait))
  return times

# ---- one LoRA linear

def linear_case(d: int, r: int, T: int, reps: int) -> list[dict]:
  Tensor.manual_seed(0)
  layer = LoraLinear(nn.Linear(d, d, bias=False), r, scale=2.0, init=False)  # B random too, so merging changes W
  Tensor.realize(*nn.state.get_parameters(layer))  # nn.Linear leaves its random init lazy
  W, A, B, s = layer.base.weight, layer.lora_A, layer.lora_B, layer.scale
  merged = layer.fuse()
  x, g = Tensor.randn(T, d).realize(), Tensor.randn(T, d).realize()
  forwards = {
    "base": lambda x: base_forward(layer.base, x),  # as LoraLinear calls it (float32 on the CPU: tinylora's backward)
    "lora (tinylora)": layer,
    "fused x@W.T+(x@A.T)@B.T*s": lambda x: x @ W.T + (x @ A.T) @ B.T * s,
    "merged on the fly x@(W+s*B@A).T": lambda x: x @ (W + s * B @ A).T,
    "merged (fuse())": merged,
  }
  def with_grads(f, *targets):  # the output, and the gradients training needs: dx (for the layers below), dA, dB
    def fn(x):
      y = f(x)
      return [y, *(y * g).sum().gradient(x, *targets)]
    return fn
  backwards = {"base": with_grads(forwards["base"]), "lora (tinylora)": with_grads(layer, A, B),
               "fused x@W.T+(x@A.T)@B.T*s": with_grads(forwards["fused x@W.T+(x@A.T)@B.T*s"], A, B)}
  rows = []
  for mode, fns in (("forward", forwards), ("fwd+grad", backwards)):
    # with the CPU matmul shapes the Trainer's steps use
    jits = {k: TinyJit(cpu_matmul_shapes()(lambda x, f=f: Tensor.realize(*(out if isinstance(out := f(x), list) else [out]))))
            for k, f in fns.items()}
    for j in jits.values():
      for _ in range(3): j(x)  # run, capture, replay
    counts = {k: counted(j, x) for k, j in jits.items()}
    times = interleaved(jits, (x,), reps)
    base_t, (base_k, base_f) = statistics.median(times["base"]), counts["base"]
    for k in jits:
      t = statistics.median(times[k])
      rows.append(dict(d=d, r=r, tokens=T, mode=mode, variant=k, kernels=counts[k][0], extra_kernels=counts[k][0] - base_k,
                       gflop=counts[k][1] / 1e9, flop_ratio=counts[k][1] / base_f, ms=t * 1e3, ms_min=min(times[k]) * 1e3,
                       time_ratio=t / base_t, gflops=counts[k][1] / t / 1e9))
  return rows

# ---- the model

def analytic_forward_flops(cfg: dict, batch: int, seq: int, r: int) -> dict:
  """2 x (weights used in matmuls) x tokens + attention 4 x batch x layers x heads x seq^2 x head_dim. The weights are
  the 7 projections per layer, the LoRA A and B of each, and lm_head (the embedding is a lookup, norms are not counted);
  attention counts q@k.T and probs@v over the full seq x seq square (the causal mask is applied, not skipped)."""
  d, f, L, H, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads"))
  hd = d // H
  shapes = [(d, H * hd), (d, kv * hd), (d, kv * hd), (H * hd, d), (d, f), (d, f), (f, d)]  # (in, out)
  base = L * sum(i * o for i, o in shapes) + d * cfg["vocab_size"]
  lora = L * sum(r * (i + o) for i, o in shapes)
  tokens, attention = batch * seq, 4 * batch * L * H * seq * seq * hd
  return dict(params=base + lora, flops=2 * (base + lora) * tokens + attention, attention_flops=attention)

def build_model(cfg: dict, r: int) -> Model:
  Tensor.manual_seed(0)
  model = Model.from_config(cfg)
  return inject(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))

def make_batch(cfg: dict, batch: int, seq: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg["vocab_size"], (batch, seq + 1)).astype(np.int32)
  return tokens[:, :-1].copy(), tokens[:, 1:].copy(), np.ones((batch, seq), np.float32)

KERNEL_LINE = re.compile(r"\*\*\* \S+\s+\d+ (\S+)\s+arg\s+\d+ mem\s+\S+ GB tm\s+([\d.]+)(us|ms|s)/")

def kernel_profile(step) -> tuple[float, list[tuple[str, int, float]]]:
  """Runs `step` with DEBUG=2 (tinygrad then waits for and times every kernel): (summed kernel time, the kernels
  by name as (name, count, seconds), slowest first)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out), Context(DEBUG=2):
    GlobalCounters.reset()
    step()
    total = GlobalCounters.time_sum_s
  by_name: dict[str, list] = {}
  for line in out.getvalue().splitlines():
    if m := KERNEL_LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", line)):
      e = by_name.setdefault(m.group(1), [0, 0.0])
      e[0] += 1
      e[1] += float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(3)]
  return total, sorted(((k, n, t) for k, (n, t) in by_name.items()), key=lambda e: -e[2])

def use_autograd_base_backward():
  """The variant measured by --base-backward autograd: frozen linears as plain calls, so tinygrad's autograd derives
  their input gradients instead of tinylora.device_policy.linear."""
  import tinylora.lora, tinylora.models.decoder
  tinylora.lora.base_forward = tinylora.models.decoder.base_forward = lambda module, x: module(x)

def model_setup(cfg: dict, batch: int, seq: int, r: int) -> tuple[dict, Callable]:
  """Builds the model and its Trainer, counts FLOPs and kernels and runs the first (compiling) steps."""
  model = build_model(cfg, r)
  tokens, targets, mask = make_batch(cfg, batch, seq)
  fwd_kernels, fwd_flops = counted(lambda: model(Tensor(tokens)).realize())
  trainer = Trainer(model, TrainConfig(lr=1e-4, warmup=0))
  def step(): trainer.train_step([(tokens, targets, mask)])
  first = [timed(step) for _ in range(2)]  # JIT capture + compile + run, then the first replay
  step_kernels, step_flops = counted(step)
  analytic = analytic_forward_flops(cfg, batch, seq, r)
  return dict(config=cfg, batch=batch, seq=seq, r=r, lora_params=sum(p.numel() for p in trainer.params),
              forward_gflop=fwd_flops / 1e9, forward_kernels=fwd_kernels, analytic_gflop=analytic["flops"] / 1e9,
              forward_vs_analytic=fwd_flops / analytic["flops"], step_gflop=step_flops / 1e9,
              step_vs_forward=step_flops / fwd_flops, kernels_per_step=step_kernels, first_steps_s=first), step

def torch_setup(cfg: dict, batch: int, seq: int, r: int, device: str) -> tuple[dict, Callable | None, Callable | None]:
  """The same model, batch, loss, LoRA and AdamW (with gradient clipping) in torch + PEFT, warmed up. On the CPU the
  step runs with torch's default thread count and step_1thread with one thread (tinygrad's CPU device runs each kernel
  on one core); on a GPU step_1thread is None."""
  try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig as PeftConfig, get_peft_model
  except ImportError as e: return dict(skipped=str(e)), None, None
  torch.manual_seed(0)
  hf = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
  model = get_peft_model(LlamaForCausalLM(hf), PeftConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
  model.to(device)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  tokens, targets, mask = (torch.from_numpy(a).to(device) for a in make_batch(cfg, batch, seq))
  def step():
    logits = model(input_ids=tokens).logits.float().flatten(0, 1)
    nll = torch.nn.functional.cross_entropy(logits, targets.flatten().long(), reduction="none")
    loss = (nll * mask.flatten()).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    if device != "cpu": torch.cuda.synchronize(device)
  for _ in range(2): step()
  threads = torch.get_num_threads()
  def step_1thread():
    torch.set_num_threads(1)
    try: step()
    finally: torch.set_num_threads(threads)
  info = dict(torch=torch.__version__, device=device, threads=threads, attention=model.config._attn_implementation)
  return info, step, step_1thread if device == "cpu" else None

def model_bench(args, with_model: bool, with_torch: bool) -> dict:
  """Model steps and torch steps, as asked; both timed alternately so that they see the same machine load."""
  res, n = {}, args.batch * args.seq
  with peak_memory() as peak:
    m, step = model_setup(args.cfg, args.batch, args.seq, 16) if with_model else (None, None)
    t, torch_step, torch_1thread = (torch_setup(args.cfg, args.batch, args.seq, 16, args.torch_device) if with_torch
                                    else (None, None, None))
    steps = {k: f for k, f in (("tinygrad", step), ("torch", torch_step), ("torch_1thread", torch_1thread)) if f}
    # each step waits for its own device (the Trainer reads the loss back, the torch step synchronizes): a tinygrad
    # synchronize around torch's steps would make tinygrad's CUDA context current under torch, which then fails
    times = interleaved(steps, (), args.steps, wait=False)
    if step: kernel_sum, kernels = kernel_profile(step)
  if step:
    step_t = statistics.median(times["tinygrad"])
    m.update(step_s=step_t, step_s_min=min(times["tinygrad"]), tokens_per_s=n / step_t, step_gflops=m["step_gflop"] / step_t,
             kernel_time_sum_s=kernel_sum, step_vs_kernel_sum=step_t / kernel_sum, peak_mem_mb=peak.peak / 1e6,
             top_kernels=[dict(name=k, count=c, ms=s * 1e3, share=s / kernel_sum) for k, c, s in kernels[:args.top]])
    res["model"] = m
  if torch_step:
    tt = statistics.median(times["torch"])
    t.update(step_s=tt, step_s_min=min(times["torch"]), tokens_per_s=n / tt)
    if step: t.update(ratio=tt / step_t, ratio_min=min(times["torch"]) / min(times["tinygrad"]))
    if torch_1thread:
      t1 = statistics.median(times["torch_1thread"])
      t.update(step_1thread_s=t1, tokens_per_s_1thread=n / t1, **({"ratio_1thread": t1 / step_t} if step else {}))
  if t: res["torch"] = t
  return res

def checkpoint_bench(args) -> dict:
  """The bench model's steady-state step with and without gradient checkpointing, timed alternately."""
  batch, res, steps = [make_batch(args.cfg, args.batch, args.seq)], {}, {}
  for ckpt in (False, True):
    before = GlobalCounters.mem_used
    trainer = Trainer(build_model(args.cfg, 16), TrainConfig(lr=1e-4, warmup=0, grad_checkpoint=ckpt))
    steps[ckpt] = lambda t=trainer: t.train_step(batch)
    first_s = timed(steps[ckpt])
    with peak_memory() as peak: kernels, flops = counted(steps[ckpt])  # a replay: its peak is what the process holds
    res[ckpt] = dict(first_step_s=first_s, kernels=kernels, gflop=flops / 1e9, held_mb=(peak.peak - before) / 1e6)
  times = interleaved(steps, (), args.steps)
  for ckpt, r in res.items(): r.update(step_s=statistics.median(times[ckpt]), step_s_all=times[ckpt])
  no, yes = res[False], res[True]
  return dict(without=no, checkpointed=yes, time_ratio=yes["step_s"] / no["step_s"], flop_ratio=yes["gflop"] / no["gflop"],
              memory_ratio=yes["held_mb"] / no["held_mb"])

def startup_child(cfg: dict, batch: int, seq: int, r: int) -> dict:
  built = time.perf_counter()
  model = build_model(cfg, r)
  trainer, batches = Trainer(model, TrainConfig(lr=1e-4, warmup=0)), [make_batch(cfg, batch, seq)]
  ready = time.perf_counter()
  steps = [timed(trainer.train_step, batches) for _ in range(3)]
  return dict(import_s=built - START, build_s=ready - built, first_step_s=steps[0], second_step_s=steps[1],
              replay_step_s=steps[2], to_first_step_s=ready - START + steps[0])

def startup_bench(args) -> dict:
  """Two fresh processes sharing a new, empty compile cache: the first compiles everything, the second finds it cached."""
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, CACHEDB=os.path.join(tmp, "cache.db"), DEV=args.device)
    cmd = [sys.executable, os.path.abspath(__file__), "--startup-child", "--batch", str(args.batch), "--seq", str(args.seq),
           "--model", args.model, "--base-backward", args.base_backward]
    runs = [json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(2)]
  return dict(cold=runs[0], warm=runs[1])

# ---- output

def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
  """A markdown table; cols are (key, header, format)."""
  lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  lines += ["| " + " | ".join(format(row[k], f) for k, _, f in cols) + " |" for row in rows]
  return "\n".join(lines)

def machine() -> dict:
  cpu = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
  return dict(cpu=cpu, cores=os.cpu_count(), device=Device.DEFAULT, python=platform.python_version(),
              load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None)

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sections", default="linear,model,torch,checkpoint,startup",
                 help="comma-separated: linear,model,torch,checkpoint,startup")
  p.add_argument("--dims", default="1024,2048", help="linear: d values (4096 works, slowly on a CPU)")
  p.add_argument("--ranks", default="8,16,64", help="linear: LoRA ranks")
  p.add_argument("--tokens", type=int, default=512, help="linear: tokens")
  p.add_argument("--reps", type=int, default=7, help="linear: timed replays per variant")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="model, torch and checkpoint: timed steps (alternating)")
  p.add_argument("--top", type=int, default=10, help="model: slowest kernels to list")
  p.add_argument("--model", default="{}", help="model and torch: JSON overrides of the model config, e.g. "
                 "'{\"hidden_size\": 2048, \"num_hidden_layers\": 8}'")
  p.add_argument("--device", default=os.environ.get("DEV", "CPU"), help="tinygrad device (DEV)")
  p.add_argument("--torch-device", default="cpu", help="torch: device for torch + PEFT (cpu, cuda)")
  p.add_argument("--base-backward", choices=("tinylora", "autograd"), default="tinylora",
                 help="model: float32 frozen linears backpropagate through tinylora.device_policy.linear (the "
                 "library's choice on the CPU) or tinygrad's autograd")
  p.add_argument("--quick", action="store_true", help="d=1024, r=16, 3 reps and steps, no startup section")
  p.add_argument("--json", help="write all results here")
  p.add_argument("--startup-child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  set_default_device(args.device)
  args.cfg = MODEL | json.loads(args.model)
  if args.base_backward == "autograd": use_autograd_base_backward()
  sys.stdout.reconfigure(line_buffering=True)
  if args.startup_child: return print(json.dumps(startup_child(args.cfg, args.batch, args.seq, 16)))
  if args.quick: args.dims, args.ranks, args.reps, args.steps = "1024", "16", 3, 3
  sections = args.sections.split(",")
  if args.quick and "--sections" not in sys.argv: sections.remove("startup")
  res: dict = dict(machine=machine())
  print(f"# tinylora bench: {res['machine']['cpu']}, {res['machine']['cores']} cores, {Device.DEFAULT}, "
        f"load {res['machine']['load_avg']}\n")
  if "linear" in sections:
    res["linear"] = [row for d in map(int, args.dims.split(",")) for r in map(int, args.ranks.split(","))
                     for row in linear_case(d, r, args.tokens, args.reps)]
    print(f"## One linear, {args.tokens} tokens (time: median of {args.reps} TinyJit replays; ratios vs base)\n")
    print(table(res["linear"], [("d", "d", "d"), ("r", "r", "d"), ("mode", "mode", "s"), ("variant", "variant", "s"),
                                ("kernels", "kernels", "d"), ("extra_kernels", "extra", "+d"), ("gflop", "GFLOP", ".3f"),
                                ("flop_ratio", "FLOP ratio", ".3f"), ("ms", "ms", ".2f"), ("time_ratio", "time ratio", ".2f"),
                                ("gflops", "GFLOP/s", ".1f")]) + "\n")
  if "model" in sections or "torch" in sections:
    res.update(model_bench(args, "model" in sections, "torch" in sections))
    c, rows = args.cfg, []
    print(f"## Llama d={c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
          f"{c['num_key_value_heads']} heads, ffn {c['intermediate_size']}, vocab {c['vocab_size']}, LoRA r=16 on 7 "
          f"linears, batch {args.batch}x{args.seq}, AdamW (tinylora Trainer, {args.base_backward} base backward)\n")
    if m := res.get("model"):
      rows += [("forward GFLOP (tinygrad count)", f"{m['forward_gflop']:.2f}"),
               ("analytic forward GFLOP (2*params*tokens + 4*B*L*H*T^2*hd)", f"{m['analytic_gflop']:.2f}"),
               ("forward / analytic (target <= 1.25)", f"{m['forward_vs_analytic']:.3f}"),
               ("train step GFLOP (_accumulate + _apply)", f"{m['step_gflop']:.2f}"),
               ("train step / forward (target <= 2.2)", f"{m['step_vs_forward']:.3f}"),
               ("kernels: forward / train step", f"{m['forward_kernels']} / {m['kernels_per_step']}"),
               ("step time, median (min)", f"{m['step_s']:.3f} s ({m['step_s_min']:.3f} s)"),
               ("tokens/s (median step)", f"{m['tokens_per_s']:.0f}"), ("GFLOP/s", f"{m['step_gflops']:.1f}"),
               ("summed kernel time (DEBUG=2)", f"{m['kernel_time_sum_s']:.3f} s"),
               ("step time / summed kernel time (target <= 1.05)", f"{m['step_vs_kernel_sum']:.3f}"),
               ("first steps (JIT capture + compile, first replay)", ", ".join(f"{t:.1f} s" for t in m["first_steps_s"])),
               ("peak tinygrad memory (mem_used high-water)", f"{m['peak_mem_mb']:.0f} MB")]
    if (t := res.get("torch")) and "skipped" in t: rows.append(("torch + PEFT", f"skipped ({t['skipped']})"))
    elif t:
      where = f"{t['threads']} threads" if t["device"] == "cpu" else t["device"]
      rows += [(f"torch {t['torch']} + PEFT ({where}, {t['attention']}): step median (min)",
                f"{t['step_s']:.3f} s ({t['step_s_min']:.3f} s)"), ("torch tokens/s", f"{t['tokens_per_s']:.0f}")]
      if "ratio" in t: rows.append(("tinygrad / torch tokens/s, by median (by min) step (target >= 0.25)",
                                    f"{t['ratio']:.3f} ({t['ratio_min']:.3f})"))
      if "step_1thread_s" in t:
        rows.append(("torch on 1 thread: step median, tokens/s" + (", tinygrad / torch" if "ratio" in t else ""),
                     f"{t['step_1thread_s']:.3f} s, {t['tokens_per_s_1thread']:.0f}" +
                     (f", {t['ratio_1thread']:.3f}" if "ratio" in t else "")))
    print(table([dict(k=k, v=v) for k, v in rows], [("k", "quantity", "s"), ("v", "value", "s")]) + "\n")
    if m:
      print("slowest kernels in one step:\n")
      print(table(m["top_kernels"], [("name", "kernel", "s"), ("count", "count", "d"), ("ms", "ms", ".1f"),
                                     ("share", "share", ".1%")]) + "\n")
  if "checkpoint" in sections:
    c = res["checkpoint"] = checkpoint_bench(args)
    print(f"## Gradient checkpointing (median of {args.steps} alternating steps after the first)\n")
    print(table([dict(mode=k, **c[k]) for k in ("without", "checkpointed")],
                [("mode", "grad_checkpoint", "s"), ("step_s", "step s", ".3f"), ("gflop", "GFLOP/step", ".2f"),
                 ("kernels", "kernels/step", "d"), ("held_mb", "held in the steady state MB", ".0f"),
                 ("first_step_s", "step 1 s", ".1f")]) + "\n")
    print(f"checkpointed / without: time {c['time_ratio']:.3f}x, FLOPs {c['flop_ratio']:.3f}x, memory {c['memory_ratio']:.3f}x\n")
  if "startup" in sections:
    s = res["startup"] = startup_bench(args)
    print("## Time to the first train step (fresh processes)\n")
    print(table([dict(cache=k, **v) for k, v in s.items()],
                [("cache", "compile cache", "s"), ("import_s", "imports s", ".1f"), ("build_s", "model s", ".1f"),
                 ("first_step_s", "step 1 (JIT capture) s", ".1f"), ("second_step_s", "step 2 s", ".1f"),
                 ("replay_step_s", "step 3 s", ".2f"), ("to_first_step_s", "start to end of step 1 s", ".1f")]) + "\n")
  res["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  if args.json:
    with open(args.json, "w") as f: json.dump(res, f, indent=1)

if __name__ == "__main__": main()
