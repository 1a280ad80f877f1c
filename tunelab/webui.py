"""`tunelab webui`: a local gradio chat page for a base model plus tunelab checkpoints.

    tunelab webui --runs_dir runs [--checkpoint_dir runs/x] [--port 7860]
    # then open http://127.0.0.1:7860

The page: the conversation (streamed answers, kept as history), a message box with Send and Clear, sliders
for max new tokens, temperature (0 = greedy) and top_p, and a checkpoint chooser listing every tunelab run
folder (one holding tunelab_method.json) under --runs_dir; choosing one loads it on top of its base model
(or --model_name_or_path when given), with that run's template and source_prefix. Answers come from the
same ChatEngine as `tunelab chat` and `tunelab serve`.

Access: serves 127.0.0.1 only unless --host says otherwise; bound elsewhere it warns (without a password anyone
who reaches the port can use the model; with one, it still crosses the network unencrypted). --password (or
$TUNELAB_WEBUI_PASSWORD) puts gradio's login page in front, user --username.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.hparams import Args, _opt, listen_arguments, parse_with
from tunelab.methods import METHOD_FILE

if TYPE_CHECKING:  # the engine (transformers, torch) loads after the flags parse: `--help` stays fast
    from tunelab.engine import ChatEngine

logger = logging.getLogger(__name__)

BASE_CHOICE = "(base model)"
PASSWORD_ENV = "TUNELAB_WEBUI_PASSWORD"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_DEPTH = 3  # runs_dir/<study>/<run>/checkpoint-N


@dataclass
class WebUIArguments(listen_arguments(7860)):
    runs_dir: str = _opt("runs", "Folder whose tunelab run folders the checkpoint chooser lists.")
    username: str = _opt("tunelab", "User name for the login page (with --password).")
    password: str | None = _opt(None, f"Ask for this password before showing the page (default: ${PASSWORD_ENV}; "
                                "none: no login).")


def access(opts: WebUIArguments) -> tuple[tuple[str, str] | None, str | None]:
    """(gradio `auth`, warning to print) for these options: a login when a password is set; a warning when
    the page is reachable from other machines."""
    password = opts.password or os.environ.get(PASSWORD_ENV) or None
    auth = (opts.username, password) if password else None
    if opts.host in LOOPBACK:
        return auth, None
    if auth is None:
        return None, (f"serving on {opts.host} without a password: anyone who reaches port {opts.port} can use the "
                      f"model (set --password or ${PASSWORD_ENV}, or keep --host 127.0.0.1)")
    return auth, (f"serving on {opts.host}: the password and the chat cross the network unencrypted (plain HTTP); "
                  "put it behind TLS or keep --host 127.0.0.1")


def find_runs(runs_dir: str | Path) -> list[str]:
    """Run folders (holding tunelab_method.json) under runs_dir, at most MAX_DEPTH deep, sorted."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    patterns = ["/".join(["*"] * depth + [METHOD_FILE]) for depth in range(1, MAX_DEPTH + 1)]
    return sorted(str(p.parent) for pattern in patterns for p in root.glob(pattern))


class Models:
    """The loaded engine and the choice it was loaded for; loading another replaces it (one model in memory)."""

    def __init__(self, args: Args):
        self.args = args
        self.choice: str | None = None
        self.engine: ChatEngine | None = None
        self._lock = threading.Lock()

    def load(self, choice: str) -> ChatEngine:
        from tunelab.engine import ChatEngine

        with self._lock:
            if choice != self.choice or self.engine is None:
                args = copy.deepcopy(self.args)  # from_args fills in the run's template/source_prefix
                args.model.checkpoint_dir = None if choice == BASE_CHOICE else choice
                self.engine = None  # free the old model before loading the new one
                self.engine = ChatEngine.from_args(args)
                self.choice = choice
            return self.engine


def build_demo(models: Models, runs_dir: str | Path, initial: str = BASE_CHOICE):
    """The gradio Blocks page (not launched)."""
    import gradio as gr

    gen = models.args.generation
    with gr.Blocks(title="tunelab chat", analytics_enabled=False) as demo:
        gr.Markdown("## tunelab chat")
        runs = find_runs(runs_dir)
        with gr.Row():
            choice = gr.Dropdown(list(dict.fromkeys([BASE_CHOICE, initial, *runs])), value=initial, label="checkpoint",
                                 elem_id="checkpoint", scale=4)
            status = gr.Markdown(f"loaded: `{initial}`", elem_id="status")
        chatbot = gr.Chatbot(label="conversation", elem_id="chatbot", height=420)
        history = gr.State([])
        with gr.Row():
            query = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                               elem_id="query", scale=6)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            clear = gr.Button("Clear", elem_id="clear", scale=1)
        with gr.Row():
            max_new = gr.Slider(1, max(gen.max_new_tokens, 1024), value=gen.max_new_tokens, step=1,
                                label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=gen.temperature if gen.do_sample else 0.0, step=0.05,
                                    label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top_p")

        def respond(text, past, max_new_tokens, temp, p, selected):
            yield from _respond(models.load(selected), text, past, int(max_new_tokens), temp, p)

        def switch(selected):
            models.load(selected)
            return [], [], f"loaded: `{selected}`"

        inputs = [query, history, max_new, temperature, top_p, choice]
        outputs = [query, history, chatbot]
        send.click(respond, inputs, outputs)
        query.submit(respond, inputs, outputs)
        clear.click(lambda: ([], []), None, [history, chatbot])
        choice.change(switch, choice, [history, chatbot, status])
    return demo


def _respond(engine: ChatEngine, text: str, past: list, max_new_tokens: int, temperature: float, top_p: float):
    """Stream one answer: yields (cleared textbox, history, chatbot messages) as pieces arrive."""
    from tunelab.engine import history_messages, to_messages

    query = (text or "").strip()
    if not query:
        yield "", past, history_messages(past)
        return
    past = [tuple(pair) for pair in past]
    gen = engine.stream(to_messages(query, past), max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p)
    answer = ""
    try:
        for piece in gen:
            answer += piece
            yield "", past, history_messages(past + [(query, answer)])
    finally:
        gen.cancel()  # the page went away mid-answer: free the model
    past = past + [(query, gen.reply.text)]
    yield "", past, history_messages(past)


def main(argv: list[str]) -> int:
    args, opts = parse_with(argv, WebUIArguments, prog="tunelab webui")
    auth, warning = access(opts)
    if warning:
        logger.warning(warning)
    models = Models(args)
    initial = args.model.checkpoint_dir or BASE_CHOICE
    models.load(initial)
    demo = build_demo(models, opts.runs_dir, initial)
    demo.queue().launch(server_name=opts.host, server_port=opts.port, share=False, ssr_mode=False, auth=auth)
    return 0
