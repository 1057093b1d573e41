"""`berry chat`: a terminal chat against a server URL (--url) or a local model (started as `berry serve` in a
subprocess on a free loopback port, see ui/server.py for why).

    berry chat                       REPL with the embedded model (berry-chat)
    berry chat ckpt/ --temperature 0 REPL with a checkpoint
    berry chat --url http://host:8000/v1 --api-key KEY
    berry chat -p "what is 12*7?"    one shot: the answer on stdout, nothing else (for scripts)
REPL commands: /reset, /system TEXT, /help, /quit. Tool calls print as `[calculator] 12*7 -> 84` (a call the
server hands back unrun, e.g. `berry serve --no-builtin-tools`, prints without a result).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from berrylm.ui.client import ChatClient, ChatError, Event, Reply
from berrylm.ui.server import Terminated

NOT_RUN = "the server returned the call to the client"
HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt; empty clears it), " \
       "/help, /quit"


@dataclass
class Conversation:
    system: str = ""
    turns: list[dict] = field(default_factory=list)  # user / assistant / tool messages, OpenAI shape

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reset(self) -> None:
        self.turns.clear()


class TerminalChat:
    def __init__(self, client: ChatClient, model: str | None, params: dict, out=sys.stdout, err=sys.stderr,
                 color: bool = False):
        self.client, self.model, self.params = client, model, params
        self.out, self.err, self.color = out, err, color
        self.conv = Conversation()
        self._tail = ""

    def _dim(self, s: str) -> str:
        return f"\033[2m{s}\033[0m" if self.color else s

    def ask(self, text: str, show_extras: bool = True) -> Reply:
        """One user turn: stream the answer to `out`; tool calls (and stats) go to `out` too when show_extras,
        else to `err`. On failure the user message is dropped so the conversation stays consistent."""
        reply = Reply()
        extras = self.out if show_extras else self.err
        messages = self.conv.messages() + [{"role": "user", "content": text}]
        self._tail = ""  # the last text written this turn: a tool line starts on a new line after text
        try:
            for ev in self.client.stream(messages, reply, model=self.model, **self.params):
                self._show(ev, extras)
        except ChatError:
            self.out.write("\n")
            raise
        if not (show_extras and self._tail.endswith("\n")):  # end the answer's line (-p: always, for scripts)
            self.out.write("\n")
        for call in reply.tool_calls:  # calls the server handed back instead of running them (no result)
            if call.result is None:
                extras.write(self._dim(f"[{call.name or 'tool'}] {call.args_text()} (not run: {NOT_RUN})") + "\n")
        if show_extras and reply.stats():
            self.out.write(self._dim(f"({reply.stats()})") + "\n")
        self.out.flush()
        self.conv.turns += [{"role": "user", "content": text}, *reply.to_messages()]
        return reply

    def _show(self, ev: Event, extras) -> None:
        if ev.kind == "text":
            self.out.write(ev.text)
            self.out.flush()
            self._tail = ev.text
        elif ev.kind == "tool_result" and ev.tool is not None:
            t = ev.tool
            newline = extras is self.out and self._tail and not self._tail.endswith("\n")
            extras.write(("\n" if newline else "") +
                         self._dim(f"[{t.name or 'tool'}] {t.args_text()} -> {t.result}") + "\n")
            extras.flush()
            self._tail = "\n"

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.conv.reset()
            self.out.write("(conversation cleared)\n")
        elif cmd == "/system":
            self.conv.system = arg.strip()
            self.conv.reset()
            self.out.write(f"(system prompt {'set' if self.conv.system else 'cleared'}; conversation cleared)\n")
        else:
            self.out.write(HELP + "\n")
        return True

    def repl(self, interactive: bool) -> int:
        if interactive:
            self.out.write(f"berry chat with {self.model or 'the server model'} — {HELP}\n")
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                if interactive:
                    self.out.write("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            if interactive:
                self.out.write("berry> ")
            try:
                self.ask(line)
            except Terminated:
                raise
            except KeyboardInterrupt:  # Ctrl-C stops this answer (it is not kept); at the prompt it quits
                if not interactive:
                    raise
                self.out.write("\n(interrupted)\n")
            except ChatError as e:
                self.err.write(f"error: {e}\n")
                if not interactive:
                    return 1


def run(args: argparse.Namespace) -> int:
    import os

    from berrylm.ui.server import LocalServer, sigterm_as_interrupt

    sigterm_as_interrupt()
    local = None
    url = args.url
    try:
        if url is None:
            if not args.prompt:
                print(f"starting a local server for {args.model or 'berry-chat'} ...", file=sys.stderr)
            quant = getattr(args, "quantize", None)
            local = LocalServer(args.model, extra_args=["--quantize", quant] if quant else None).start()
            url = local.base_url
        client = ChatClient(url, args.api_key or os.environ.get("OPENAI_API_KEY"))
        model = args.model_name or client.models()[0]
        params = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
        chat = TerminalChat(client, model, params, color=sys.stdout.isatty())
        chat.conv.system = args.system
        if args.prompt is not None:
            chat.ask(args.prompt, show_extras=False)
            return 0
        return chat.repl(interactive=sys.stdin.isatty())
    except ChatError as e:
        raise RuntimeError(str(e)) from None
    finally:
        if local is not None:
            local.stop()
