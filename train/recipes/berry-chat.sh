#!/bin/sh
# Reproduces the embedded model model/embedded/berry-chat (berry-1.8m, llama architecture) on a CPU box.
# About 1 hour on 2 cores. Every step writes under data/ and runs/ (both git-ignored).
#   sh train/recipes/berry-chat.sh
set -eu
PRESET="${PRESET:-berry-1.8m}"
NAME="${NAME:-berry-chat}"
THREADS="${THREADS:-2}"
berry data build --sources all --out data/corpus
berry train tokenizer --data data/corpus --vocab-size 4096 --out data/tokenizer
berry data tokenize data/corpus --tokenizer data/tokenizer
berry train pretrain --data data/corpus --preset "$PRESET" --out "runs/$PRESET-base" --max-tokens "${PRETRAIN_TOKENS:-14000000}" \
    --batch-tokens 16384 --seq-len 512 --micro-batch 8 --lr 3e-3 --warmup 100 --eval-every 100 --ckpt-every 50 \
    --sample-every 200 --log-every 10 --threads "$THREADS"
berry data chat --kind calculator --n 20000 --out data/chat/calculator.jsonl
berry data chat --kind dictionary,dialogue --n 5000 --out data/chat/dictionary_dialogue.jsonl
berry data chat --kind calculator --heldout --n 1000 --out data/chat/calculator_heldout.jsonl
berry train sft --data data/chat/calculator.jsonl,data/chat/dictionary_dialogue.jsonl \
    --init-from "runs/$PRESET-base/checkpoint" --out "runs/$NAME-sft" --epochs "${SFT_EPOCHS:-2}" \
    --batch-tokens 16384 --seq-len 512 --micro-batch 8 --lr 1.5e-3 --warmup 20 --eval-every 50 --ckpt-every 25 \
    --threads "$THREADS"
berry eval "runs/$NAME-sft/checkpoint" --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl --limit 300
# ship: fp16 weights, no training state
python - "$NAME" <<'PY'
import sys, torch
from model.checkpoint import load_checkpoint, save_checkpoint, EMBEDDED_DIR
name = sys.argv[1]
model, tok = load_checkpoint(f"runs/{name}-sft/checkpoint")
save_checkpoint(EMBEDDED_DIR / name, model, tok, dtype=torch.float16)
PY
