"""Small adjustments to Gradio components and the page that ``ui/app.py`` applies (kept apart so the app stays glue).

* :func:`one_or_many` — a multi-file input that also accepts ONE file from an API client (``gradio_client`` users
  pass ``handle_file(path)`` where a list is expected; Gradio would otherwise fail with an opaque validation error).
  The files still go through Gradio's upload checks.
* :data:`CSS` — hide the red "Error" badge Gradio leaves on every output after a failed event: the one-line message
  (a toast) says what went wrong and goes away; the badges stayed for good.
"""

from __future__ import annotations

from gradio.data_classes import ListFiles
from pydantic import model_validator

CSS = """
[data-testid="status-tracker"] span.error, [data-testid="status-tracker"] .clear-status { display: none !important; }
"""


class OneOrManyFiles(ListFiles):
    """A list of files that also validates a single file (wrapped into a one-item list)."""

    @model_validator(mode="before")
    @classmethod
    def _wrap_single(cls, value):
        return [value] if isinstance(value, dict) else value


def one_or_many(component):
    """Let a ``gr.File(file_count="multiple")`` take one file as well as a list; returns the component."""
    component.data_model = OneOrManyFiles
    return component
