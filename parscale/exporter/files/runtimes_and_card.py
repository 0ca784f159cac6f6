"""The files an export folder holds for other runtimes and for people, written last by `export`.

One call from the export pipeline, inside its temporary folder (so the export stays atomic and the
manifest's file list covers these files too):

- `transformers_js_config.json` (always): transformers.js runs the folder with it (`web.py`);
- `model.ort` + `required_operators.config` (with `ort_format`): ONNX Runtime Mobile (`mobile.py`);
- `README.md` (always, last, so it can describe every other file): the model card (`card.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from parscale.config import ParScaleConfig
from parscale.exporter.files.card import write_card
from parscale.exporter.files.mobile import write_ort_format
from parscale.exporter.files.web import write_web_files
from parscale.manifest import Manifest


def write_runtime_files_and_card(
    folder: Path, cfg: ParScaleConfig, eos: list[int], manifest: Manifest, name: str, *,
    ort_format: bool = False, stage: Callable[[str], None] | None = None, web: bool = True,
) -> list[str]:
    """Write the extra files into `folder` (the export being built, to be named `name`).

    `web` False (a multi-P export): no transformers.js config, since transformers.js sizes its empty
    cache from the graph's input shapes, whose cache-heads axis is then symbolic."""
    written = write_web_files(cfg, eos, folder) if web else []
    if ort_format:
        if stage is not None:
            stage("converting to ORT format")
        written += write_ort_format(folder)
    written.append(write_card(folder, manifest, name))
    return written
