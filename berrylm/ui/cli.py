"""`berry chat` (terminal, ui/chat.py) and `berry ui` (Streamlit, ui/app.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    _chat_arguments(p)
    p.set_defaults(func=run_chat)

    p = sub.add_parser("ui", help="open the Streamlit chat app")
    p.add_argument("model", nargs="?", default=None,
                   help="model to serve locally (on a free port) for the app; without it and without --url, the "
                        "server at http://127.0.0.1:8000/v1 when one answers, else berry-chat served locally")
    p.add_argument("--url", default=None,
                   help="OpenAI-compatible base URL the app starts with (default: http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", default=None, help="API key the app starts with (default: $OPENAI_API_KEY)")
    p.add_argument("--port", type=int, default=8501, help="port of the web app")
    p.add_argument("--host", default="127.0.0.1", help="address of the web app")
    p.set_defaults(func=run_ui)


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint / export / embedded model to start locally (default: berry-chat); "
                        "ignored with --url")
    p.add_argument("--url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="API key for --url (default: $OPENAI_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id to request (default: the server's first model)")
    p.add_argument("-p", "--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quantize", choices=["auto", "none", "int8"], default=None,
                   help="for the local server: its --quantize (default: auto, see berry serve --help)")


def run_chat(args: argparse.Namespace) -> int:
    from berrylm.ui.chat import run

    return run(args)


def run_ui(args: argparse.Namespace) -> int:
    """Start a local `berry serve` for MODEL (or when nothing answers at the default URL), then Streamlit; stop both
    on exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from berrylm.ui.client import DEFAULT_URL
    from berrylm.ui.server import LocalServer, is_up, sigterm_as_interrupt

    sigterm_as_interrupt()
    url = args.url or DEFAULT_URL
    local = None
    try:
        if args.url:
            if not is_up(url):  # the page says so too, and works once the server is up
                print(f"warning: no server answers at {url} yet", flush=True)
        elif args.model is not None or not is_up(url):  # a named model is served for this app, whatever runs on 8000
            print(f"starting a local server for {args.model or 'berry-chat'} ...", flush=True)
            local = LocalServer(args.model).start()
            url = local.base_url
        env = dict(os.environ, BERRY_UI_URL=url)
        if args.api_key:
            env["BERRY_UI_API_KEY"] = args.api_key
        app = Path(__file__).with_name("app.py")
        cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
               "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--client.showErrorDetails", "none", "--client.toolbarMode", "minimal"]
        print(f"berry ui: http://{args.host}:{args.port}  (model server {url}; Ctrl-C stops)", flush=True)
        proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[2])
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return 0
    finally:
        if local is not None:
            local.stop()
