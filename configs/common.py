"""Keys shared by the three stage configs. `get_config` in each stage file fills in the stage's own
values; every key can be overridden with `--config.KEY=VALUE` on the command line."""

from __future__ import annotations

import ml_collections

from xllava_jax.sharding import DEFAULT_RULES

RECIPE_SCALE = ("llava15_7b", "llava15_13b", "xllava_13b")


def base(stage: str, preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 42
    c.init = ""              # params-only checkpoint (HF directory or ours) to start from; "" = random init
    c.init_vision = ""       # a vision tower (CLIP HF directory or our vision checkpoint) put over init's
    c.tokenizer = ""         # tokenizer.model or a directory holding it (default: the init checkpoint's)
    c.output = ""            # where the final params-only checkpoint goes (default: WORKDIR/final)

    c.model = ml_collections.ConfigDict()
    c.model.preset = preset
    c.model.dtype = "float32"          # compute dtype (bfloat16 for mixed precision)
    c.model.param_dtype = "float32"    # master weights
    c.model.remat = "none"             # none | full | dots
    c.model.scan_layers = False        # each tower's layers as one scanned block (fast compiles of big models)
    c.model.attention = "auto"         # auto | xla | cudnn | splash | cpu_blocked (auto: from the mesh's devices)

    c.data = ml_collections.ConfigDict()
    c.data.corpus = ""       # VIF JSON/JSONL files, comma-separated (align, vif)
    c.data.image_root = ""
    c.data.text = ""         # text corpora, comma-separated (llm_pretrain)
    c.data.weights = ""      # mixing weights for data.text, comma-separated
    c.data.template = "llava_llama_2"
    c.data.system = "default"  # the template's system prompt; any other text replaces it ("" for none)
    c.data.mode = "clean"    # clean | llava
    c.data.aspect = "pad"    # pad | crop | resize
    c.data.max_len = 2048
    c.data.overflow = "truncate"
    c.data.pack = False      # align / vif: several conversations per row of max_len (segment ids, image slots)
    c.data.images_per_row = 0  # packed rows' image slots (0: max_len // (image tokens + 64))
    c.data.pack_window = 128   # records packed together, first-fit decreasing (each held with its pixels)
    c.data.image_cache_mb = 256  # resized images kept per reader process (0: none); pays when records share images
    c.data.strict = False
    c.data.num_workers = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 128         # global batch (all processes)
    c.train.grad_accum = 1
    c.train.loss_chunk = 64          # lm_head + loss fused over supervised positions, this many per row at a
                                     # time (0: full [B, S, V] logits, then the loss)
    c.train.lr = 2e-5
    c.train.projector_lr = -1.0      # < 0: same as lr
    c.train.embeddings_lr = -1.0     # input embeddings + lm_head (e.g. new vocabulary rows); < 0: same as lr
    c.train.warmup_ratio = 0.03
    c.train.schedule = "cosine"      # cosine | constant
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.clip_norm = 1.0          # <= 0: no clipping
    c.train.trainable = "projector,llm"   # any of vision, projector, llm, embeddings, lora
    c.train.skip_nonfinite = False   # skip (and count) steps with a non-finite loss or gradient
    c.train.log_every = 1

    c.lora = ml_collections.ConfigDict()
    c.lora.r = 0                     # 0: no LoRA
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                 # -1: the devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # logical axis -> mesh axes ("fsdp", "data+fsdp", "" = replicated); e.g. --config.mesh.rules.embed=tensor
    c.mesh.rules = ml_collections.ConfigDict({name: "+".join(rule) if isinstance(rule, tuple) else (rule or "")
                                              for name, rule in DEFAULT_RULES.items()})

    if preset.removesuffix("_lora") in RECIPE_SCALE:
        # The 7B / 13B recipe on accelerators: bf16 compute over fp32 master weights, each layer's activations
        # recomputed in the backward, and scanned layers (one compiled layer instead of 40).
        c.model.dtype, c.model.remat, c.model.scan_layers = "bfloat16", "full", True
        c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every chip (weights, gradients and optimizer state split)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    return c
