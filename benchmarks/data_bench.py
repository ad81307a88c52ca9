"""VIF samples per second: our grain pipeline against a LLaVA-style PyTorch Dataset + DataLoader.

Both sides do the same work per sample from the same files: decode a JPEG, pad it to a square with the
CLIP mean colour, CLIP-preprocess it at 336 px, render a multi-turn `llava_llama_2` conversation,
tokenise it with label masking, and collate fixed batches. The anchor follows LLaVA's training data
path (`LazySupervisedDataset`: PIL + `expand2square` + `CLIPImageProcessor`, LLaMA tokenizer, the
round-by-round label arithmetic); ours is `xllava_jax.data.pipeline.vif_dataset`. Same worker count.

Example:
  .venv/bin/python benchmarks/data_bench.py              # 2 workers, 384 samples each side
  .venv/bin/python benchmarks/data_bench.py --workers 4 --samples 512
The last line printed is one JSON object with the key `speedup` (ours / anchor samples per second).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from data_fixtures import train_tokenizer  # noqa: E402

from xllava_jax.data.conversation import LLAMA2_SYSTEM  # noqa: E402
from xllava_jax.data.pipeline import VifSpec, load_records, vif_dataset  # noqa: E402

IMAGE_SIZE, NUM_IMAGE_TOKENS, MAX_LEN, BATCH = 336, 576, 2048, 8
QUESTIONS = ["What is the colour of the largest object?", "How many shapes are there?",
             "무슨 색인가요?", "사진을 자세히 설명해 주세요.", "Where is the circle?"]
ANSWERS = ["The largest object is red.", "There are three shapes in the picture.", "빨간색입니다.",
           "하얀 배경 위에 빨간 원과 파란 사각형이 있습니다.", "The circle is on the left."]


def make_corpus(d: Path, n: int) -> Path:
    rng = random.Random(0)
    (d / "images").mkdir()
    lines = []
    for i in range(n):
        w, h = rng.choice([(640, 480), (480, 640), (800, 600), (500, 500)])
        img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.randrange(w - 100), rng.randrange(h - 100)
            draw.ellipse((x, y, x + 90, y + 90), fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(d / "images" / f"{i}.jpg", quality=90)
        turns = []
        for r in range(rng.randint(1, 4)):
            k = rng.randrange(len(QUESTIONS))
            turns += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + QUESTIONS[k]},
                      {"from": "gpt", "value": ANSWERS[k]}]
        lines.append(json.dumps({"id": str(i), "image": f"{i}.jpg", "conversations": turns}, ensure_ascii=False))
    (d / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return d / "corpus.jsonl"


# ------------------------------------------------------------------ the LLaVA-style anchor (PyTorch)
def _expand2square(img, fill):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def anchor_loader(corpus: Path, root: Path, tok_dir: Path, workers: int):
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from transformers import CLIPImageProcessor, LlamaTokenizerFast

    tokenizer = LlamaTokenizerFast.from_pretrained(tok_dir, legacy=True)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    fill = tuple(int(x * 255) for x in processor.image_mean)
    records = [json.loads(x) for x in corpus.read_text().splitlines()]

    def image_tokenize(prompt):
        chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
        ids = [chunks[0][0]] + chunks[0][1:]
        for c in chunks[1:]:
            ids += [-200] + c[1:]
        return ids

    class LazySupervised(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            rec = records[i]
            img = _expand2square(Image.open(root / rec["image"]).convert("RGB"), fill)
            pixels = processor(img, return_tensors="pt")["pixel_values"][0]
            msgs = [m["value"] for m in rec["conversations"]]
            msgs[0] = "<image>\n" + msgs[0].replace("<image>", "").strip()
            text = ""
            for k in range(0, len(msgs), 2):
                q = f"<<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n{msgs[k]}" if k == 0 else msgs[k]
                text += ("<s>" if k else "") + f"[INST] {q} [/INST] {msgs[k + 1]} </s>"
            ids = torch.tensor(image_tokenize(text))
            target = ids.clone()
            cur = 1
            target[:cur] = -100
            for rou in text.split("</s>"):
                if not rou:
                    break
                head, _ = rou.split("[/INST] ")
                rlen, ilen = len(image_tokenize(rou)), len(image_tokenize(head + "[/INST] ")) - 2
                target[cur: cur + ilen] = -100
                cur += rlen
            target[cur:] = -100
            return ids[:MAX_LEN], target[:MAX_LEN], pixels

    def collate(batch):
        ids, labels, pixels = zip(*batch)
        ids = pad_sequence(ids, batch_first=True, padding_value=0)
        return ids, pad_sequence(labels, batch_first=True, padding_value=-100), ids.ne(0), torch.stack(pixels)

    return torch.utils.data.DataLoader(LazySupervised(), batch_size=BATCH, shuffle=True, num_workers=workers,
                                       collate_fn=collate, drop_last=True, persistent_workers=workers > 0)


def rate(make_iterator, batches: int) -> tuple[float, object]:
    """Samples per second from creating the iterator to the last batch (start-up included: grain
    prefetches in background threads even without workers, so timing after the first batch would
    count work done before the clock started)."""
    t0 = time.perf_counter()
    iterator = make_iterator()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - t0), iterator


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="data workers on each side (default 2)")
    p.add_argument("--samples", type=int, default=384, help="timed samples per side (default 384)")
    args = p.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="data_bench_"))
    corpus = make_corpus(d, 96)
    tok = train_tokenizer(d, vocab_size=500)
    batches = max(1, args.samples // BATCH)
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=NUM_IMAGE_TOKENS, image_token_id=499,
                   image_root=str(d / "images"), image_size=IMAGE_SIZE, max_len=MAX_LEN)
    records, _ = load_records([corpus])
    ours, ours_it = rate(lambda: iter(vif_dataset(records, spec, batch_size=BATCH, seed=0,
                                                  num_workers=args.workers)), batches)
    if hasattr(ours_it, "close"):
        ours_it.close()
    theirs, _ = rate(lambda: iter(_repeat(anchor_loader(corpus, d / "images", d, args.workers))), batches)
    print(f"ours   {ours:8.1f} samples/s  (grain, {args.workers} workers)")
    print(f"anchor {theirs:8.1f} samples/s  (LLaVA-style torch DataLoader, {args.workers} workers)")
    print(json.dumps({"speedup": round(ours / theirs, 3), "ours_samples_per_s": round(ours, 1),
                      "anchor_samples_per_s": round(theirs, 1), "workers": args.workers, "batch": BATCH}))


def _repeat(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
