"""Contact sheet of augmented views, to eyeball a recipe on real images.

    python -m data_tools.views ../shared/data/cifar10/train.tar --recipe simclr --out views.png
    python -m data_tools.views SPEC --recipe byol --views 4 --images 8 --size 96 --scale 3

Each row is one image of SPEC (any input the input layer reads: ImageFolder folder or tar,
shards, image folder, ...): the eval crop first, then its V views, exactly as the training
stream makes them for ``--seed`` / ``--epoch`` (views are seeded by seed, epoch, key and view).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
from PIL import Image

from clipkit.data.decode import DecodeError, eval_crop
from clipkit.data.records import image_bytes
from clipkit.data.sources import iter_records
from clipkit.data.views import RECIPES, make_views, view_spec


def contact_sheet(
    spec: str,
    recipe: str,
    *,
    views: int = 2,
    images: int = 8,
    size: int = 32,
    seed: int = 0,
    epoch: int = 0,
    every: int = 1,
) -> Image.Image:
    """A grid: one row per image (every ``every``-th record), the eval crop then V views.

    Raises:
        ValueError: an unknown recipe, fewer than 2 views, or an input with no image.
    """
    vspec = view_spec(recipe, views)
    rows = []
    for rec in itertools.islice(iter_records(spec), 0, None, every):
        if rec.image is None:
            continue
        data = image_bytes(rec.image)
        try:
            v = make_views(data, size, vspec, seed=seed, epoch=epoch, key=rec.key)  # (V,3,S,S)
            row = [eval_crop(data, size), *v]
        except DecodeError:
            continue
        rows.append(np.concatenate([t.permute(1, 2, 0).numpy() for t in row], axis=1))
        if len(rows) == images:
            break
    if not rows:
        raise ValueError(f"no decodable image in {spec}")
    return Image.fromarray(np.concatenate(rows, axis=0))  # (images * S, (V + 1) * S, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="input: ImageFolder folder/tar, shards, image folder")
    p.add_argument("--recipe", default="simclr", help=f"one of {', '.join(sorted(RECIPES))}")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--every", type=int, default=1, help="take every N-th record (spread classes)")
    p.add_argument("--size", type=int, default=32, help="view side S in pixels")
    p.add_argument("--scale", type=int, default=4, help="enlarge the sheet (nearest) for viewing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--out", default="views.png")
    a = p.parse_args(argv)
    try:
        sheet = contact_sheet(
            a.spec,
            a.recipe,
            views=a.views,
            images=a.images,
            size=a.size,
            seed=a.seed,
            epoch=a.epoch,
            every=a.every,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.scale > 1:
        sheet = sheet.resize((sheet.width * a.scale, sheet.height * a.scale), Image.NEAREST)
    sheet.save(a.out)
    print(f"wrote {a.out}: {a.images} images x (eval crop + {a.views} {a.recipe} views)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
