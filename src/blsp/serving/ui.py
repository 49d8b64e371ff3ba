"""``blsp ui``: a Gradio web demo: record or upload speech, type an instruction, watch the answer stream.

Each browser session holds its own ``ChatSession`` (history and KV cache), so a conversation may
mix speech turns and text turns. The model runs one request at a time (one shared Gradio queue).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blsp.errors import BlspError

logger = logging.getLogger(__name__)

EXAMPLE_SPEECH = {
    "fox": "The quick brown fox jumps over the lazy dog.",
    "weather": "It is a beautiful sunny morning and I would like to go for a long walk in the park.",
}


def example_clips(folder: str | Path | None = None) -> dict[str, Path]:
    """Example clips for the demo: ``*.wav`` in ``folder``, else synthesised once with espeak-ng."""
    if folder is not None:
        return {p.stem: p for p in sorted(Path(folder).glob("*.wav"))}
    from blsp.models.hub import cache_dir

    out = cache_dir() / "ui_examples"
    clips: dict[str, Path] = {}
    if shutil.which("espeak-ng") is None:
        return clips
    out.mkdir(parents=True, exist_ok=True)
    for name, text in EXAMPLE_SPEECH.items():
        path = out / f"{name}.wav"
        if not path.exists():
            tmp = out / f".{name}.{os.getpid()}.wav"
            try:
                subprocess.run(
                    ["espeak-ng", "-v", "en-us", "-w", str(tmp), text],
                    check=True,
                    timeout=60,
                    capture_output=True,
                )
                tmp.replace(path)
            except (subprocess.SubprocessError, OSError) as e:
                logger.warning("cannot synthesise the example clip %s: %s", name, e)
                continue
        clips[name] = path
    return clips


def build_demo(pipeline: Any, *, max_context: int | None = None, clips: dict[str, Path] | None = None) -> Any:
    """The Gradio Blocks app for ``pipeline`` (a ``SpeechPipeline``); ``clips`` are example recordings."""
    import gradio as gr

    from blsp.inference.chat import ChatSession
    from blsp.inference.pipeline import stream_in_thread
    from blsp.instructions import CONTINUATION, task_instruction

    clips = example_clips() if clips is None else clips
    instructions = [
        task_instruction("asr"),
        CONTINUATION,
        task_instruction("st:German"),
        task_instruction("sentiment"),
    ]
    names = list(clips)
    examples = [
        [str(clips[names[i % len(names)]]) if names else None, instr] for i, instr in enumerate(instructions)
    ]

    def respond(
        audio_path: str | None,
        text: str,
        history: list[dict[str, Any]] | None,
        session: Any,
        max_new_tokens: float,
        temperature: float,
    ) -> Iterator[tuple[Any, ...]]:
        history = list(history or [])
        text = (text or "").strip()
        if not audio_path and not text:
            raise gr.Error("Record or upload audio, or type a message.")
        session = session or ChatSession(pipeline, max_context=max_context)
        content: list[dict[str, Any]] = []
        if text:
            content.append({"type": "text", "text": text})
        if audio_path:
            content.append({"type": "audio", "audio": audio_path})
            history.append({"role": "user", "content": {"path": audio_path, "mime_type": "audio/wav"}})
        if text:
            history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": ""})
        yield history, session, None, ""
        answer = ""
        try:
            pieces = stream_in_thread(
                lambda sink, cancel: session.send(
                    content, sink=sink, max_new_tokens=int(max_new_tokens), temperature=float(temperature)
                )
            )
            for piece in pieces:
                answer += piece
                history[-1] = {"role": "assistant", "content": answer}
                yield history, session, None, ""
        except BlspError as e:
            history[-1] = {"role": "assistant", "content": f"**Error:** {e}"}
            yield history, session, None, ""
            return
        if not answer:
            history[-1] = {"role": "assistant", "content": "(empty answer)"}
            yield history, session, None, ""

    def reset() -> tuple[Any, ...]:
        return [], None, None, ""

    with gr.Blocks(title="BLSP speech chat") as demo:
        gr.Markdown(
            "## BLSP: speech chat\nRecord or upload speech, type an instruction (or just a message), and press "
            "**Send**. Speech and text turns mix freely; the conversation is kept until **New conversation**."
        )
        chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="blsp-chat")
        session = gr.State(None)
        with gr.Row():
            audio = gr.Audio(
                sources=["upload", "microphone"], type="filepath", label="Speech", elem_id="blsp-audio"
            )
            with gr.Column():
                instruction = gr.Textbox(
                    label="Instruction or message",
                    lines=2,
                    elem_id="blsp-instruction",
                    placeholder="e.g. Please repeat the following words.",
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="blsp-send")
                    clear = gr.Button("New conversation", elem_id="blsp-clear")
        with gr.Accordion("Generation settings", open=False):
            max_new_tokens = gr.Slider(
                1, 512, value=pipeline.defaults.max_new_tokens, step=1, label="Max new tokens"
            )
            temperature = gr.Slider(
                0.0, 1.5, value=pipeline.defaults.temperature, step=0.05, label="Temperature (0 = greedy)"
            )
        gr.Examples(
            examples=examples, inputs=[audio, instruction], label="Examples (the paper's instructions)"
        )
        inputs = [audio, instruction, chatbot, session, max_new_tokens, temperature]
        outputs = [chatbot, session, audio, instruction]
        send.click(respond, inputs, outputs, concurrency_id="model", concurrency_limit=1)
        instruction.submit(respond, inputs, outputs, concurrency_id="model", concurrency_limit=1)
        clear.click(reset, None, outputs)
    return demo


def launch(
    pipeline: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_context: int | None = None,
    examples_dir: str | Path | None = None,
    api_key: str | None = None,
) -> None:
    """Build the demo and serve it until interrupted; with ``api_key``, a login whose password is the key."""
    import hmac

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    clips = example_clips(examples_dir)
    demo = build_demo(pipeline, max_context=max_context, clips=clips)
    logger.info("BLSP demo on http://%s:%d", host, port)
    demo.queue(max_size=64).launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=True,
        ssr_mode=False,
        allowed_paths=sorted({str(p.parent) for p in clips.values()}),
        auth=(lambda user, password: hmac.compare_digest(password.encode(), api_key.encode()))
        if api_key
        else None,
        auth_message="Any user name; the password is the server's API key." if api_key else None,
        quiet=False,
    )
