"""The Gradio page of ``opensora-plan serve``.

One column of settings (prompt, negative prompt, version, steps, guidance, seed or random, scheduler,
caching preset when one exists, frame interpolation and upscaling when the model folder has those stages or
``--interpolate_model`` / ``--upscale_model`` give them), a progress bar per denoising step, the video with mp4 and gif
downloads, and a gallery of this page's results. Requests go through Gradio's queue one at a time
(``default_concurrency_limit=1``): a second user waits in line instead of sharing the CPU/GPU.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import ClassVar

from opensora_plan.data.video_io import gif_plan
from opensora_plan.options import Options, option
from opensora_plan.pipelines.sample_t2v import RELEASE_SAMPLE_DEFAULTS

from opensora_plan.ui.service import MAX_SEED, MAX_STEPS, GenerationRequest, VideoService, cache_presets

logger = logging.getLogger(__name__)


def _import_gradio():
    """The ``gradio`` module, or :class:`~opensora_plan.utils.MissingExtraError` naming the [ui] extra."""
    from opensora_plan.utils import require_extra

    return require_extra("gradio", "ui", "The web UI (opensora-plan serve)")


def build_app(service: VideoService):
    """The ``gradio.Blocks`` page for ``service`` (not launched)."""
    gr = _import_gradio()
    defaults = service.defaults
    frames, height, width = service.size_of()
    title = "Open-Sora-Plan v1.0.0 text-to-video" + (" — demo model" if service.is_demo else "")
    limits = (f"The demo model draws one shape on black, {width}x{height}, {frames} frames at "
              f"{defaults['fps']:g} fps, from prompts like *a red circle moving left* (colours red, green, blue, "
              "yellow, white; circle, square, triangle; left, right, up, down). Other prompts give blobs."
              if service.is_demo else f"Model folder: `{service.folder}`.")

    def labels(choices: list[int]) -> list[str]:  # [1, 2, 4] -> ["off", "2x", "4x"]
        return ["off", *(f"{c}x" for c in choices[1:])]

    def factor(label) -> int:  # "off" -> 1, "2x" -> 2
        return 1 if label in (None, "off") else int(str(label).rstrip("x"))

    from opensora_plan.utils import OutOfMemory

    def generate(prompt, negative_prompt, version, steps, guidance, seed, random_seed, scheduler, cache, interpolate,
                 upscale, gallery, progress=gr.Progress()):
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, version=version,
                                    num_inference_steps=steps, guidance_scale=guidance,
                                    seed=None if random_seed else seed, scheduler=scheduler, cache=cache,
                                    interpolate=factor(interpolate), upscale=factor(upscale))
        progress(0, desc="denoising")
        hint = service.prompt_hint(prompt or "") if (prompt or "").strip() else None
        if hint:  # sampled anyway: the user sees why the video may not follow the prompt
            gr.Warning(hint[0].upper() + hint[1:])
        try:
            result = service.generate(request, on_step=lambda done, total: progress((done, total), desc="denoising"))
        except (ValueError, FileNotFoundError, OutOfMemory) as err:  # the user's input, or one line naming the stage
            logger.warning("request refused: %s", err)
            raise gr.Error(str(err), print_exception=False) from None
        gallery = list(gallery or []) + [(str(result.gif), result.caption())]
        info = (f"seed {result.seed} · {result.num_frames} frames {result.width}x{result.height} at "
                f"{result.fps:g} fps · {result.seconds:.1f} s")
        step, gif_fps = gif_plan(result.fps)
        if step > 1:  # GIFs play at most 50 fps: say what the download holds
            info += f" · GIF: every {step} frames at {gif_fps:g} fps (GIFs play at most 50 fps)"
        return str(result.mp4), [str(result.mp4), str(result.gif)], info, result.seed, gallery, gallery

    def describe(version):
        f, h, w = service.size_of(version)
        return f"{f} frames, {w}x{h}"

    with gr.Blocks(title="opensora-plan") as app:
        gr.Markdown(f"## {title}\n{limits}")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder=service.example_prompts()[0],
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative_prompt")
                with gr.Row():
                    version = gr.Dropdown(service.versions, value=service.version, label="Version",
                                          interactive=len(service.versions) > 1, elem_id="version")
                    size = gr.Textbox(describe(service.version), label="Size", interactive=False)
                steps = gr.Slider(1, MAX_STEPS if not service.is_demo else 100, step=1,
                                  value=defaults["num_sampling_steps"], label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, step=0.5, value=defaults["guidance_scale"], label="Guidance scale",
                                     elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                    random_seed = gr.Checkbox(False, label="Random seed", elem_id="random_seed")
                scheduler = gr.Dropdown(service.scheduler_names, value=defaults["sample_method"], label="Scheduler",
                                        elem_id="scheduler")
                presets = cache_presets()
                cache = gr.Dropdown(presets, value=presets[0], label="Step caching (fast: about 2x, docs/sampling.md)",
                                    elem_id="cache")
                interpolations, upscales = labels(service.interpolation_choices()), labels(service.upscale_choices())
                with gr.Row():  # shown only when the folder (or a flag) gives the stage's model
                    interpolate = gr.Dropdown(interpolations, value="off", elem_id="interpolate",
                                              label="Frame interpolation (AMT, fps x N)",
                                              visible=len(interpolations) > 1)
                    upscale = gr.Dropdown(upscales, value="off", label="Upscaling (RGT)", elem_id="upscale",
                                          visible=len(upscales) > 1)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(service.example_prompts(), inputs=[prompt], label="Examples")
            with gr.Column(scale=1):
                video = gr.Video(label="Video", autoplay=True, loop=True, height=360, elem_id="video")
                info = gr.Markdown(elem_id="info")
                files = gr.File(label="Download (mp4, gif)", file_count="multiple", elem_id="downloads")
                gallery = gr.Gallery(label="This session", columns=4, height="auto", elem_id="gallery")
        version.change(describe, inputs=version, outputs=size)
        # The progress bar shows on the video only: over every output it would cover the seed box.
        for event in (button.click, prompt.submit):
            event(generate, inputs=[prompt, negative, version, steps, guidance, seed, random_seed, scheduler, cache,
                                    interpolate, upscale, history],
                  outputs=[video, files, info, seed, gallery, history], show_progress_on=[video])
    # One generation at a time; others wait in the queue (and see their place in it).
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


@dataclass
class ServeOptions(Options):
    """Every option of ``opensora-plan serve`` / :func:`serve`, with its default and checks."""

    COMMAND: ClassVar[str] = "serve"
    NONFINITE_OK: ClassVar[tuple[str, ...]] = ("memory_gb",)  # checked below, nan and inf too

    model_path: str | None = option(None, help="demo or save_pretrained folder (model_index.json), or a release "
                                    "folder with version folders and vae/ (unset: the shipped demo)")
    version: str | None = option(None, help="version folder to load first (release folders; unset: "
                                 f"{RELEASE_SAMPLE_DEFAULTS['version']})")
    text_encoder_name: str | None = option(None, help="local T5 folder (needed for a release folder)")
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    port: int = option(7860, help="port")
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")
    dtype: str = option("auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto = fp16 on GPU, fp32 on CPU")
    out_dir: str | None = option(None, help="where the videos are written (unset: a temporary folder)")
    interpolate_model: str | None = option(None, show_default=False, help="AMT weights (amt-g.pth or a "
                                           "save_pretrained folder) offered as 2x/4x frame interpolation (unset: the "
                                           "model folder's stages.interpolate, if any)")
    upscale_model: str | None = option(None, show_default=False, help="RGT weights (RGT_x2.pth / RGT_x4.pth or a "
                                       "save_pretrained folder) offered as upscaling (unset: the model folder's "
                                       "stages.upscale, if any)")
    memory_gb: float | None = option(None, show_default=False, help="memory of the compute device the plan may use, "
                                     "in GiB (unset: its free memory; docs/sampling.md, 'Memory plan')")
    offload: str | None = option(None, choices=["none", "model", "sequential"], show_default=False,
                                 help="where the models wait between requests (CUDA only; unset: the memory plan's "
                                 "choice)")

    def __post_init__(self):
        if self.memory_gb is not None and not (self.memory_gb > 0 and math.isfinite(self.memory_gb)):
            raise ValueError(f"--memory_gb must be a positive number of GiB, got {self.memory_gb}.")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}.")


def check_port_free(host: str, port: int) -> None:
    """ValueError naming ``--port`` when ``port`` is taken on ``host`` (a bind with SO_REUSEADDR, as Gradio tests it);
    other bind errors are left to Gradio."""
    import errno
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1" if host == "localhost" else host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return
            raise ValueError(f"--port {port} on {host} is not free ({err.strerror or err}): another server (an earlier "
                             f"serve?) holds it; stop that one or pass another --port, e.g. --port {port + 1}.") from None


def serve(*args, **kwargs) -> None:
    """Load the model, then serve the page on ``http://host:port`` until interrupted.

    Takes a :class:`ServeOptions`, or its fields (model_path, version, ... positionally)."""
    o = ServeOptions.of(*args, **kwargs)
    _import_gradio()  # before loading a model: a missing extra fails at once
    check_port_free(o.host, o.port)  # and a taken port
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one INFO line each
    service = VideoService(o.model_path, version=o.version, text_encoder_name=o.text_encoder_name, device=o.device,
                           dtype=o.dtype, out_dir=o.out_dir, interpolate_model=o.interpolate_model,
                           upscale_model=o.upscale_model, memory_gb=o.memory_gb, offload=o.offload)
    app = build_app(service)
    print(f"opensora-plan serve: http://{o.host}:{o.port} (model {service.folder}, version {service.version})",
          flush=True)
    try:
        app.launch(server_name=o.host, server_port=o.port, share=False, show_error=True,
                   allowed_paths=[str(service.out_dir)], quiet=True)
    except OSError:  # taken while the model loaded; Gradio's message names its environment variable
        check_port_free(o.host, o.port)
        raise
