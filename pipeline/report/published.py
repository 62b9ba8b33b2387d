"""Published SynthSAEBench-16k results, shown beside this project's when a run is on that benchmark's data.

The rows are SAELens's SynthSAEBench documentation (Chanin & Garriga-Alonso 2026) for its 16k model: 16,384
features in 768 dimensions, SAEs of 4,096 latents trained on 200M samples, batch 1,024, lr 3e-4. "Standard L1"
is this project's relu. The published table has no TopK row.
"""

from __future__ import annotations

SOURCE = "SAELens's SynthSAEBench docs, the 16k model"
SHAPE = {"n_features": 16384, "d_model": 768}
COLUMNS = ("F1", "MCC", "explained variance")
# architecture -> L0 -> (F1, MCC, explained variance)
SYNTHSAEBENCH_16K = {
    "batchtopk": {25: (0.732, 0.757, 0.792), 20: (0.818, 0.753, 0.789)},
    "matryoshka": {25: (0.879, 0.793, 0.779), 20: (0.860, 0.746, 0.770)},
    "jumprelu": {25: (0.732, 0.753, 0.795), 20: (0.824, 0.743, 0.791)},
    "relu": {25: (0.556, 0.604, 0.765), 20: (0.578, 0.583, 0.750)},
}
L0_TOLERANCE = 2.5  # our held-out L0 is compared with the published column it is this close to, else none


def applies(synthetic: dict | None) -> bool:
    """Whether a synthetic store's settings are the published model's shape."""
    return bool(synthetic) and all(synthetic.get(name) == value for name, value in SHAPE.items())


def published(architecture: str, l0: float) -> tuple[int, tuple[float, float, float]] | None:
    """The published (L0 column, values) for an SAE of `architecture` at held-out `l0`, where there is one."""
    columns = SYNTHSAEBENCH_16K.get(architecture, {})
    near = [column for column in columns if abs(column - l0) <= L0_TOLERANCE]
    return (near[0], columns[near[0]]) if near else None


def comparison_lines(metrics: dict[str, dict], fmt) -> list[str]:
    """A table of every config's F1, MCC and explained variance beside the published row at its L0."""
    lines = [
        f"Beside the published rows ({SOURCE}; ours / published; a published row is shown where one exists within "
        f"±{L0_TOLERANCE} of our held-out L0):",
        "",
        "| config | architecture | held-out L0 | published L0 | " + " | ".join(COLUMNS) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for key, m in metrics.items():
        architecture = m["train"]["config"]["architecture"]
        rec, truth = m["eval"]["reconstruction"], m["eval"]["ground_truth"]
        ours = (truth["f1"], truth["mcc"], rec["explained_variance"])
        found = published(architecture, rec["l0"])
        theirs = found[1] if found else (None,) * len(COLUMNS)
        cells = [f"{fmt(a)} / {fmt(b)}" for a, b in zip(ours, theirs, strict=True)]
        column = str(found[0]) if found else "none"
        lines.append(f"| {key} | {architecture} | {fmt(rec['l0'])} | {column} | " + " | ".join(cells) + " |")
    return [*lines, ""]
