#!/bin/sh
# Ship a trained checkpoint as an embedded model: fp16 weights, tokenizer, chat template; no training state.
#   sh train/recipes/ship.sh runs/berry-chat-sft/checkpoint berry-chat
set -eu
python - "$1" "$2" <<'PY'
import sys

import torch

from model.checkpoint import EMBEDDED_DIR, load_checkpoint, save_checkpoint

model, tok = load_checkpoint(sys.argv[1])
save_checkpoint(EMBEDDED_DIR / sys.argv[2], model, tok, dtype=torch.float16)
print(f"shipped {sys.argv[1]} -> {EMBEDDED_DIR / sys.argv[2]}")
PY
