"""Fine-tune a Llama-family model with LoRA, then save the adapter (HF PEFT format), fuse it and save the merged model.

With no arguments it runs an embedded default: a small Llama built from a config below, a generated question/answer
dataset, a byte tokenizer; nothing is downloaded. On a real model:
  python examples/finetune.py --model ~/models/Qwen2.5-0.5B-Instruct --data ~/data/my_task --iters 600
where --data holds train.jsonl / valid.jsonl in mlx-lm's formats: {"text"}, {"prompt", "completion"} or {"messages"}.
"""
from __future__ import annotations
import argparse, json, pathlib, random
import numpy as np
from tinygrad import Tensor, Device
import tinylora as tl
from tinylora.data import encode_example, eval_batches, load_dataset
from tinylora.generate import generate
from tinylora.models import Model, load_pretrained, save_pretrained
from tinylora.tokenizer import ByteTokenizer, load_tokenizer
from tinylora.train import Trainer, TrainConfig, fit

DEFAULT_MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": ByteTokenizer().vocab_size,
                 "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red",
          "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "lemon": "yellow", "cherry": "red",
          "orange": "orange", "plum": "purple", "cloud": "grey", "ash": "grey", "rose": "red", "banana": "yellow"}
QUESTIONS = ["What color is the {}?", "Which color does the {} have?", "Tell me the color of the {}.", "The {} is what color?"]

def demo_dataset(seed: int = 0) -> tuple[list[dict], list[dict]]:
  """Question/answer pairs about colors; the last question phrasing is held out for validation."""
  rows = [{"prompt": f"Q: {q.format(thing)}\nA:", "completion": f" The {thing} is {color}."}
          for q in QUESTIONS for thing, color in COLORS.items()]
  train, valid = rows[:-len(COLORS)], rows[-len(COLORS):]
  random.Random(seed).shuffle(train)
  return train, valid

def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", help="local HF model directory (default: a small built-in Llama, random init)")
  p.add_argument("--data", help="directory with train.jsonl and valid.jsonl (default: a generated demo set)")
  p.add_argument("--out", default="runs/finetune", help="output directory: checkpoints/, adapter/, merged/")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                 help="comma-separated module names, or all-linear")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--iters", type=int, default=150)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
  p.add_argument("--seq-len", type=int, default=48)
  p.add_argument("--grad-clip", type=float, default=1.0)
  p.add_argument("--val-every", type=int, default=25)
  p.add_argument("--save-every", type=int, default=50)
  p.add_argument("--no-mask-prompt", action="store_true", help="train on the prompt tokens too")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()

def main() -> None:
  args = parse_args()
  out = pathlib.Path(args.out)
  Tensor.manual_seed(args.seed)
  if args.model:
    model, tokenizer = load_pretrained(args.model), load_tokenizer(args.model)
  else:
    model, tokenizer = Model.from_config(DEFAULT_MODEL), ByteTokenizer()
  if args.data:
    mask = not args.no_mask_prompt
    train = load_dataset(pathlib.Path(args.data) / "train.jsonl", tokenizer, mask)
    valid = load_dataset(pathlib.Path(args.data) / "valid.jsonl", tokenizer, mask)
    sample = json.loads((pathlib.Path(args.data) / "valid.jsonl").read_text().splitlines()[0])
  else:
    train_rows, valid_rows = demo_dataset(args.seed)
    train = [encode_example(r, tokenizer, not args.no_mask_prompt) for r in train_rows]
    valid = [encode_example(r, tokenizer, not args.no_mask_prompt) for r in valid_rows]
    sample = valid_rows[0]
  prompt = sample.get("prompt") or sample.get("text", "")[:40] or \
           tokenizer.apply_chat_template(sample["messages"][:-1], add_generation_prompt=True)

  targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
  tl.inject(model, tl.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets))
  trainable, total = tl.count_parameters(model)
  print(f"device {Device.DEFAULT} | {len(train)} train / {len(valid)} valid examples | "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

  def sample_text() -> str:
    ids = generate(model, tokenizer.encode(prompt), max_new_tokens=24, stop_tokens=[tokenizer.eos_id])
    return tokenizer.decode(ids)
  print(f"before: {prompt!r} -> {sample_text()!r}")

  trainer = Trainer(model, TrainConfig(lr=args.lr, iters=args.iters, warmup=args.warmup, grad_clip=args.grad_clip,
                                       accum_steps=args.accum))
  if args.resume: print(f"resumed at step {trainer.load_checkpoint(out / 'checkpoints')['step']}")
  first_val = trainer.evaluate(eval_batches(valid, args.batch_size, args.seq_len, tokenizer.pad_id, max_batches=8))
  history = fit(trainer, train, valid, args.batch_size, args.seq_len, seed=args.seed, pad_id=tokenizer.pad_id,
                val_every=args.val_every, checkpoint_dir=out / "checkpoints", save_every=args.save_every)
  last_val = next(h["val_loss"] for h in reversed(history) if "val_loss" in h) if history else first_val
  print(f"validation loss {first_val:.3f} -> {last_val:.3f} ({100 * (first_val - last_val) / first_val:.0f}% lower)")
  print(f"after: {prompt!r} -> {sample_text()!r}")

  tl.save_adapter(model, out / "adapter")
  tokens = Tensor([tokenizer.encode(prompt)])
  adapted = model(tokens).numpy()
  tl.merge_and_unload(model)
  save_pretrained(model, out / "merged")
  reloaded = load_pretrained(out / "merged")(tokens).numpy()
  print(f"saved {out / 'adapter'} (PEFT) and {out / 'merged'} (HF checkpoint); "
        f"max |merged reload - adapter| logits = {np.abs(reloaded - adapted).max():.2e}")

if __name__ == "__main__":
  main()
