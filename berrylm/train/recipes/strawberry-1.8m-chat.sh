#!/bin/sh
# Reproduces the embedded model berrylm/model/embedded/strawberry-1.8m-chat (the hybrid: softmax + gated linear-attention
# heads, mini-expert MLPs) on a CPU box. It shares berry-chat's tokenizer and data: run berrylm/train/recipes/berry-chat.sh
# first, or at least its data steps (the tokenizer is taken from the shipped berry-chat). About 5 h on 2 cores.
#   sh berrylm/train/recipes/strawberry-1.8m-chat.sh
set -eu
THREADS="${THREADS:-2}"
mkdir -p data/tokenizer
cp berrylm/model/embedded/berry-chat/tokenizer.json data/tokenizer/
berry data tokenize data/corpus --tokenizer data/tokenizer
berry train pretrain --data data/corpus --preset strawberry-1.8m --out runs/strawberry-1.8m-base \
    --max-tokens 8000000 --batch-tokens 16384 --seq-len 512 --micro-batch 8 --lr 3e-3 --warmup 100 \
    --eval-every 100 --ckpt-every 25 --sample-every 200 --log-every 10 --threads "$THREADS"
test -f data/chat/calculator-c.jsonl || berry data chat --kind calculator --n 60000 --seed 21 --out data/chat/calculator-c.jsonl
test -f data/chat/dictionary_dialogue.jsonl || berry data chat --kind dictionary,dialogue --n 5000 --out data/chat/dictionary_dialogue.jsonl
test -f data/chat/calculator_heldout.jsonl || berry data chat --kind calculator --heldout --n 1000 --out data/chat/calculator_heldout.jsonl
berry train sft --data data/chat/calculator-c.jsonl,data/chat/dictionary_dialogue.jsonl \
    --init-from runs/strawberry-1.8m-base/checkpoint --out runs/strawberry-1.8m-chat-sft --steps "${SFT_STEPS:-500}" \
    --batch-tokens 16384 --seq-len 512 --micro-batch 8 --lr 1.5e-3 --warmup 20 --eval-every 100 --ckpt-every 25 \
    --threads "$THREADS"
berry eval runs/strawberry-1.8m-chat-sft/checkpoint --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl
sh berrylm/train/recipes/ship.sh runs/strawberry-1.8m-chat-sft/checkpoint strawberry-1.8m-chat
# SFT stage 2: berry-chat's stage-5 compositional data (berrylm/train/data/chat_data.py as of commit 354d2ad), 160 steps
test -f data/chat/calculator-f.jsonl || berry data chat --kind calculator --n 80000 --seed 51 --out data/chat/calculator-f.jsonl
test -f data/chat/dictionary_dialogue-f.jsonl || berry data chat --kind dictionary,dialogue --n 6000 --seed 51 \
    --out data/chat/dictionary_dialogue-f.jsonl
berry train sft --data data/chat/calculator-f.jsonl,data/chat/dictionary_dialogue-f.jsonl \
    --init-from berrylm/model/embedded/strawberry-1.8m-chat --out runs/strawberry-sft2 --steps 160 --batch-tokens 16384 \
    --seq-len 512 --micro-batch 8 --lr 1.5e-3 --warmup 10 --eval-every 80 --ckpt-every 20 --threads "$THREADS"
berry eval runs/strawberry-sft2/checkpoint --tool-accuracy data/chat/calculator_heldout.jsonl
sh berrylm/train/recipes/ship.sh runs/strawberry-sft2/checkpoint strawberry-1.8m-chat
# SFT stages 3-5 (berrylm/train/data/chat_data.py as of commit 03e6a25, the generator of berry-chat's stage 6; 2 threads,
# ~2 s a step on 2 cores): 420 steps on 80k fresh dialogues (seed 71) from the stage-2 model as shipped, 600 on
# 80k more (seed 81), then 250 steps on 40k (seed 91) at a lower lr
SFT="--batch-tokens 16384 --seq-len 512 --micro-batch 8 --warmup 10 --threads $THREADS"
berry data chat --kind calculator --n 80000 --seed 71 --out data/chat/calculator-h.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 71 --out data/chat/dictionary_dialogue-h.jsonl
berry train sft --data data/chat/calculator-h.jsonl,data/chat/dictionary_dialogue-h.jsonl \
    --init-from berrylm/model/embedded/strawberry-1.8m-chat --out runs/strawberry-sft3 --steps 420 --lr 1e-3 \
    --eval-every 140 --ckpt-every 20 $SFT
berry data chat --kind calculator --n 80000 --seed 81 --out data/chat/calculator-i.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 81 --out data/chat/dictionary_dialogue-i.jsonl
berry train sft --data data/chat/calculator-i.jsonl,data/chat/dictionary_dialogue-i.jsonl \
    --init-from runs/strawberry-sft3/checkpoint --out runs/strawberry-sft4 --steps 600 --lr 8e-4 --eval-every 200 \
    --ckpt-every 20 $SFT
berry data chat --kind calculator --n 40000 --seed 91 --out data/chat/calculator-j.jsonl
berry data chat --kind dictionary,dialogue --n 4000 --seed 91 --out data/chat/dictionary_dialogue-j.jsonl
berry train sft --data data/chat/calculator-j.jsonl,data/chat/dictionary_dialogue-j.jsonl \
    --init-from runs/strawberry-sft4/checkpoint --out runs/strawberry-sft5 --steps 250 --lr 4e-4 --eval-every 125 \
    --ckpt-every 25 $SFT
berry eval runs/strawberry-sft5/checkpoint --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl
sh berrylm/train/recipes/ship.sh runs/strawberry-sft5/checkpoint strawberry-1.8m-chat
# SFT stage 7 (berrylm/train/data/chat_data.py as of commit d23a1f4; ~1 h on 2 AVX2 cores): 500 steps from stage 5 as shipped,
# calculator data weighted towards chains and word problems + dictionary/dialogue + 1,500 corpus documents
berry data chat --kind calculator --n 80000 --seed 111 --weights chain=16,fchain=48,word=16,fword=32,flevel=8 \
    --out data/chat/calculator-l.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 111 --out data/chat/dictionary_dialogue-l.jsonl
berry data chat --kind text --n 1500 --seed 111 --out data/chat/text-l.jsonl
berry train sft --data data/chat/calculator-l.jsonl,data/chat/dictionary_dialogue-l.jsonl,data/chat/text-l.jsonl \
    --init-from berrylm/model/embedded/strawberry-1.8m-chat --out runs/strawberry-sft7 --steps 500 --lr 6e-4 \
    --eval-every 250 --ckpt-every 25 $SFT
berry eval runs/strawberry-sft7/checkpoint --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl
sh berrylm/train/recipes/ship.sh runs/strawberry-sft7/checkpoint strawberry-1.8m-chat
# SFT stage 8 (berrylm/train/data/chat_data.py as of commit 08835bf: no bare-result answers, linked chains; 18 min on 2 cores):
# 500 steps from stage 7 as shipped
W8=chain=16,fchain=32,flink=32,word=16,fword=32,flevel=8
berry data chat --kind calculator --n 80000 --seed 121 --weights $W8 --out data/chat/calculator-m.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 121 --out data/chat/dictionary_dialogue-m.jsonl
berry data chat --kind text --n 1500 --seed 121 --out data/chat/text-m.jsonl
berry train sft --data data/chat/calculator-m.jsonl,data/chat/dictionary_dialogue-m.jsonl,data/chat/text-m.jsonl \
    --init-from berrylm/model/embedded/strawberry-1.8m-chat --out runs/strawberry-sft8 --steps 500 --lr 6e-4 \
    --eval-every 250 --ckpt-every 25 $SFT
# SFT stage 9 (commit ee4d853: lead-in + "and" single-call frames, verb-frame chains joined by "and", polite tails,
# more subtraction word problems; 17 min): 500 steps from stage 8's fp32 checkpoint
W9=chain=16,fchain=40,flink=24,word=16,fword=40,flevel=8
berry data chat --kind calculator --n 80000 --seed 131 --weights $W9 --out data/chat/calculator-n.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 131 --out data/chat/dictionary_dialogue-n.jsonl
berry data chat --kind text --n 1500 --seed 131 --out data/chat/text-n.jsonl
berry train sft --data data/chat/calculator-n.jsonl,data/chat/dictionary_dialogue-n.jsonl,data/chat/text-n.jsonl \
    --init-from runs/strawberry-sft8/checkpoint --out runs/strawberry-sft9 --steps 500 --lr 5e-4 \
    --eval-every 250 --ckpt-every 25 $SFT
berry eval runs/strawberry-sft9/checkpoint --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl
sh berrylm/train/recipes/ship.sh runs/strawberry-sft9/checkpoint strawberry-1.8m-chat
# SFT stage 10 (commit adding berrylm/train/data/persona.py: greetings, who it is, what it can do, thanks; 13 min): 400 steps from
# stage 9's fp32 checkpoint on fresh stage-9-mix data + 6k persona conversations
W10=chain=16,fchain=40,flink=24,word=16,fword=40,flevel=8
berry data chat --kind calculator --n 80000 --seed 141 --weights $W10 --out data/chat/calculator-p.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 141 --out data/chat/dictionary_dialogue-p.jsonl
berry data chat --kind text --n 1500 --seed 141 --out data/chat/text-p.jsonl
berry data chat --kind persona --n 6000 --seed 141 --out data/chat/persona-p.jsonl
berry train sft --data data/chat/calculator-p.jsonl,data/chat/dictionary_dialogue-p.jsonl,data/chat/text-p.jsonl,data/chat/persona-p.jsonl \
    --init-from runs/strawberry-sft9/checkpoint --out runs/strawberry-sft10 --steps 400 --lr 4e-4 \
    --eval-every 200 --ckpt-every 25 $SFT
berry eval runs/strawberry-sft10/checkpoint --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl
# SFT stage 11 (10 min): 250 steps from stage 10 at a lower lr on fresh data (seed 151) of the same mix
berry data chat --kind calculator --n 80000 --seed 151 --weights $W10 --out data/chat/calculator-q.jsonl
berry data chat --kind dictionary,dialogue --n 6000 --seed 151 --out data/chat/dictionary_dialogue-q.jsonl
berry data chat --kind text --n 1500 --seed 151 --out data/chat/text-q.jsonl
berry data chat --kind persona --n 4000 --seed 151 --out data/chat/persona-q.jsonl
berry train sft --data data/chat/calculator-q.jsonl,data/chat/dictionary_dialogue-q.jsonl,data/chat/text-q.jsonl,data/chat/persona-q.jsonl \
    --init-from runs/strawberry-sft10/checkpoint --out runs/strawberry-sft11 --steps 250 --lr 2.5e-4 \
    --eval-every 250 --ckpt-every 25 --seed 151 $SFT
berry eval runs/strawberry-sft11/checkpoint --bpb data/corpus --tool-accuracy data/chat/calculator_heldout.jsonl
sh berrylm/train/recipes/ship.sh runs/strawberry-sft11/checkpoint strawberry-1.8m-chat
