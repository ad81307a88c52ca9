"""Stage 1: feature alignment. Projector only, template `plain`, lr 1e-3, global batch 256,
1 epoch, warmup 3%, cosine, weight decay 0 (XLLAVA.md section 4).

  xllava train --config configs/align.py:xllava_13b --config.init=ckpt/pretrained \
      --config.data.corpus=cc3m_en.json,cc3m_ko.json --config.data.image_root=cc3m --workdir runs/align
"""

from common import base


def get_config(preset: str = "demo"):
    c = base("align", preset)
    c.train.trainable = "projector"
    c.train.lr = 1e-3
    c.train.batch_size = 256
    c.train.weight_decay = 0.0
    c.data.template = "plain"
    c.data.aspect = "crop"
    if preset == "demo":
        c.train.steps, c.train.batch_size, c.data.max_len = 150, 32, 64
        c.checkpoint.every = 100
    return c
