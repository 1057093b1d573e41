#!/bin/sh
# Ship a trained checkpoint as an embedded model: fp16 weights, tokenizer, chat template; no training state.
# The model's report.md and loss curves (*.md, *.png) already in the embedded folder are kept.
#   sh berrylm/train/recipes/ship.sh runs/berry-chat-sft/checkpoint berry-chat
set -eu
python - "$1" "$2" <<'PY'
import sys

import torch

from berrylm.model.checkpoint import EMBEDDED_DIR, load_checkpoint, save_checkpoint

dest = EMBEDDED_DIR / sys.argv[2]
keep = {f.name: f.read_bytes() for pattern in ("*.md", "*.png") for f in dest.glob(pattern)} if dest.exists() else {}
model, tok = load_checkpoint(sys.argv[1])
save_checkpoint(dest, model, tok, dtype=torch.float16, extra_files=keep)
print(f"shipped {sys.argv[1]} -> {dest} (kept {', '.join(sorted(keep)) or 'nothing'})")
PY
