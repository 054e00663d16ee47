"""Command line: `vitaclip ...` / `python -m vitaclip ...`."""
from __future__ import annotations

import argparse
import sys

import torch

from . import VitaCLIP, VitaCLIPConfig


def demo(args: argparse.Namespace) -> None:
    """Quick start: a small random Vita-CLIP scoring a random clip."""
    torch.manual_seed(args.seed)
    config = VitaCLIPConfig(image_size=64, patch_size=16, width=128, layers=2, heads=2, embed_dim=64,
                            num_frames=4, text_width=128, text_layers=2, text_heads=2)
    classes = ["waving", "clapping", "jumping"]
    model = VitaCLIP(config, classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 4, 64, 64))
    for name, p in zip(classes, logits.softmax(-1)[0].tolist()):
        print(f"{name:10s} {p:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vitaclip", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="build a small model and print its class probabilities",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
