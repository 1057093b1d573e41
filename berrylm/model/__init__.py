"""The one model definition (llama and the hybrid "Strawberry"), its tokenizer and chat format, the tool-call
protocol and calculator every stage shares, the offline decode loop, checkpoints and the embedded models.
Imports only kernels (tests/test_layering.py). Stdlib-only modules here (calculator.py) run in the sandbox worker."""
