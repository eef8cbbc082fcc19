"""Write the committed sample images under ``samples/`` (offline, deterministic).

    python scripts/make_samples.py [--out samples]

* ``ihc_colon.png`` + four 256x256 tiles: real IHC-stained colon tissue bundled with
  scikit-image, to show what the demo detector does on real (out-of-domain) tissue.
* ``synthetic_XX.png`` (+ two ``.jpg`` copies): tiles from the training generator with a
  seed the training set never used, plus their ground truth in ``synthetic_labels.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

# Running as ``python scripts/make_samples.py`` puts scripts/ on sys.path.
from synthetic_histology import CLASS_NAMES, generate_image, tile_rng

REPO = Path(__file__).resolve().parents[1]
# train_demo_model.py uses seed 0 (its default), so these tiles are unseen by the model.
SAMPLE_SEED = 2024
N_SYNTHETIC = 6
JPEG_COPIES = (0, 1)
TILE = 256

README = """\
# Sample images

Regenerate with `python scripts/make_samples.py` (deterministic, offline).

| File | Source |
| --- | --- |
| `ihc_colon.png` | `skimage.data.immunohistochemistry()`: real 512x512 RGB micrograph of \
colonic glands, FHL2 protein revealed by IHC with DAB (brown) and hematoxylin counterstain \
(blue), acquired at the Center for Microscopy And Molecular Imaging (CMMI); bundled with \
scikit-image, "no known copyright restrictions" per its docstring. |
| `ihc_colon_tile_{{r}}{{c}}.png` | The same image cut into four 256x256 tiles \
(row `r`, column `c`). |
| `synthetic_XX.png` | {n} procedurally generated H&E-like liver tiles (320x320) from \
`scripts/synthetic_histology.py`, seed {seed} (the demo model was trained on seed 0). |
| `synthetic_{jpg}.jpg` | JPEG (quality 90) copies of those PNGs, to exercise JPEG decoding. |
| `synthetic_labels.json` | Ground-truth boxes for the synthetic tiles \
(`[x1, y1, x2, y2]` pixels, class names {names}). |

The synthetic tiles contain the four demo classes: fibrosis (pale-blue collagen bands),
inflammation (clusters of small dark nuclei), steatosis (clear fat vacuoles) and ballooning
(large pale cells with a central nucleus). They are illustrations, not medical data; the
IHC image is real tissue but not liver and not H&E, so detections on it are out of domain.
"""


def save_png(img: np.ndarray, path: Path) -> None:
    # optimize=True keeps the committed samples small at no quality cost.
    Image.fromarray(img).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "samples")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    ihc = data.immunohistochemistry()
    save_png(ihc, out / "ihc_colon.png")
    for r in range(ihc.shape[0] // TILE):
        for c in range(ihc.shape[1] // TILE):
            tile = ihc[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
            save_png(np.ascontiguousarray(tile), out / f"ihc_colon_tile_{r}{c}.png")

    labels: dict[str, list[dict[str, object]]] = {}
    for i in range(N_SYNTHETIC):
        img, boxes = generate_image(tile_rng(SAMPLE_SEED, i))
        name = f"synthetic_{i:02d}"
        save_png(img, out / f"{name}.png")
        if i in JPEG_COPIES:
            Image.fromarray(img).save(out / f"{name}.jpg", quality=90)
        labels[f"{name}.png"] = [
            {"class": CLASS_NAMES[cls], "box": [round(v, 1) for v in (x1, y1, x2, y2)]}
            for cls, x1, y1, x2, y2 in boxes
        ]
    (out / "synthetic_labels.json").write_text(json.dumps(labels, indent=1) + "\n")

    jpgs = ", ".join(f"{i:02d}" for i in JPEG_COPIES)
    (out / "README.md").write_text(
        README.format(
            n=N_SYNTHETIC, seed=SAMPLE_SEED, jpg=f"{{{jpgs}}}", names=", ".join(CLASS_NAMES)
        )
    )
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {len(list(out.iterdir()))} files to {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
