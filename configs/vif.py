"""Stage 2: visual instruction tuning. Projector + LLM, template `llava_llama_2`, images padded to
square. Full fine-tuning (lr 2e-5, batch 128) by default; the paper's LoRA run (r 128, alpha 256,
lr 2e-4, projector lr 2e-5) is the preset `xllava_13b_lora` (XLLAVA.md section 4).

  xllava train --config configs/vif.py:xllava_13b --config.init=runs/align/final \
      --config.data.corpus=llava_instruct_en.json,llava_instruct_ko.json,mvif91k.json \
      --config.data.image_root=images --workdir runs/vif
"""

from common import RECIPE_SCALE, base


def get_config(preset: str = "demo"):
    c = base("vif", "demo" if preset == "demo_short" else preset)
    c.train.trainable = "projector,llm"
    c.train.lr = 2e-5
    c.train.batch_size = 128
    c.data.template = "llava_llama_2"
    c.data.aspect = "pad"
    c.lora.alpha = 256.0
    if preset.removesuffix("_lora") in RECIPE_SCALE:
        # Packed: several conversations per 2048-token row (about 2.1 at the LLaVA-665K mix,
        # benchmarks/packing_bench.py), so 64 rows hold about the recipe's 128 conversations.
        c.data.pack, c.train.batch_size = True, 64
    if preset.endswith("_lora"):
        c.model.preset = preset[: -len("_lora")]
        c.lora.r, c.lora.alpha = 128, 256.0
        c.train.trainable = "projector,lora"
        c.train.lr, c.train.projector_lr = 2e-4, 2e-5
    if preset in ("demo", "demo_short"):
        # 128 tokens hold the image and a record's short-answer turns (they come first); no system prompt.
        # lr held constant: the tiny LLM starts reading colours late (the demo notes in BENCHMARKS.md).
        c.train.steps, c.train.batch_size, c.data.max_len = 3000, 16, 128
        c.train.lr, c.train.schedule = 5e-4, "constant"
        c.data.system = ""
        c.checkpoint.every = 250
    if preset == "demo_short":
        # The curriculum's first stages: single short questions (data/vif_short_{en,ko}.json), which bind colour
        # and shape to objects before the mixed records do. Their answers are at most a few tokens, so the
        # fused loss runs 4 positions per row at a time (more chunks only where an answer is longer).
        c.train.steps, c.train.batch_size, c.data.max_len = 1500, 48, 48
        c.train.loss_chunk = 4
        c.checkpoint.every = 300
    return c
