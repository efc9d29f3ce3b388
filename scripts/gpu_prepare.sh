#!/usr/bin/env bash
# Prepare the checkout for scripts/gpu_check.py on the lent GPU machine (run HERE, before the device call; costs no
# device time). The machine's image has torch 2.11 (CUDA 13), transformers, accelerate, torchvision and pytest, but no
# diffusers, bitsandbytes or tomli-w, and nothing can be downloaded there: they travel as wheels in .whl/ (about 49 MB
# of the 64 MiB a call may carry). diffusers' DreamBooth LoRA script (not in its pip package, never committed) travels
# in .peer/ for the peer benchmark.
#
#   bash scripts/gpu_prepare.sh [PATH to train_dreambooth_lora.py, or to a huggingface/diffusers git directory]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.peer/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
rm -rf .whl && mkdir -p .whl .peer
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 bitsandbytes==0.50.2 peft==0.21.2 tomli-w==1.2.0
src="${1:-}"
if [ -d "$src" ]; then
    git --git-dir="$src" show HEAD:examples/dreambooth/train_dreambooth_lora.py > .peer/train_dreambooth_lora.py
elif [ -f "$src" ]; then
    cp "$src" .peer/train_dreambooth_lora.py
else
    echo "no diffusers script given: the peer part of gpu_check will report it missing" >&2
fi
ls -la .whl .peer
echo "travels: $(du -sch .whl .peer $(git ls-files) 2>/dev/null | tail -1)"
