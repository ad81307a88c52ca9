"""`xllava data ...`: check, show, stats, build and synth VIF corpora."""

from __future__ import annotations

import argparse
import json
import sys
import time

from xllava_jax.config import PRESETS, ModelConfig
from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.data import conversation as conv
from xllava_jax.errors import SettingFlags, spell_flags

EXAMPLES = """examples:
  xllava data check --corpus llava_instruct_ko.json --image-root coco/train2017
  xllava data show --corpus vif.jsonl --tokenizer ckpt/xllava --template llava_llama_2 --limit 2
  xllava data show --corpus vif.jsonl --tokenizer tokenizer.model --template vicuna_v1 --mode llava --json
  xllava data build --corpus vif.jsonl --image-root images --tokenizer tokenizer.model --out built/
  xllava data stats --corpus llava_v1_5_mix665k.json --tokenizer ckpt/xllava --pack --max-len 2048
"""


SYNTH_EXAMPLES = """examples:
  xllava data synth --out data/synth
  xllava data synth --out data/synth48 --image-size 48    # one 16-pixel patch per grid cell
  xllava data synth --out data/easy --single-share 0.8 --max-objects 2 --seed 1
  xllava data synth --out /tmp/tiny --num-images 40 --num-heldout 10 --text-lines 50
"""
# The settings of `synthesize` its messages name.
SYNTH_FLAGS = SettingFlags({"out": "--out", "overwrite=True": "--overwrite"})


def _common(p: argparse.ArgumentParser, image_root_required: bool = False) -> None:
    p.add_argument("--corpus", required=True, nargs="+", help="LLaVA-format JSON or JSONL file(s)")
    p.add_argument("--image-root", required=image_root_required, help="directory the records' image paths are under")


def _encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, or a directory holding it")
    p.add_argument("--template", default="llava_llama_2", choices=conv.TEMPLATES, help="(default: %(default)s)")
    p.add_argument("--mode", default="clean", choices=conv.MODES,
                   help="clean: ids of the template string; llava: the original LLaVA code's ids (default: clean)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--preset", default="xllava_13b", choices=PRESETS,
                   help="model preset giving the image token count and placeholder id (default: %(default)s)")


def add_data_parser(sub) -> argparse.ArgumentParser:
    data = sub.add_parser("data", help="check, show, measure and build VIF corpora", epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Work with visual-instruction corpora in LLaVA's conversation format.")
    steps = data.add_subparsers(dest="data_command", required=True)
    check = steps.add_parser("check", help="report every bad record; exit 1 if any", epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="Check JSON, roles, turns, <image> tags and image files (decoded); print "
                                         "each problem with file, line or id, and reason, then counts.")
    _common(check)
    check.add_argument("--no-decode", action="store_true", help="check image files exist but do not decode them")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    show = steps.add_parser("show", help="what the model sees: tokens with supervised spans marked", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Render and tokenise records. Supervised tokens are shown inside "
                                        "[[...]]; with --json one object per record: id, input_ids, labels.")
    _common(show)
    _encoding(show)
    show.add_argument("--json", action="store_true", help="one JSON object per record")
    show.add_argument("--limit", type=int, help="show only the first N records")
    stats = steps.add_parser("stats", help="token lengths, and the padding of rows padded or packed", epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="The token-length distribution (image + text) of the records, the pad "
                                         "fraction of rows of --max-len holding one record each and, with --pack, "
                                         "of packed rows (as `data.pack` trains), and rows per 1,000 records.")
    stats.add_argument("--corpus", required=True, nargs="+", help="LLaVA-format JSON or JSONL file(s)")
    _encoding(stats)
    stats.add_argument("--max-len", type=int, default=2048, help="row length in tokens (default: %(default)s)")
    stats.add_argument("--overflow", default="truncate", choices=("truncate", "drop"),
                       help="records over --max-len: cut, or left out (default: %(default)s)")
    stats.add_argument("--pack", action="store_true", help="also pack the records as data.pack=true does")
    stats.add_argument("--images-per-row", type=int, default=0,
                       help="image slots of a packed row (default 0: max_len // (image tokens + 64))")
    stats.add_argument("--window", type=int, default=128, help="records packed together (default: %(default)s)")
    stats.add_argument("--seed", type=int, default=0, help="the shuffle that orders the records (default: 0)")
    stats.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    build = steps.add_parser("build", help="tokenise into ArrayRecord shards or a TFDS dataset", epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="Write usable records as ArrayRecord shards (tokenised, image bytes "
                                         "embedded) or, with --format tfds, as the TFDS dataset vif_corpus.")
    _common(build, image_root_required=True)
    _encoding(build)
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--format", default="array_record", choices=("array_record", "tfds"))
    build.add_argument("--shards", type=int, default=1, help="ArrayRecord shard count (default 1)")
    add_synth_parser(steps)
    check.set_defaults(run=run_check)
    show.set_defaults(run=run_show)
    stats.set_defaults(run=run_stats)
    build.set_defaults(run=run_build)
    return data


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    """Add `synth` to the `xllava data` subcommands; it runs `run_synth(args)`."""
    from xllava_jax.data.synth_scenes import MAX_OBJECTS

    parser = subparsers.add_parser(
        "synth", help="make a synthetic bilingual corpus (no downloads)", epilog=SYNTH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw images of coloured shapes and write, from their scene graphs, parallel English /\n"
                    "Korean / Chinese visual-instruction records (object, location, atmosphere, conversation),\n"
                    "stage-1 captions, a held-out VQA split with gold answers (English, Korean), English + Korean\n"
                    "pretraining text and summary.json. The same settings give the same files byte for byte.")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--num-images", type=int, default=3000, help="training images (default 3000)")
    parser.add_argument("--num-heldout", type=int, default=300, help="held-out VQA images (default 300)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels, 24..1024 (default 64)")
    parser.add_argument("--max-objects", type=int, default=4, help=f"objects per image, 1..{MAX_OBJECTS} (default 4)")
    parser.add_argument("--single-share", type=float, default=0.4,
                        help="share of single-object training images, a curriculum for small models (default 0.4)")
    parser.add_argument("--label-share", type=float, default=0.3,
                        help="chance that a large object carries a letter or digit (default 0.3)")
    parser.add_argument("--text-lines", type=int, default=4000,
                        help="documents per pretraining text file (default 4000)")
    parser.add_argument("--overwrite", action="store_true", help="write over an earlier corpus in --out")
    parser.set_defaults(run=run_synth, flags=SYNTH_FLAGS)
    return parser


def _spec_kwargs(args) -> dict:
    cfg = ModelConfig.preset(args.preset)
    return dict(tokenizer=args.tokenizer, num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
                template=args.template, mode=args.mode, system=args.system)


def _show_text(tok, record: dict, enc, image_token_id: int) -> str:
    """Decoded record: supervised runs inside [[...]], images as <image xN>, bos/eos spelled out."""
    specials = {tok.bos_id: "<s>", tok.eos_id: "</s>"}
    ids, labels = enc.input_ids, enc.labels
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        if ids[i] == image_token_id:
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            out.append(f"<image x{j - i}>")
        else:
            sup = labels[i] != IGNORE_INDEX
            while j < len(ids) and ids[j] != image_token_id and (labels[j] != IGNORE_INDEX) == sup:
                j += 1
            text, run = "", []
            for t in ids[i:j] + [None]:
                if t is None or t in specials:
                    text += tok.decode(run) + (specials[t] if t is not None else "")
                    run = []
                else:
                    run.append(t)
            out.append(f"[[{text}]]" if sup else text)
        i = j
    header = (f"== {record['id']} ({record['file']}:{record['where']}, {len(ids)} tokens, "
              f"{sum(lab != IGNORE_INDEX for lab in labels)} supervised)")
    return header + "\n" + "".join(out)


def run_check(args: argparse.Namespace) -> int:
    """`xllava data check`: 1 when any record has a problem."""
    from xllava_jax.data import vif

    report = vif.check_corpus_many(args.corpus, args.image_root, decode_images=not args.no_decode,
                                   progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"records": report.records, "problems": [str(p) for p in report.problems],
                          "reasons": dict(report.reasons)}, ensure_ascii=False))
    else:
        for p in report.problems:
            print(p)
        reasons = ", ".join(f"{k}: {v}" for k, v in report.reasons.most_common())
        tail = f" ({reasons})" if reasons else ""
        print(f"{report.records} usable records, {len(report.problems)} problems{tail}")
    return 1 if report.problems else 0


def run_show(args: argparse.Namespace) -> int:
    """`xllava data show`."""
    from xllava_jax.data import pipeline

    spec = pipeline.VifSpec(**_spec_kwargs(args), max_len=10**9)
    records, problems = pipeline.load_records(args.corpus)
    for p in problems:
        print(f"skipped {p}", file=sys.stderr)
    tok = pipeline.tokenizer_for(spec.tokenizer)
    for record in records[: args.limit]:
        enc = pipeline.encode_record(record, spec)
        if args.json:
            print(json.dumps({"id": record["id"], "input_ids": enc.input_ids, "labels": enc.labels}))
        else:
            print(_show_text(tok, record, enc, spec.image_token_id))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    """`xllava data stats`."""
    from xllava_jax.data import pipeline
    from xllava_jax.data.stats import corpus_stats, format_stats

    spec = pipeline.VifSpec(**_spec_kwargs(args), max_len=args.max_len, overflow=args.overflow, pack=args.pack,
                            images_per_row=args.images_per_row, pack_window=args.window)
    records, problems = pipeline.load_records(args.corpus)
    stats, left_out = corpus_stats(records, spec, seed=args.seed, progress=sys.stderr.isatty())
    for p in [str(p) for p in problems] + left_out:
        print(f"skipped {p}", file=sys.stderr)
    stats["problems"] = len(problems)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


def run_build(args: argparse.Namespace) -> int:
    """`xllava data build`."""
    from xllava_jax.data import build, pipeline

    if args.format == "tfds":
        summary = build.build_tfds(args.corpus, args.image_root, args.out)
    else:
        spec = pipeline.VifSpec(**_spec_kwargs(args), image_root=args.image_root, max_len=10**9)
        summary = build.build_array_record(args.corpus, spec, args.out, num_shards=args.shards,
                                           progress=sys.stderr.isatty())
    for p in summary["problems"]:
        print(f"skipped {p}", file=sys.stderr)
    print(f"wrote {summary['records']} records to {args.out} ({len(summary['problems'])} skipped)")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    """Run `xllava data synth`; 0 on success, 2 (one error line on stderr) on bad settings or output."""
    from xllava_jax.data.synthetic import SynthError, synthesize

    start = time.perf_counter()
    try:
        summary = synthesize(args.out, seed=args.seed, num_images=args.num_images, num_heldout=args.num_heldout,
                             image_size=args.image_size, max_objects=args.max_objects, single_share=args.single_share,
                             label_share=args.label_share, text_lines=args.text_lines, overwrite=args.overwrite,
                             progress=True)
    except SynthError as e:
        print(f"xllava: error: {spell_flags(str(e), SYNTH_FLAGS)}", file=sys.stderr)
        return 2
    files = summary["files"]
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s: {files['images']} images, "
          f"{files['vif_mixed.json']} VIF records, {files['captions_en.json']} captions per language, "
          f"{files['vqa_heldout_en.jsonl']} held-out questions per language")
    return 0
