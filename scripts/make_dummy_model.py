"""Write an HF-format model directory (config, tokenizer, optional random weights) offline.

python scripts/make_dummy_model.py --preset tiny-qwen3 --out /tmp/tiny-qwen3 --weights
python scripts/make_dummy_model.py --preset qwen3-8b --out /tmp/qwen3-8b   # serve with
    # --load-format dummy: real shapes, random weights made on the device
"""

from __future__ import annotations

import argparse

from sglab.srt.utils.dummy_model import PRESETS, make_dummy_model


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--weights", action="store_true", help="also write random safetensors weights"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"],
        help="torch_dtype of config and weights (default: the preset's)",
    )
    args = parser.parse_args(argv)
    path = make_dummy_model(args.preset, args.out, args.weights, args.seed, args.dtype)
    print(path)
    return path


if __name__ == "__main__":
    main()
