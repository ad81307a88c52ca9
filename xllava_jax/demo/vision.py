"""The demo's stand-in for OpenAI's CLIP: a tiny vision tower pretrained contrastively on the synthetic
corpus's image-caption pairs, with hard-negative captions drawn from each image's scene graph (two objects'
colours swapped, two shapes swapped, an object moved, a colour changed), so that the tower must encode which
colour and shape sit where, not only which colours and shapes occur."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np

from xllava_jax import checkpoint as ckpt
from xllava_jax.config import VisionConfig
from xllava_jax.data import synth_phrases as ph
from xllava_jax.data.images import ImageConfig, preprocess
from xllava_jax.data.synth_scenes import RGB, Obj, Scene
from xllava_jax.tokenizer.runtime import Tokenizer
from xllava_jax.train.contrastive import ContrastiveConfig, pretrain_vision_tower


def scene_from_graph(graph: dict) -> Scene:
    """The Scene a scene-graph line describes (geometry left out: captions need none)."""
    objects = tuple(Obj(o["shape"], o["colour"], o["size"], o["grid"][0] * 3 + o["grid"][1], (0.0, 0.0), 0.0,
                        o["label"]) for o in graph["objects"])
    return Scene(graph["id"], objects, graph["background"]["tone"], "plain")


def hard_negatives(scene: Scene, rng: random.Random) -> list[Scene]:
    """Four scenes that differ from `scene` in binding or placement only: colours swapped between two
    objects, shapes swapped, one object moved to an empty cell, one colour replaced by an absent one.
    With one object, the swaps become a changed colour and a changed shape."""
    objs = list(scene.objects)
    swapped_colour, swapped_shape, moved, recoloured = (list(objs) for _ in range(4))
    if len(objs) > 1:
        i, j = rng.sample(range(len(objs)), 2)
        a, b = objs[i], objs[j]
        swapped_colour[i], swapped_colour[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
        swapped_shape[i], swapped_shape[j] = replace(a, shape=b.shape), replace(b, shape=a.shape)
    else:
        swapped_colour[0] = replace(objs[0], colour=rng.choice([c for c in RGB if c != objs[0].colour]))
        swapped_shape[0] = replace(objs[0], shape=rng.choice([s for s in ph.SHAPES if s != objs[0].shape]))
    k = rng.randrange(len(objs))
    moved[k] = replace(objs[k], cell=rng.choice([c for c in range(9) if c not in {o.cell for o in objs}]))
    k = rng.randrange(len(objs))
    recoloured[k] = replace(objs[k], colour=rng.choice([c for c in RGB if c not in {o.colour for o in objs}]))
    return [replace(scene, objects=tuple(sorted(x, key=lambda o: o.cell)))
            for x in (swapped_colour, swapped_shape, moved, recoloured)]


def pretrain_clip(data_dir: str | Path, tokenizer: str | Path, vision_cfg: VisionConfig, out: str | Path, *,
                  cfg: ContrastiveConfig | None = None, use_negatives: bool = True,
                  progress: bool = False) -> list[dict]:
    """Train the tower on every training image of the synthetic corpus at `data_dir` with its English
    caption (and hard negatives), save it as our vision checkpoint at `out`; returns per-step metrics."""
    data_dir, cfg = Path(data_dir), cfg or ContrastiveConfig()
    graphs = [json.loads(line) for line in (data_dir / "scene_graphs.jsonl").read_text(encoding="utf-8").splitlines()]
    graphs = [g for g in graphs if g["split"] == "train"]
    tok = Tokenizer(tokenizer)
    image_cfg = ImageConfig.for_vision(vision_cfg.image_size, aspect="crop")
    images = np.stack([preprocess(data_dir / g["image"], image_cfg) for g in graphs])
    rng = random.Random(cfg.seed)
    captions, negatives = [], []
    for g in graphs:
        scene = scene_from_graph(g)
        captions.append(tok.encode(ph.caption(scene, "en")))
        if use_negatives:
            negatives.append([tok.encode(ph.caption(s, "en")) for s in hard_negatives(scene, rng)])
    tower, history = pretrain_vision_tower(images, captions, tok.vocab_size, vision_cfg, cfg,
                                           negatives if use_negatives else None, progress=progress)
    ckpt.save_checkpoint(out, tower)
    return history
