"""Convert an adapter between HF PEFT and mlx-lm formats: load it onto its base model (which checks every tensor),
then save it in the other format.

  python -m tinylora.convert --model BASE_MODEL_DIR --adapter ADAPTER_DIR --to mlx --out OUT_DIR
"""
from __future__ import annotations
import argparse, os
from tinylora.adapter import detect_format, load_adapter, save_adapter
from tinylora.models import load_pretrained

def convert(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, to: str) -> str:
  """Writes the adapter in `adapter_dir` (format detected) to `out_dir` in format `to`; returns the source format."""
  source = detect_format(adapter_dir)
  save_adapter(load_adapter(load_pretrained(model_dir), adapter_dir, source), out_dir, format=to)
  return source

def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="the base model's HF directory (config.json + safetensors)")
  p.add_argument("--adapter", required=True, help="adapter directory, HF PEFT or mlx-lm (detected)")
  p.add_argument("--to", required=True, choices=["peft", "mlx"])
  p.add_argument("--out", required=True)
  args = p.parse_args()
  source = convert(args.model, args.adapter, args.out, args.to)
  print(f"converted {args.adapter} ({source}) -> {args.out} ({args.to})")

if __name__ == "__main__":
  main()
