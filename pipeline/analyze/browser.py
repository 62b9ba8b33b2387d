"""The feature browser: a static page per SAE config (`index.html` + its data, `features.js`), opened from disk.

The data is a script that sets `window.FEATURES` rather than a `.json` file, because browsers refuse `fetch` of a
local file from a `file://` page; it holds the JSON that `pipeline.analyze.features.analyze` returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.atomic import atomic_path

TEMPLATE = Path(__file__).with_name("browser.html")
DATA_FILE = "features.js"


def is_browser_folder(path: Path) -> bool:
    """Whether `path` is a browser folder this pipeline wrote (and may replace)."""
    return (path / DATA_FILE).is_file() and (path / "index.html").is_file()


def write_browser(folder: str | Path, payload: dict) -> Path:
    """Write `folder/index.html` and `folder/features.js` atomically (a finished folder or none); returns the page."""
    folder = Path(folder)
    with atomic_path(folder, is_browser_folder) as tmp:
        tmp.mkdir()
        shutil.copyfile(TEMPLATE, tmp / "index.html")
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        (tmp / DATA_FILE).write_text(f"window.FEATURES = {data};\n", encoding="utf-8")
    return folder / "index.html"


def with_labels(payload: dict, latents: dict | None) -> dict:
    """The payload with each latent's best label and its AUROC from `pipeline probe` (pipeline/probe/outputs.py),
    which the page shows and filters by; unchanged without them."""
    if latents is None:
        return payload
    for feature in payload["features"]:
        feature["label"] = latents["labels"][latents["best_label"][feature["id"]]]
        feature["label_auroc"] = latents["auroc"][feature["id"]]
    return payload | {"labels": latents["labels"]}


def read_browser_data(folder: str | Path) -> dict:
    """The payload of a browser folder (what `write_browser` wrote)."""
    text = (Path(folder) / DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text[text.index("=") + 1 :].rstrip().rstrip(";"))
