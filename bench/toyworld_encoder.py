"""The toy world's trained image encoder vs a random tiny encoder: linear probes and caption retrieval.

Trains (or reuses, by config hash) the toy CLIP on a toy catalog (``polymodal toyworld data``, random layout),
then embeds *held-out* random-layout 64 px toy images (another dataset seed) through the product's loader
(``polymodal.encoders.build_encoder``, kind ``clip``) and through the random ``tiny`` encoder (dim 256), and fits
a logistic-regression probe per attribute (colour: 4 classes; shape: 3) on half of them, scored on the other
half. Also image -> caption-class retrieval top-1 (12 classes) with the trained text tower.

    .venv/bin/python bench/toyworld_encoder.py [--quick] [--out toyworld_encoder.json]
        [--data toy/data --encoders toy/encoders]   # default: a temporary folder
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/NAME.py` puts bench/ first on the path, not the repo root
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    import torch

    from polymodal.config import EncoderConfig
    from polymodal.encoders import build_encoder
    from polymodal.modality import Modality
    from training.toyworld.data import COLOURS, SHAPES, make_item, write_dataset
    from training.toyworld.encoder import (
        caption_retrieval_top1,
        encoder_config,
        linear_probe_accuracy,
        train_encoders,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short training run and fewer probe items (smoke test)")
    ap.add_argument("--data", type=Path, help="toy data folder (written here if it has no catalog)")
    ap.add_argument("--encoders", type=Path, help="encoder output folder (cached by config hash)")
    ap.add_argument("--count", type=int, default=4800, help="training images written when --data has none")
    ap.add_argument("--probe-items", type=int, default=1200, help="held-out images (half fit the probe)")
    ap.add_argument("--held-out-seed", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    count, probe_items, step_scale = (args.count, args.probe_items, 1.0) if not args.quick else (240, 120, 0.01)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        enc_dir = args.encoders or Path(tmp) / "encoders"
        if not (data / "catalog.jsonl").is_file():
            write_dataset(data, count=count, seed=0, modalities=["image"], size_px=64, layout="random")
        t0 = time.time()
        manifest = train_encoders(data, enc_dir, step_scale=step_scale, progress=not args.quick)
        wall_s = time.time() - t0
        entry = manifest["encoders"]["image"]
        folder = enc_dir / entry["path"]
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20

        items = [make_item("image", i, seed=args.held_out_seed, size_px=64, layout="random")
                 for i in range(probe_items)]
        images, attrs = [it.data for it in items], [it.attributes for it in items]
        labels = {"colour": torch.tensor([list(COLOURS).index(a["colour"]) for a in attrs]),
                  "shape": torch.tensor([SHAPES.index(a["shape"]) for a in attrs])}
        half = probe_items // 2
        encoders = {
            "trained clip": build_encoder(Modality.IMAGE, encoder_config(enc_dir)),
            "random tiny (256)": build_encoder(Modality.IMAGE, EncoderConfig(kind="tiny", dim=256)),
        }
        rows = []
        for name, enc in encoders.items():
            x = enc.encode(images)
            row = {"encoder": name, "dim": enc.dim}
            for attr, y in labels.items():
                row[f"{attr}_probe"] = linear_probe_accuracy(x[:half], y[:half], x[half:], y[half:])
            rows.append(row)
        retrieval = caption_retrieval_top1(folder, images, attrs)

    print(f"training: {entry['figures']}  (this call {wall_s:.1f} s; cached runs skip training)")
    print(f"folder: {size_mb:.2f} MB; held-out: {probe_items} random-layout 64 px images "
          f"(seed {args.held_out_seed}), probe fit on {half}, scored on {probe_items - half}")
    print(f"{'encoder':<20} {'dim':>4} {'colour probe':>13} {'shape probe':>12}")
    for r in rows:
        print(f"{r['encoder']:<20} {r['dim']:>4} {r['colour_probe']:>13.3f} {r['shape_probe']:>12.3f}")
    print(f"trained clip: image -> caption-class retrieval top-1 (12 classes): {retrieval:.3f}")
    result = {"training": entry["figures"], "recipe": entry["recipe"], "folder_mb": round(size_mb, 3),
              "probe_items": probe_items, "probes": rows, "retrieval_top1": retrieval, "quick": args.quick}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
