"""Stage 1: feature alignment. Projector only, template `plain`, lr 1e-3, global batch 256,
1 epoch, warmup 3%, cosine, weight decay 0 (XLLAVA.md section 4).

  xllava train --config configs/align.py:xllava_13b --config.init=ckpt/pretrained \
      --config.data.corpus=cc3m_en.json,cc3m_ko.json --config.data.image_root=cc3m --workdir runs/align
"""

from common import RECIPE_SCALE, base


def get_config(preset: str = "demo"):
    c = base("align", preset)
    c.train.trainable = "projector"
    c.train.lr = 1e-3
    c.train.batch_size = 256
    c.train.weight_decay = 0.0
    c.data.template = "plain"
    c.data.aspect = "crop"
    if preset in RECIPE_SCALE:
        # Packed: three captions with their images per 2048-token row, so 96 rows hold about the paper's 256
        # captions (train.batch_size counts rows); two micro-batches of 48 rows fit a v5e-16 (16 GiB chips).
        c.data.pack = True
        c.train.batch_size, c.train.grad_accum = 96, 2
    if preset == "demo":
        c.train.steps, c.train.batch_size, c.data.max_len = 150, 32, 64
        c.checkpoint.every = 100
    return c
