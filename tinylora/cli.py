"""The `tinylora` command line (also `python -m tinylora`), with mlx-lm's flag names where mlx-lm has one:

  tinylora train --model M --data D --train [--iters N --batch-size B --learning-rate LR --num-layers N --dora ...]
                 [--mode dpo|orpo --beta 0.1]
  tinylora fuse --model M --adapter-path A --save-path OUT
  tinylora generate --model M [--adapter-path A] --prompt "..." [--max-tokens N --temp T]
  tinylora chat --model M [--adapter-path A] [--system "..."]
  tinylora convert --model M --adapter-path IN --save-path OUT --format mlx|peft|gguf
  tinylora serve --model M [--adapter NAME=PATH ...] [--host 127.0.0.1 --port 8080 --max-batch 8]

A model is a local Hugging Face directory (config.json, safetensors, tokenizer.json) or a .gguf file. Errors print one
line and exit with status 1 (2 for a bad command line)."""
from __future__ import annotations
import argparse, json, math, os, pathlib, signal, sys
from typing import Iterator, Sequence
from tinygrad import Tensor
import tinylora as tl
from tinylora.config import ALL_LINEAR
from tinylora.data import LOSS_ON, eval_batches, load_dataset, packed_eval_batches
from tinylora.errors import LoraError
from tinylora.formats import (ADAPTER_FORMATS, adapter_path, checkpoint, detect_adapter_format,
                              load_adapter, load_pretrained, load_tokenizer, save_adapter, save_pretrained)
from tinylora.generate import stream_generate
from tinylora.preference import LOSSES, load_pairs, pair_batch_at, pair_eval_batches
from tinylora.quant import QuantizedLinear, dequantize
from tinylora.server import Engine, model_id, serve as serve_http
from tinylora.train import OPTIMIZERS, SCHEDULES, Trainer, TrainConfig, fit


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, not argparse's usage block
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

def _model_flag(p: argparse.ArgumentParser):
  p.add_argument("--model", required=True, help="the base model: a local Hugging Face directory or a .gguf file")

def _sampling_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--adapter-path", help="an adapter to apply, in any format load_adapter reads (detected)")
  p.add_argument("--max-tokens", type=int, default=100, help="most new tokens per reply (default 100)")
  p.add_argument("--temp", type=float, default=0.0, help="sampling temperature, 0 for greedy (default 0)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1)")
  p.add_argument("--seed", type=int, help="random seed for sampling")

def _train_parser(sub) -> None:
  p = sub.add_parser("train", help="fine-tune a LoRA or DoRA adapter", description="Fine-tunes an adapter on --data "
                     "(train.jsonl, valid.jsonl, test.jsonl in mlx-lm's formats: text, prompt/completion or messages) "
                     "and saves it to --adapter-path. Flags may also come from a JSON or YAML file (-c); the command "
                     "line wins.")
  p.add_argument("--model", help="the base model: a local Hugging Face directory or a .gguf file")
  p.add_argument("-c", "--config", help="JSON or YAML file of flag values (keys as the flags, '-' written '_'; mlx-lm's "
                 "lora_parameters {rank, scale, dropout, keys} and fine_tune_type are understood too)")
  p.add_argument("--data", help="directory with train.jsonl and valid.jsonl (and test.jsonl for --test)")
  p.add_argument("--train", action="store_true", default=None, help="train (mlx-lm's switch)")
  p.add_argument("--test", action="store_true", default=None, help="report the loss on test.jsonl after training")
  p.add_argument("--iters", type=int, help="optimizer steps (default 1000)")
  p.add_argument("--batch-size", type=int, help="sequences per step (default 4)")
  p.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-5, mlx-lm's)")
  p.add_argument("--warmup", type=int, help="linear warmup steps before the learning-rate schedule (default 0)")
  p.add_argument("--lr-schedule", choices=SCHEDULES, help="after the warmup: cosine (the default) or linear decay to a "
                 "tenth of the rate, or constant")
  p.add_argument("--optimizer", choices=list(OPTIMIZERS), help="adamw (the default), adam, sgd or muon (tinygrad's); "
                 "their settings from the -c config's optimizer_config (mlx-lm's spelling, e.g. {adamw: {betas: [0.9, "
                 "0.98], eps: 1e-6, weight_decay: 0.01}})")
  p.add_argument("--num-layers", type=int, help="adapt the last N decoder layers, -1 for all (default 16)")
  p.add_argument("--max-seq-length", type=int, help="tokens per sequence; longer examples are truncated (default 2048)")
  p.add_argument("--pack", action="store_true", default=None, help="pack several examples into each sequence of "
                 "--max-seq-length, each attending only to itself (same loss and gradients, less padding; sft only)")
  p.add_argument("--loss-on", choices=LOSS_ON, help="what the loss sees: every assistant reply of chat data and the "
                 "completion of prompt/completion data (assistant, the default, as in the example), the last message "
                 "only (last), or every token (all)")
  p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None, help="mlx-lm's flag: "
                 "--mask-prompt is --loss-on last, --no-mask-prompt is --loss-on all")
  p.add_argument("--mode", choices=("sft", *LOSSES), help="sft: supervised (the default); dpo or orpo: preference "
                 "tuning on rows of prompt, chosen and rejected (TRL's formats), DPO's reference being the base model "
                 "with the adapter disabled; --batch-size counts pairs")
  p.add_argument("--beta", type=float, help="DPO's beta / ORPO's lambda (default 0.1)")
  p.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
  p.add_argument("--alpha", type=float, help="LoRA alpha; the scale is alpha / r (default 2 * rank)")
  p.add_argument("--dropout", type=float, help="dropout on the adapter's input (default 0)")
  p.add_argument("--targets", help="comma-separated module names, or all-linear (default: every projection of each adapted "
                 "layer, the output head excepted: q,k,v,o,gate,up,down_proj; Phi-3's fused qkv_proj and gate_up_proj)")
  p.add_argument("--dora", action="store_true", default=None, help="train DoRA instead of LoRA")
  p.add_argument("--adapter-path", help="where the adapter and its checkpoints are written (default adapters)")
  p.add_argument("--format", choices=list(ADAPTER_FORMATS), help="adapter file format (default peft)")
  p.add_argument("--resume-adapter-file", help="start from this adapter directory, or continue from the checkpoint "
                 "directory of an earlier run (ADAPTER_PATH/checkpoints) with its optimizer state and step")
  p.add_argument("--steps-per-eval", type=int, help="validate every N steps (default 200)")
  p.add_argument("--val-batches", type=int, help="validation batches, -1 for the whole set (default 25)")
  p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100)")
  p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute each layer in the backward "
                 "instead of keeping its activations (less memory)")
  p.add_argument("--devices", help="comma-separated devices to train on data-parallel, e.g. CUDA:0,CUDA:1")
  p.add_argument("--dequantize", action="store_true", default=None, help="with a .gguf model, train on a float32 copy "
                 "of its Q4_0/Q4_1/Q8_0 weights instead of the packed weights as they are (the default, as "
                 "examples/finetune.py: half the memory, about the float32 step time on the CPU)")
  p.add_argument("--seed", type=int, help="random seed (default 0)")

TRAIN_DEFAULTS = dict(train=False, test=False, iters=1000, batch_size=4, learning_rate=1e-5, warmup=0, num_layers=16,
                      max_seq_length=2048, pack=False, loss_on=None, mask_prompt=None, mode="sft", beta=0.1, optimizer="adamw",
                      optimizer_config=None, lr_schedule="cosine", rank=8, alpha=None, dropout=0.0, targets=ALL_LINEAR, dora=False,
                      adapter_path="adapters", format="peft", resume_adapter_file=None, steps_per_eval=200,
                      val_batches=25, save_every=100, grad_checkpoint=False, devices=None, dequantize=False, seed=0, model=None, data=None)

def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="tinylora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  _train_parser(sub)
  f = sub.add_parser("fuse", help="fold an adapter into the model and save it", description="Loads --model with the "
                     "adapter at --adapter-path, folds it into the weights and saves a plain model (HF directory with "
                     "the tokenizer, or a .gguf file with --export-gguf).")
  _model_flag(f)
  f.add_argument("--adapter-path", default="adapters", help="the adapter, in any format load_adapter reads (detected; default adapters)")
  f.add_argument("--save-path", default="fused_model", help="where the fused model goes (default fused_model)")
  f.add_argument("--de-quantize", action="store_true", help="save a de-quantized model: every quantized layer, fused or "
                 "not, as float weights (default: quantize the fused weights again with the base's bits and group size)")
  f.add_argument("--export-gguf", action="store_true", help="write one llama.cpp .gguf file at --save-path")
  g = sub.add_parser("generate", help="generate text", description="Greedy or sampled generation from --prompt, with "
                     "the model's chat template unless --ignore-chat-template, printed as the tokens come.")
  _model_flag(g)
  _sampling_flags(g)
  g.add_argument("--prompt", required=True, help="the prompt text")
  g.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as it is")
  t = sub.add_parser("chat", help="chat with a model in the terminal", description="A multi-turn chat on stdin/stdout "
                     "with the model's chat template (and an adapter). /reset starts a new conversation; /quit, an "
                     "empty line at end of input or Ctrl-C ends it.")
  _model_flag(t)
  _sampling_flags(t)
  t.add_argument("--system", help="a system message opening every conversation")
  v = sub.add_parser("serve", help="serve the model and its adapters over an OpenAI-compatible HTTP API",
                     description="Answers /v1/chat/completions and /v1/completions (streaming or not) for --model and "
                     "every --adapter, listed by /v1/models; /v1/load_lora_adapter and /v1/unload_lora_adapter change "
                     "the adapters while serving. Requests share each decode step whatever adapter they use. A GGUF is "
                     "dequantized to float32 (the faster replies on a CPU) unless --qlora. Ctrl-C (or SIGTERM) stops "
                     "taking requests, lets the running ones finish and exits; a second one ends them too.")
  _model_flag(v)
  v.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                 help="an adapter to serve as model NAME, in any format load_adapter reads (repeatable)")
  v.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
  v.add_argument("--port", type=int, default=8080, help="the port (default 8080; 0 picks a free one)")
  v.add_argument("--served-model-name", help="the base model's id in the API (default: the model's directory or file name)")
  v.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8); more wait in the queue")
  v.add_argument("--max-len", type=int, help="the context per request, prompt and reply (default: the model's, at most 2048)")
  v.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429 is answered (default 64)")
  v.add_argument("--prefill-chunk", type=int, default=32, help="prompt tokens cached per prefill step (default 32)")
  v.add_argument("--qlora", action="store_true", help="keep a GGUF's Q4/Q8 weights packed (less memory, slower replies on the CPU)")
  c = sub.add_parser("convert", help="rewrite an adapter in another format", description="Loads the adapter at "
                     "--adapter-path onto --model (checking every tensor) and writes it to --save-path in --format.")
  _model_flag(c)
  c.add_argument("--adapter-path", required=True, help="the adapter, in any format load_adapter reads (detected)")
  c.add_argument("--save-path", required=True, help="output directory (a .gguf file for --format gguf)")
  c.add_argument("--format", required=True, choices=list(ADAPTER_FORMATS), help="the format to write")
  return p

def _load_model(path: str, dequantize: bool = False):
  """The model at `path`; a GGUF's Q4/Q8 weights stay packed unless `dequantize` (a GGUF computes in float32)."""
  if not pathlib.Path(path).exists(): raise FileNotFoundError(f"model not found: {path}")
  return load_pretrained(path, dequantize=dequantize)

def _config_values(path: str) -> dict:
  """Flag values from a JSON or YAML file, in the flags' underscore spelling."""
  text = pathlib.Path(path).read_text()
  if path.endswith((".yaml", ".yml")):
    try: import yaml
    except ImportError: raise LoraError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the config as JSON") from None
    values = yaml.safe_load(text)
  else:
    try: values = json.loads(text)
    except json.JSONDecodeError as e: raise LoraError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(values, dict): raise LoraError(f"{path}: expected a mapping of flag names to values")
  values = {k.replace("-", "_"): v for k, v in values.items()}
  if (kind := values.pop("fine_tune_type", None)) is not None:
    if kind not in ("lora", "dora"): raise LoraError(f"{path}: fine_tune_type={kind!r}: tinylora trains 'lora' or 'dora'")
    values.setdefault("dora", kind == "dora")
  if isinstance(params := values.pop("lora_parameters", None), dict):
    if "rank" in params: values.setdefault("rank", params["rank"])
    if "dropout" in params: values.setdefault("dropout", params["dropout"])
    if "keys" in params: values.setdefault("targets", ",".join(k.rsplit(".", 1)[-1] for k in params["keys"]))
    if "scale" in params: values.setdefault("alpha", params["scale"] * values.get("rank", TRAIN_DEFAULTS["rank"]))
  if unknown := sorted(set(values) - set(TRAIN_DEFAULTS)): raise LoraError(f"{path}: unknown option(s) {unknown}")
  return values

def _optimizer_settings(optimizer: str, config: dict | None) -> dict:
  """TrainConfig's optimizer_config and weight_decay from a config file's optimizer_config: flat, or mlx-lm's
  {optimizer name: {settings}} (the entry of the chosen optimizer)."""
  if not config: return {}
  if not isinstance(config, dict): raise LoraError(f"optimizer_config must be a mapping, found {config!r}")
  if all(k in OPTIMIZERS and isinstance(v, dict) for k, v in config.items()): config = config.get(optimizer, {})
  settings = {k: v for k, v in config.items() if k != "weight_decay"}
  return {"optimizer_config": settings, **({"weight_decay": config["weight_decay"]} if "weight_decay" in config else {})}

def _loss_on(*sources: dict) -> str:
  """--loss-on, or mlx-lm's mask_prompt (true: the last message, false: everything), command line over config file."""
  for values in sources:
    if values.get("loss_on") is not None: return values["loss_on"]
    if values.get("mask_prompt") is not None: return "last" if values["mask_prompt"] else "all"
  return "assistant"

def _train_args(args: argparse.Namespace) -> argparse.Namespace:
  """Command line over config file over defaults."""
  file = _config_values(args.config) if args.config else {}
  merged = {k: v if (v := getattr(args, k, None)) is not None else file.get(k, default) for k, default in TRAIN_DEFAULTS.items()}
  merged["alpha"] = merged["alpha"] if merged["alpha"] is not None else 2.0 * merged["rank"]
  merged["loss_on"] = _loss_on(vars(args), file)
  if merged["loss_on"] not in LOSS_ON: raise LoraError(f"loss_on must be one of {', '.join(LOSS_ON)}, found {merged['loss_on']!r}")
  for k in ("model", "data"):
    if merged[k] is None: raise LoraError(f"train needs --{k} (on the command line or in the -c config)")
  if not (merged["train"] or merged["test"]): raise LoraError("nothing to do: pass --train to train (and/or --test)")
  if merged["pack"] and merged["mode"] != "sft": raise LoraError(f"--pack packs supervised examples, not the pairs of --mode {merged['mode']}")
  return argparse.Namespace(**merged)

def train(a: argparse.Namespace) -> None:
  Tensor.manual_seed(a.seed)
  data, out = pathlib.Path(a.data), pathlib.Path(a.adapter_path)
  model, tokenizer = _load_model(a.model, a.dequantize), load_tokenizer(a.model)
  files = ["train.jsonl", "valid.jsonl"] if a.train else []
  for name in files + (["test.jsonl"] if a.test else []):
    if not (data / name).exists(): raise FileNotFoundError(f"data file not found: {data / name}")
  resume = pathlib.Path(a.resume_adapter_file) if a.resume_adapter_file else None
  checkpoints = resume is not None and checkpoint.exists(resume)
  if resume is not None:  # the adapter as it was saved, its config included; from a checkpoint directory, the latest
    load_adapter(model, checkpoint.latest(resume) if checkpoints else resume)
  else:
    n = model.config.num_hidden_layers
    layers = list(range(max(0, n - a.num_layers), n)) if a.num_layers > 0 else None
    targets = a.targets if a.targets == ALL_LINEAR else a.targets.split(",")
    tl.inject(model, tl.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                                   layers_to_transform=layers, use_dora=a.dora))
  trainable, total = tl.count_parameters(model)
  print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
  preference = a.mode != "sft"
  settings = _optimizer_settings(a.optimizer, a.optimizer_config)
  trainer = Trainer(model, TrainConfig(lr=a.learning_rate, iters=a.iters, warmup=a.warmup, grad_checkpoint=a.grad_checkpoint,
                                       optimizer=a.optimizer, lr_schedule=a.lr_schedule, **settings),
                    loss_fn=LOSSES[a.mode](a.beta) if preference else None, devices=a.devices.split(",") if a.devices else None)
  pad, val_batches = tokenizer.pad_id or 0, None if a.val_batches < 0 else a.val_batches
  load = (lambda f: load_pairs(data / f, tokenizer)) if preference else (lambda f: load_dataset(data / f, tokenizer, a.loss_on))
  draw = dict(draw=pair_batch_at, draw_eval=pair_eval_batches) if preference else {}
  if a.train:
    if checkpoints: print(f"resumed at step {trainer.load_checkpoint(resume)['step']}")
    history = fit(trainer, load(files[0]), load(files[1]), a.batch_size, a.max_seq_length, seed=a.seed, pad_id=pad,
                  val_every=a.steps_per_eval, val_batches=val_batches, checkpoint_dir=out / "checkpoints", save_every=a.save_every,
                  pack=a.pack, **draw)
    target = adapter_path(out, a.format)
    save_adapter(model, target, format=a.format)
    last = history[-1] if history else {}
    rewards = f", reward margin {last['rewards/margins']:.3f}, accuracy {last['rewards/accuracies']:.2f}" if preference and last else ""
    print(f"saved the adapter to {target} ({a.format}); last train loss {last.get('loss', float('nan')):.3f}{rewards}")
  if a.test:
    test_batches = draw.get("draw_eval", packed_eval_batches if a.pack else eval_batches)
    loss = trainer.evaluate(test_batches(load("test.jsonl"), a.batch_size, a.max_seq_length, pad, val_batches))
    if preference: print(f"test loss {loss:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in trainer.eval_metrics.items()))
    else: print(f"test loss {loss:.3f}, test perplexity {math.exp(min(loss, 700)):.3f}")

def fuse(a: argparse.Namespace) -> None:
  model = load_adapter(_load_model(a.model), a.adapter_path)
  quantized = any(isinstance(l.base, QuantizedLinear) for l in tl.lora_layers(model).values())
  tl.merge_and_unload(model, dtype=model.dtype if a.de_quantize else None, requantize=quantized and not a.de_quantize)
  if a.de_quantize: dequantize(model)
  tokenizer = load_tokenizer(a.model)
  save_pretrained(model, a.save_path, format="gguf" if a.export_gguf else "hf", tokenizer=tokenizer)
  print(f"saved the fused model to {a.save_path}")

def _printed(tokenizer, tokens: Iterator[int]) -> list[int]:
  """Prints the text of `tokens` as they come (holding back an incomplete UTF-8 character); returns them."""
  ids, shown = [], ""
  for token in tokens:
    ids.append(token)
    if (text := tokenizer.decode(ids, skip_special_tokens=True)).endswith("\ufffd"): continue
    print(text[len(shown):], end="", flush=True)
    shown = text
  print(tokenizer.decode(ids, skip_special_tokens=True)[len(shown):], flush=True)
  return ids

def _generator(a: argparse.Namespace):
  """The model (with its adapter), tokenizer, and a function streaming the reply to a prompt's tokens."""
  model, tokenizer = _load_model(a.model), load_tokenizer(a.model)
  if a.adapter_path: load_adapter(model, a.adapter_path)
  stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  def reply(tokens: list[int]) -> list[int]:
    return _printed(tokenizer, stream_generate(model, tokens, a.max_tokens, a.temp, a.top_p, stop, a.seed, cache_prompt=True))
  return tokenizer, reply

def generate(a: argparse.Namespace) -> None:
  tokenizer, reply = _generator(a)
  chat = not a.ignore_chat_template and getattr(tokenizer, "chat_template", None)
  text = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True) if chat else a.prompt
  reply(tokenizer.encode(text))

def chat(a: argparse.Namespace) -> None:
  tokenizer, reply = _generator(a)
  if not getattr(tokenizer, "chat_template", None): raise LoraError(f"{a.model}: the tokenizer has no chat template to chat with")
  opening = [{"role": "system", "content": a.system}] if a.system else []
  messages = list(opening)
  while True:
    try: line = input("> ").strip()
    except (EOFError, KeyboardInterrupt): break
    if line == "/quit": break
    if line == "/reset": messages = list(opening); continue
    if not line: continue
    messages.append({"role": "user", "content": line})
    ids = reply(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
    messages.append({"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)})

def serve(a: argparse.Namespace) -> None:
  adapters = dict(spec.split("=", 1) for spec in a.adapter if "=" in spec)
  if bad := [spec for spec in a.adapter if "=" not in spec or not spec.split("=", 1)[0]]:
    raise LoraError(f"--adapter takes NAME=PATH, found {bad[0]!r}")
  model, tokenizer = _load_model(a.model, dequantize=not a.qlora), load_tokenizer(a.model)
  max_len = a.max_len or min(model.config.max_position_embeddings, 2048)
  engine = Engine(model, tokenizer, a.served_model_name or model_id(a.model), adapters, a.max_batch, max_len, a.prefill_chunk, a.max_queue)
  for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, lambda *_: engine.stop())
  def ready(server) -> None:
    host, port = server.server_address[:2]
    print(f"serving {', '.join(i for i, _ in engine.models())} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
  serve_http(engine, a.host, a.port, ready)
  # A signal sent to the whole process group (timeout(1), a service manager) also ends tinygrad's compile workers,
  # which can leave multiprocessing's exit handler waiting forever on a lock a dead worker held. Everything is saved
  # and answered by now, so the process leaves at once.
  sys.stdout.flush(), sys.stderr.flush()
  os._exit(0)

def convert(a: argparse.Namespace) -> None:
  """Loads the adapter onto its base model (which checks every tensor), then saves it in the other format."""
  source = detect_adapter_format(a.adapter_path)
  save_adapter(load_adapter(_load_model(a.model), a.adapter_path, source), a.save_path, format=a.format)
  print(f"converted {a.adapter_path} ({source}) -> {a.save_path} ({a.format})")

def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "train": train(_train_args(args))
    else: {"fuse": fuse, "generate": generate, "chat": chat, "serve": serve, "convert": convert}[args.command](args)
  except (LoraError, OSError, ImportError) as e:
    print(f"tinylora {args.command}: error: {e}", file=sys.stderr)
    return 1
  return 0

if __name__ == "__main__":
  sys.exit(main())
