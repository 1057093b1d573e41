"""`berry serve [MODEL]`: the OpenAI-compatible server (serve/api.py) over the batching engine (serve/engine.py)."""

from __future__ import annotations

import argparse
import os
import sys

from berrylm.serve.config import EngineConfig

D = EngineConfig()  # the defaults


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="*", default=None,
                   help="checkpoint dir, exported HF dir, GGUF file, ONNX export or embedded model name; several: "
                        "each is served under its name, with its own engine process (default: $BERRY_MODEL, "
                        "else berry-chat)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; also $BERRY_API_KEY)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--max-batch", type=int, default=D.max_batch, help="most sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="model id clients use (default: the model's name); repeat it once per MODEL")
    p.add_argument("--kv-cache-mb", type=float, default=D.kv_cache_mb,
                   help="memory budget of the KV block pool (default: 256 MB, grown up to 1 GB to hold one sequence "
                        "of the whole context; a context that still does not fit is cut, and the log says so); "
                        "with several models, the total, split evenly between them")
    p.add_argument("--quantize", choices=["auto", "none", "int8"], default="auto",
                   help="int8: int8 weights x per-token int8 activations on CPU (model/quantize.py); none: the float "
                        "path; auto (default): int8 where this machine runs the model's matmuls faster in it")
    p.add_argument("--block-size", type=int, default=D.block_size)
    p.add_argument("--prefill-chunk", type=int, default=D.prefill_chunk, help="prompt tokens computed per step")
    p.add_argument("--max-queue", type=int, default=D.max_waiting, help="waiting sequences before 503")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-builtin-tools", action="store_true",
                   help="do not run the calculator in the server: calculator calls come back as tool_calls")
    p.add_argument("--max-tool-rounds", type=int, default=D.max_tool_rounds, help="built-in tool calls per request")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: half the cores, at most 8)")
    p.add_argument("--engine-thread", action="store_true",
                   help="run the engine as a thread of the HTTP process instead of its own process")
    p.add_argument("--drain-delay", type=float, default=0.0,
                   help="after SIGTERM: seconds /health answers 503 while requests are still served, so a load "
                        "balancer stops sending new ones before the port closes (Kubernetes: ~10)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="after SIGTERM and the drain delay: most seconds to let in-flight streams finish "
                        "(default: no limit)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body accepted; a larger one gets 413 (default 4 MiB)")
    p.add_argument("--prepare-timeout", type=float, default=5.0,
                   help="seconds one request may spend in parsing, the chat template and tokenization (then 400)")
    p.add_argument("--engine-restarts", type=int, default=3,
                   help="restart a dead engine process this many times within 10 minutes (backoff 1, 2, 4 s...); "
                        "one more death shuts the server down with exit code 3 for a supervisor to restart it")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="let browsers on this origin call the API (repeatable; '*' for any; none by default)")
    p.add_argument("--sse-ping-interval", type=float, default=15.0,
                   help="seconds of silence after which a stream gets an SSE comment line (keep-alive for proxies; "
                        "0: never)")
    p.add_argument("--access-log", action="store_true",
                   help="print one line per request to stdout: client, method, path, status, time to the response "
                        "head, X-Request-Id")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from berrylm.serve.api import create_app
    from berrylm.serve.engine_process import ModelSpec, RemoteEngine
    from berrylm.serve.http_options import HttpOptions
    from berrylm.serve.metrics import Metrics
    from berrylm.serve.model_info import load_info
    from berrylm.serve.models import ServedModel
    from berrylm.serve.shutdown import DrainingServer

    for name, v in (("--max-batch", args.max_batch), ("--block-size", args.block_size),
                    ("--prefill-chunk", args.prefill_chunk), ("--max-queue", args.max_queue)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1")
    if args.drain_delay < 0 or (args.drain_timeout is not None and args.drain_timeout < 0):
        raise ValueError("--drain-delay and --drain-timeout must be >= 0")
    if args.max_tool_rounds < 0:
        raise ValueError("--max-tool-rounds must be >= 0")
    if args.sse_ping_interval < 0:
        raise ValueError("--sse-ping-interval must be >= 0")
    if args.max_request_bytes < 1024 or args.prepare_timeout <= 0:
        raise ValueError("--max-request-bytes must be >= 1024 and --prepare-timeout > 0")
    # leave a core to the HTTP loop: spinning intra-op threads would starve it (measured: 2.5x tok/s on 2 cores with
    # the engine in the HTTP process). With the engine process, SmolLM2-135M int8 on 2 cores, 2026-12-04: 1 engine
    # thread 29.2 tok/s at 1 stream and 216 at 16, 2 threads 27.1 and 235, 2 threads with OMP_WAIT_POLICY=PASSIVE
    # 29.4 and 163: no clear gain from the second core, so the default stays at half the cores.
    threads = args.threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    # the engine thread and the event loop share the GIL: hand it over quickly so a token reaches the client
    # right after it is sampled, not after the default 5 ms (1 ms measured best on 2 cores: 0.2 ms and 5 ms both
    # lose ~10% tok/s at 16-64 streams)
    sys.setswitchinterval(0.001)
    keys = args.api_key or [k for k in os.environ.get("BERRY_API_KEY", "").split(",") if k.strip()] or None
    # the key stays in this process only: no child (engine process, calculator workers) inherits it, and no other
    # process of this user can read this one's /proc/PID/environ or memory (serve/confine.py)
    os.environ.pop("BERRY_API_KEY", None)
    from berrylm.serve.confine import no_dump

    no_dump()
    paths = args.model or [os.environ.get("BERRY_MODEL") or None]
    names = args.served_model_name or []
    if names and len(names) != len(paths):
        raise ValueError(f"--served-model-name: give one per MODEL ({len(paths)}), not {len(names)}")
    if args.engine_thread and len(paths) > 1:
        raise ValueError("--engine-thread serves one model (several models run one engine process each)")
    kv_mb = args.kv_cache_mb
    if len(paths) > 1:
        total = kv_mb if kv_mb is not None else 256.0 * len(paths)
        kv_mb = total / len(paths)
        print(f"berry serve: {len(paths)} models, KV cache budget {total:.0f} MB split {kv_mb:.0f} MB each"
              + ("" if args.kv_cache_mb is not None else " (--kv-cache-mb sets the total)"), flush=True)
    config = EngineConfig(max_batch=args.max_batch, max_model_len=args.max_model_len, block_size=args.block_size,
                          kv_cache_mb=kv_mb, prefill_chunk=args.prefill_chunk, max_waiting=args.max_queue,
                          prefix_caching=not args.no_prefix_caching, max_tool_rounds=args.max_tool_rounds)
    # with the engine in its own process, this one reads only the model's config and tokenizer, and never imports
    # torch (~0.5 GB resident); --engine-thread runs the model here
    # GGUF files / HF dirs are read by export's readers, which the top-level CLI (berrylm/cli.py) passes in
    load_foreign = getattr(args, "load_foreign", None)
    if args.engine_thread:
        import torch

        from berrylm.serve.backend import load_backend
        from berrylm.serve.engine import Engine

        torch.set_num_threads(threads)
    servers: list = []  # the uvicorn server, once made (give_up stops it)

    def give_up() -> None:  # an engine keeps dying: shut down (uvicorn drains) and exit 3 below
        for srv in servers:
            srv.should_exit = True

    served, engines = [], []
    metrics = Metrics()
    for k, model in enumerate(paths):
        if args.engine_thread:
            backend = load_backend(model, args.backend, args.device, args.dtype, args.quantize, load_foreign)
        else:
            backend = load_info(model, args.backend, load_foreign)  # the engine process loads the weights
        name = names[k] if names else backend.name
        hooks = metrics.for_model(name)
        if args.engine_thread:
            engine = Engine(backend, config, hooks)
            device, dtype = backend.device, backend.dtype
            notes = (f"quantize {getattr(backend, 'quantize', 'none')} ({getattr(backend, 'quantize_note', '')})",
                     engine.kv_note)
        else:
            engine = RemoteEngine(backend, ModelSpec(model, args.backend, args.device, args.dtype, threads,
                                                     args.quantize, load_foreign),
                                  config, hooks, max_restarts=args.engine_restarts, on_failed=give_up)
            engine.start()  # here, not in the app's lifespan: a model it cannot serve is one clear error
            device, dtype, notes = engine.device, engine.dtype, engine.notes
        prefix = f"berry serve: {name}: " if len(paths) > 1 else "berry serve: "
        for line in notes:
            print(f"{prefix}{line}", flush=True)
        served.append(ServedModel(name, engine))
        engines.append(engine)
        print(f"berry serve: {name} ({backend.cfg.arch}, {device}, {dtype}) on "
              f"http://{args.host}:{args.port}/v1", flush=True)
    http = HttpOptions(args.cors_origin, args.sse_ping_interval, access_log=args.access_log)
    app = create_app(served, keys, metrics, builtin_tools=not args.no_builtin_tools,
                     max_request_bytes=args.max_request_bytes, prepare_timeout_s=args.prepare_timeout, http=http)
    http_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                 timeout_graceful_shutdown=args.drain_timeout)
    servers.append(DrainingServer(http_config, args.drain_delay))
    servers[0].run()
    if any(getattr(e, "state", "") == "failed" for e in engines):
        print("berry serve: error: the engine process kept dying; exiting for a supervisor to restart the server",
              file=sys.stderr)
        return 3
    return 0
