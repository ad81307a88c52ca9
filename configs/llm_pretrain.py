"""Stage 0: continue LM pretraining on English + Korean text (XLLAVA.md section 4).

LoRA r 8 / alpha 32 / dropout 0.05 on q,k,v,o,gate,up,down, plus fully trained embedding and
lm_head rows; lr 5e-5, AdamW (0.9, 0.99), seed 42.

  xllava train --config configs/llm_pretrain.py:xllava_13b --config.init=ckpt/llama2-13b-expanded \
      --config.data.text=wiki_en.txt,wiki_ko.txt --workdir runs/pretrain
"""

from common import base


def get_config(preset: str = "demo"):
    c = base("llm_pretrain", preset)
    c.train.trainable = "lora,embeddings"
    c.train.lr = 5e-5
    c.train.b2 = 0.99
    c.train.weight_decay = 0.0
    c.lora.r, c.lora.alpha, c.lora.dropout = 8, 32.0, 0.05
    c.data.max_len = 2048
    c.train.batch_size = 16         # not given by the paper; one 2048-token row per chip of a v5e-16
    if preset == "demo":
        c.train.steps, c.train.batch_size, c.data.max_len = 150, 16, 128
        c.lora.r = 0
        c.train.trainable = "llm"
        c.train.lr = 1e-3
        c.checkpoint.every = 100
    return c
