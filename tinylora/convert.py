"""Convert an adapter between HF PEFT and mlx-lm formats (or to a llama.cpp GGUF LoRA file): load it onto its base
model (which checks every tensor), then save it in the other format.

  python -m tinylora.convert --model BASE_MODEL --adapter ADAPTER_DIR --to mlx --out OUT_DIR
"""
from __future__ import annotations
import argparse, os, sys
from typing import Sequence
from tinylora.adapter import detect_format, load_adapter, save_adapter
from tinylora.errors import LoraError
from tinylora.models import load_pretrained

def convert(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, to: str) -> str:
  """Writes the adapter in `adapter_dir` (format detected) to `out_dir` in format `to`; returns the source format."""
  source = detect_format(adapter_dir)
  save_adapter(load_adapter(load_pretrained(model_dir), adapter_dir, source), out_dir, format=to)
  return source

def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a bad model, adapter or output is one line on stderr and exit status 1, not a traceback."""
  p = argparse.ArgumentParser(prog="python -m tinylora.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="the base model: an HF directory (config.json + safetensors) or a .gguf file")
  p.add_argument("--adapter", required=True, help="adapter directory, HF PEFT or mlx-lm (detected)")
  p.add_argument("--to", required=True, choices=["peft", "mlx", "gguf"])
  p.add_argument("--out", required=True, help="the new adapter's directory (a file for gguf)")
  args = p.parse_args(argv)
  try: source = convert(args.model, args.adapter, args.out, args.to)
  except (LoraError, OSError, ImportError) as e:
    print(f"{p.prog}: error: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.adapter} ({source}) -> {args.out} ({args.to})")
  return 0

if __name__ == "__main__":
  sys.exit(main())
