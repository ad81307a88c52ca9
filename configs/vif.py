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
        # 128 tokens hold the image and a record's short-answer turns, which come first (the long turns after
        # them are cut); the template goes without LLaMA-2's 85-token system prompt.
        # lr 5e-4 held constant after warm-up: at 1e-3 or 2e-3 the tiny LLM fits counting and positions but
        # never starts reading colours in the mixed data (colour stays at the majority baseline; the LLM's lr is
        # what blocks it, not the projector's), and a cosine decay stops the learning that starts late.
        c.train.steps, c.train.batch_size, c.data.max_len = 3000, 16, 128
        c.train.lr, c.train.schedule = 5e-4, "constant"
        c.data.system = ""
        c.checkpoint.every = 250
    if preset == "demo_short":
        # The demo's first vif stages: single short questions (data/vif_short_{en,ko}.json, under 48 tokens each),
        # colour and shape questions alone, then with position and yes/no questions, before the mixed task records.
        # Started on the mixed records (or on every kind of short question at once), the tiny LLM learns which
        # colours and shapes are present but not which goes with which: colour and shape answers stay at or
        # below naming anything present. Alone, at three times the batch that the short samples allow, they are
        # bound: held-out colour ~45% after 600 steps, ~75% after 1200, ~90% after 1800.
        c.train.steps, c.train.batch_size, c.data.max_len = 1500, 48, 48
        c.checkpoint.every = 300
    return c
