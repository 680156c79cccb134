"""The Gradio web demo: upload a photo, pick a decoding strategy, read the captions and the concepts the
CNN's ImageNet classifier recognised in the photo (with their probabilities), which beam search is made to
name (`captioner demo --concepts off`: plain captions).

`predict` is a plain function (file path + settings -> caption Markdown + n-best rows), so it is
tested without a browser; `predict_batch` serves several visitors through the library's one pipeline
(`Captioner.stream`: one CNN batch, one decoder call per decoding setting), and `BatchedPredictor`
(with `captioner.apps.request_batcher`) gathers simultaneous visitors into such batches;
`build_app` lays it out in a `gr.Blocks` page; `serve` starts the server with the demo's safety
settings; `launch` loads the checkpoint once and does both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.api import Captioner
from captioner.apps.request_batcher import Busy, RequestBatcher
from captioner.config import DecodeConfig
from captioner.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from captioner.pipeline import caption_images

if TYPE_CHECKING:
    import gradio as gr
    import torch
    from PIL import Image

    from captioner.decoding import Caption

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = DEFAULT_MAX_PIXELS  # 40 megapixels
# Simultaneous visitors are captioned together: one CNN batch of up to MAX_BATCH_SIZE photos (gathered for
# GATHER_SECONDS after the first arrives), one decoder call per decoding setting. The queue admits
# MAX_PENDING visitors, four full batches: the last of them waits for four batch times, a few seconds on a
# 2-core CPU (scripts/bench/load_demo.py prints the batch times); the rest are told at once that the demo is busy.
MAX_BATCH_SIZE = 16
MAX_PENDING = 64
GATHER_SECONDS = 0.005
CONCURRENCY = 2  # the other jobs (previews of uploads) at once; the rest wait in Gradio's queue
# Gradio hands each caption request to a thread of its own, so that the batcher sees them all: room for the
# admitted ones plus as many again that get the "busy" answer; only a flood beyond MAX_QUEUE is refused by
# Gradio itself ("Queue is full").
CAPTION_THREADS = 2 * MAX_PENDING
MAX_QUEUE = 2 * MAX_PENDING
MAX_N_BEST = 5
PREVIEW_SIZE = 512
# Shipped example photos (public domain / CC0, see SOURCES.md); absent in a wheel install.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "demo" / "examples"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TABLE_HEADERS = ["#", "caption", "log-prob", "score"]
STRATEGIES = [("Beam search", "beam"), ("Greedy", "greedy"), ("Sampling", "sample")]
PROMPT = "Upload a photo (or pick an example) and press **Caption**."
LIMITS = (f"The demo takes JPEG, PNG, WebP, … photos up to {MAX_UPLOAD_BYTES // 2**20} MB "
          f"and {MAX_PIXELS // 1_000_000} megapixels.")
READY = "Press **Caption** to describe this photo."

Row = list[Any]  # one n-best table row: rank, caption, log-prob, score
# The server's decoding settings (`captioner demo --concepts off`, `--concept-threshold`, ...) are a
# DecodeConfig, `decoding`; a visitor's controls replace its strategy, beam size, temperature, seed, n-best.


def _escape_markdown(text: str) -> str:
    """Backslash-escape ASCII punctuation so file names and words render as plain text."""
    return "".join(f"\\{ch}" if ch.isascii() and not ch.isalnum() and not ch.isspace() else ch for ch in text)


def _message(title: str, detail: str) -> str:
    return f"### ⚠️ {title}\n\n{detail}"


def _check_upload(image_path: str | os.PathLike | None) -> tuple[str | None, str]:
    """(friendly message or None, file name to show) for an uploaded path, before decoding it."""
    if image_path is None or str(image_path) == "":
        return PROMPT, ""
    name = Path(image_path).name
    try:
        size = os.path.getsize(image_path)
    except OSError:
        return _message("The upload was lost", "Please upload the photo again."), name
    if size > MAX_UPLOAD_BYTES:
        return _message("That file is too large",
                        f"**{_escape_markdown(name)}** is {size / 2**20:.1f} MB; the demo accepts files up to "
                        f"{MAX_UPLOAD_BYTES // 2**20} MB. A JPEG saved at a smaller size will work."), name
    return None, name


def _unusable(name: str, reason: str) -> str:
    """The friendly message for a file the library's checks refused to decode, for `reason`."""
    return _message("That file could not be used as a photo",
                    f"**{_escape_markdown(name)}**: {_escape_markdown(reason)}.\n\n{LIMITS}")


def _load(image_path: str | os.PathLike, name: str, draft_size: int | None = None,
          max_pixels: int = MAX_PIXELS) -> tuple[Image.Image | None, str | None]:
    """(PIL image, None) or (None, friendly message), decoding with the library's checks."""
    try:
        return load_image(image_path, max_pixels=max_pixels, draft_size=draft_size), None
    except ImageLoadError as error:
        return None, _unusable(name, error.reason)


def decode_settings(strategy: str, beam_size: int, temperature: float, seed: float | None,
                    n_best: int, decoding: DecodeConfig | None = None) -> tuple[DecodeConfig, str]:
    """The DecodeConfig the demo's controls ask for (the server's `decoding` with the visitor's strategy,
    beam size, temperature, seed and n-best), and a note when a setting had to be adjusted."""
    beam_size, n_best = max(1, int(beam_size)), max(1, min(int(n_best), MAX_N_BEST))
    note = ""
    if strategy == "greedy" and n_best > 1:
        n_best, note = 1, "Greedy decoding gives exactly one caption."
    elif strategy == "beam" and n_best > beam_size:
        n_best, note = beam_size, f"Beam search keeps {beam_size} beams, so it returns at most {beam_size} captions."
    seed_value = None if seed is None or seed == "" else int(seed)
    config = replace(decoding or DecodeConfig(), strategy=strategy, beam_size=beam_size, n_best=n_best,
                     temperature=float(temperature), seed=seed_value)
    return config, note


def _describe(config: DecodeConfig, captioner: Captioner | None = None) -> str:
    reranker = captioner.reranker if captioner is not None else None
    if config.strategy == "beam" and reranker is not None:
        return (f"beam search, {reranker.config.candidates} candidates re-ranked by agreement with the captions of "
                f"the {reranker.config.neighbours} most similar of {len(reranker.memory)} training photos")
    if config.strategy == "beam":
        return f"beam search, beam size {config.beam_size}"
    if config.strategy == "sample":
        seed = "random seed" if config.seed is None else f"seed {config.seed}"
        return f"sampling, temperature {config.temperature:g}, {seed}"
    return "greedy decoding"


@dataclass(frozen=True)
class CaptionRequest:
    """One visitor's press of **Caption**: the uploaded file and the decoding controls, as Gradio gives them."""

    image_path: str | os.PathLike | None
    strategy: str = "beam"
    beam_size: int = 3
    temperature: float = 1.0
    seed: float | None = 0
    n_best: int = 3


def predict(captioner: Captioner, image_path: str | os.PathLike | None, strategy: str = "beam",
            beam_size: int = 3, temperature: float = 1.0, seed: float | None = 0,
            n_best: int = 3, decoding: DecodeConfig | None = None) -> tuple[str, list[Row]]:
    """Caption one uploaded file with the server's `decoding` settings (default: DecodeConfig()) and the
    visitor's controls. Returns (Markdown: the best caption as a heading, the concepts recognised in the
    photo with their probabilities, or a friendly message when the file cannot be used; n-best rows
    [rank, caption, log-prob, score], best first). Never raises for a bad upload or bad settings."""
    return predict_batch(captioner, [CaptionRequest(image_path, strategy, beam_size, temperature, seed, n_best)],
                         decoding)[0]


def predict_batch(captioner: Captioner, requests: list[CaptionRequest],
                  decoding: DecodeConfig | None = None) -> list[tuple[str, list[Row]]]:
    """`predict` for several requests at once, through the pipeline (`Captioner.stream`): every usable
    photo read and decoded once, in one CNN batch, then one decoder call per group of requests with the
    same settings (each sampling request alone, so that its seeded draw does not depend on who else was in
    the batch). Answers in request order; never raises."""
    answers: list[tuple[str, list[Row]] | None] = [None] * len(requests)
    usable = []  # (request index, file, config, note, file name)
    for index, request in enumerate(requests):
        message, name = _check_upload(request.image_path)
        if message is not None:
            answers[index] = message, []
            continue
        try:
            config, note = decode_settings(request.strategy, request.beam_size, request.temperature, request.seed,
                                           request.n_best, decoding)
        except ValueError as error:
            answers[index] = _message("Those settings do not work together", _escape_markdown(str(error))), []
            continue
        usable.append((index, request.image_path, config, note, name))
    if usable:
        def decode(features: torch.Tensor, config: DecodeConfig) -> list[list[Caption] | None]:
            try:  # a failing setting costs its own requests only
                return captioner.caption_features(features, config)
            except Exception:  # a bug, not the visitors' fault: log it here, show no stack trace there
                logger.exception("captioning %d photos with %r failed", len(features), config)
                return [None] * len(features)

        try:
            results = [item for group in caption_images(
                [path for _, path, _, _, _ in usable], captioner.encoder, decode, [c for _, _, c, _, _ in usable],
                batch_size=len(usable), decode_batch_size=len(usable), num_workers=0, max_pixels=captioner.max_pixels)
                for item in group]
        except Exception:
            logger.exception("the CNN failed on a batch of %d photos", len(usable))
            results = []
        for item in results:
            index, _, config, note, name = usable[item.index]
            if item.error is not None:
                answers[index] = _unusable(name, item.error), []
            elif item.captions is not None:
                answers[index] = _answer(captioner, config, note, item.captions)
    return [answer if answer is not None else (_went_wrong(), []) for answer in answers]


def _went_wrong() -> str:
    return _message("Something went wrong while captioning",
                    "The error was logged on the server. Please try another photo.")


def _answer(captioner: Captioner, config: DecodeConfig, note: str, captions: list[Caption]) -> tuple[str, list[Row]]:
    """The caption Markdown and n-best rows for one photo's captions (best first)."""
    if not captions:
        return _message("That photo could not be captioned", "no caption was produced"), []
    best = captions[0]
    heading = best.text[:1].upper() + best.text[1:] if best.text else "(empty caption)"
    details = [_describe(config, captioner), f"log-prob {best.log_prob:.2f}"]
    if best.consensus is not None:
        details.append(f"consensus CIDEr-D {best.consensus:.2f}")
    if not best.finished:
        details.append(f"cut off at {config.max_length} words")
    markdown = f"## {_escape_markdown(heading)}\n\n*{_escape_markdown(' · '.join(details))}*"
    concepts = _concepts_line(config, best)
    if concepts:
        markdown += f"\n\n{concepts}"
    if note:
        markdown += f"\n\n{_escape_markdown(note)}"
    rows = [[rank, caption.text + ("" if caption.finished else " …"), round(caption.log_prob, 3),
             round(caption.score, 3)] for rank, caption in enumerate(captions, start=1)]
    return markdown, rows


def _concepts_line(config: DecodeConfig, best: Caption) -> str:
    """Markdown naming the concepts the CNN recognised, with their probabilities, and what the caption did
    with them; empty when concepts are off."""
    if config.concept_threshold is None:
        return ""
    if not best.concepts:
        return f"Recognised: nothing the captioner can name with p ≥ {config.concept_threshold:g}"
    words = " · ".join(f"**{_escape_markdown(c.word)}** {c.p:.2f}" for c in best.concepts)
    if best.constraints_met is False:
        outcome = "no caption naming them was found; this is the plain one"
    elif best.constraints_met:
        outcome = "the caption was made to name them"
    else:
        outcome = "only beam search is made to name them"
    return f"Recognised: {words} ({_escape_markdown(outcome)})"


class BatchedPredictor:
    """The demo's **Caption** handler: Gradio calls it from one thread per visitor; a RequestBatcher answers
    the simultaneous ones with `predict_batch` (with the server's `decoding` settings), and tells visitors
    beyond `max_pending` the demo is busy."""

    def __init__(self, captioner: Captioner, max_batch_size: int = MAX_BATCH_SIZE, max_pending: int = MAX_PENDING,
                 gather_seconds: float = GATHER_SECONDS, decoding: DecodeConfig | None = None):
        self.batcher = RequestBatcher(lambda requests: predict_batch(captioner, requests, decoding), max_batch_size,
                                      max_pending, gather_seconds)

    def __call__(self, image_path: str | os.PathLike | None, strategy: str = "beam", beam_size: int = 3,
                 temperature: float = 1.0, seed: float | None = 0, n_best: int = 3) -> tuple[str, list[Row]]:
        try:
            return self.batcher.submit(CaptionRequest(image_path, strategy, beam_size, temperature, seed, n_best))
        except Busy as busy:
            waiting = f"{busy.pending} photo{'s' if busy.pending != 1 else ''}"
            return _message("The demo is busy", f"{waiting} ahead of yours are being captioned. "
                                                "Please try again in a few seconds."), []
        except Exception:  # predict_batch never raises; anything here is a bug
            logger.exception("the caption batcher failed")
            return _went_wrong(), []


def preview(image_path: str | os.PathLike | None,
            max_pixels: int = MAX_PIXELS) -> tuple[Image.Image | None, str]:
    """(the photo as the model will see it, upright, at most PREVIEW_SIZE px; message for the caption area)."""
    message, name = _check_upload(image_path)
    if message is not None:
        return None, message
    image, message = _load(image_path, name, draft_size=PREVIEW_SIZE, max_pixels=max_pixels)
    if image is None:
        return None, message
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    return image, READY


def example_paths(examples_dir: str | Path | None = EXAMPLES_DIR) -> list[Path]:
    if examples_dir is None or not Path(examples_dir).is_dir():
        return []
    return sorted(p for p in Path(examples_dir).iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)


def build_app(captioner: Captioner, examples_dir: str | Path | None = EXAMPLES_DIR,
              predictor: BatchedPredictor | None = None, decoding: DecodeConfig | None = None) -> gr.Blocks:
    """The demo page for an already loaded Captioner, with Gradio's queue set up. `predictor`: the Caption
    button's handler (default: a BatchedPredictor with the demo's settings and the server's `decoding`; pass
    one to watch its batches)."""
    import gradio as gr

    caption_upload = predictor or BatchedPredictor(captioner, decoding=decoding)

    def show_preview(image_path):
        return preview(image_path, max_pixels=captioner.max_pixels)

    def show_controls(strategy):
        return (gr.update(visible=strategy == "beam"), gr.update(visible=strategy == "sample"),
                gr.update(visible=strategy == "sample"))

    with gr.Blocks(title="captioner demo", analytics_enabled=False) as app:
        gr.Markdown("# captioner\nA CNN reads the photo, an LSTM writes the caption.")
        with gr.Row():
            with gr.Column(scale=1):
                # The upload reaches us as a file path, not as gr.Image(type=...): gr.Image opens every
                # upload with PIL itself first, so a renamed text file or a 50,000×50,000 PNG would fail
                # inside Gradio with a bare "Error", and "pil"/"numpy" would decode it without our pixel
                # limit. With gr.File, load_image alone decodes it: size limit, EXIF orientation, RGB,
                # and an error message that says what is wrong with the file.
                photo = gr.File(label="Photo", file_types=["image"], elem_id="photo")
                shown = gr.Image(label="What the model sees", type="pil", interactive=False,
                                 height=320, elem_id="preview")
                strategy = gr.Radio(STRATEGIES, value="beam", label="Decoding", elem_id="strategy")
                beam_size = gr.Slider(1, 10, value=3, step=1, label="Beam size")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.1, label="Temperature", visible=False)
                seed = gr.Number(value=0, precision=0, label="Seed (empty: random)", visible=False)
                n_best = gr.Slider(1, MAX_N_BEST, value=3, step=1, label="Captions to show (n-best)")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column(scale=1):
                best = gr.Markdown(PROMPT, elem_id="best-caption")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["number", "str", "number", "number"],
                                     interactive=False, label="n-best (log-prob: sum of word log-probabilities)",
                                     elem_id="nbest")
                paths = example_paths(examples_dir)
                if paths:
                    # Two columns so the table shows thumbnails; a click fills the upload and the preview.
                    gr.Examples([[str(p), str(p)] for p in paths], inputs=[photo, shown],
                                label="Example photos (public domain / CC0)")

        strategy.change(show_controls, strategy, [beam_size, temperature, seed], queue=False,
                        api_visibility="private")
        photo.change(show_preview, photo, [shown, best], api_visibility="private")
        button.click(caption_upload, [photo, strategy, beam_size, temperature, seed, n_best], [best, table],
                     api_name="caption", concurrency_limit=CAPTION_THREADS)
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE, api_open=False)
    return app


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          examples_dir: str | Path | None = EXAMPLES_DIR, prevent_thread_lock: bool = False) -> None:
    """Start the server. Only the example photos are added to what Gradio may serve."""
    # Gradio imports matplotlib inside its event loop on the first event it runs (to pin the "agg"
    # backend), which stalls every connection for seconds; pay that before the first visitor instead.
    import matplotlib

    matplotlib.use("agg")
    allowed = [str(path.resolve()) for path in example_paths(examples_dir)]
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=allowed,
               max_file_size=MAX_UPLOAD_BYTES, prevent_thread_lock=prevent_thread_lock,
               max_threads=CAPTION_THREADS + 2 * CONCURRENCY,  # a thread per waiting caption request
               ssr_mode=False,  # client-side rendering: no Node.js needed
               enable_monitoring=False, mcp_server=False, run_history=False,
               footer_links=["api", "gradio", "settings"])


def launch(checkpoint_path: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, device: str = "auto", memory: str | Path | None = None, rerank: Any = None,
           max_pixels: int = MAX_PIXELS, decoding: DecodeConfig | None = None) -> None:
    """Load the checkpoint once (with a caption memory for consensus re-ranking, when given), then serve
    the demo until interrupted. `decoding`: the server's decoding settings, e.g. the concepts every caption
    uses (`concept_threshold` None: concepts off); visitors choose the strategy, beam size, temperature,
    seed and n-best."""
    import torch

    # One batcher thread runs the CNN and the decoder for everybody: it may use every core.
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    captioner = Captioner.from_pretrained(checkpoint_path, device=device, memory=memory, rerank=rerank,
                                          max_pixels=max_pixels)
    serve(build_app(captioner, decoding=decoding), host=host, port=port, share=share)
