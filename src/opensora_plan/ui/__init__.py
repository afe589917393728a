"""Web UI (``opensora-plan serve``): a Gradio page over :class:`~opensora_plan.pipelines.OpenSoraPlanPipeline`.

Needs the optional extra ``pip install -e ".[ui]"`` (gradio). ``service.py`` holds everything that does
not need gradio (loading, validation, sampling, writing mp4/gif), ``app.py`` the page.
"""
