"""`xllava datagen run|review|translate|templates`."""

from __future__ import annotations

import argparse
import json
import sys

from xllava_jax.datagen.prompts import TASKS
from xllava_jax.errors import SettingFlags

EXAMPLES = """examples:
  export OPENAI_API_KEY=...
  xllava datagen run --vg visual_genome --out mvif --api-base https://api.openai.com/v1 --model gpt-4o \\
      --langs en,ko,zh --max-images 23496 --concurrency 8 --budget-usd 3200
  xllava datagen run --images photos --objects objects.jsonl --out gen --api-base http://127.0.0.1:8000/v1 \\
      --model local-vlm --langs en,ko --max-images 100
  xllava datagen review --out mvif --format html
  xllava datagen review --out mvif --import mvif/review.csv
  xllava datagen translate --src llava_instruct_150k.json --out llava_instruct_ko \\
      --api-base https://api.openai.com/v1 --model gpt-4o-mini --target ko
  xllava datagen templates --out my_templates     # edit, then: xllava datagen run ... --templates my_templates
Rerunning the same run or translate command resumes where it stopped.
"""
EXIT_BUDGET = 3
# The settings of GenerateSettings / TranslateSettings that library messages name.
_ENDPOINT_FLAGS = {"out": "--out", "max_attempts": "--max-attempts", "concurrency": "--concurrency"}
RUN_FLAGS = SettingFlags({"vg": "--vg", "images": "--images", "objects": "--objects", "max_images": "--max-images",
                          **_ENDPOINT_FLAGS})
TRANSLATE_FLAGS = SettingFlags({"src": "--src", "target": "--target", "source_lang": "--source-lang",
                                "max_records": "--max-records", **_ENDPOINT_FLAGS})
OUT_FLAGS = SettingFlags({"out": "--out"})


def _client_options(p: argparse.ArgumentParser, temperature: float) -> None:
    """Endpoint, cost and resumability options shared by run and translate."""
    p.add_argument("--out", required=True, help="output folder (created; rerun with the same folder to resume)")
    p.add_argument("--api-base", required=True, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="model name sent to the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key "
                                                                     "(default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--budget-usd", type=float, help="stop (exit 3) once the replies of all runs cost this much")
    p.add_argument("--price-in", type=float, default=0.01, help="USD per 1K prompt tokens (default 0.01)")
    p.add_argument("--price-out", type=float, default=0.03, help="USD per 1K completion tokens (default 0.03)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt (default 120)")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries of a request on 429, 5xx and timeouts, with exponential backoff (default 6)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled per retry; 429 Retry-After wins (default 1)")
    p.add_argument("--max-attempts", type=int, default=2,
                   help="requests per item whose replies fail validation, over all runs (default 2)")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (default "
                                                                          f"{temperature:g})")
    p.add_argument("--templates", help="template folder (default: the packaged one; see `datagen templates`)")
    p.add_argument("--no-json-mode", dest="json_mode", action="store_false",
                   help="do not send response_format json_object (for endpoints that reject it)")


def _step(steps, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """One `datagen` subcommand: `summary` for the list of subcommands, `description` and the examples for --help."""
    return steps.add_parser(name, help=summary, description=description, epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def add_datagen_parser(subparsers) -> None:
    """Add `datagen` and its subcommands to the `xllava` subcommands."""
    p = subparsers.add_parser("datagen", help="generate and translate visual-instruction data with an API",
                              description="Generate multilingual visual-instruction data (the X-LLaVA mvif recipe) "
                                          "and translate LLaVA datasets with any OpenAI-compatible endpoint.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = p.add_subparsers(dest="datagen_command", required=True)
    run = _step(
        steps, "run", "generate object / location / atmosphere / conversation data per image",
        "Select images by their number of main objects (seeded, deduplicated), ask the endpoint for the "
        "four task types in every language at once, validate each reply (JSON shape, languages, "
        "scripts, turns, lengths; proper nouns flagged) and append it to OUT/accepted.jsonl or "
        "OUT/rejected.jsonl. At the end: OUT/llava_<lang>.json, OUT/llava_mixed.json, OUT/summary.json.")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--vg", help="Visual Genome folder (image_data.json, objects.json, [relationships.json], "
                                     "VG_100K*/)")
    source.add_argument("--images", help="image folder, with --objects")
    run.add_argument("--objects", help="JSONL: {\"image\": relpath, \"objects\": [names], \"id\"?, \"relations\"?} "
                                       "per line")
    run.add_argument("--langs", default="en,ko,zh", help="comma-separated languages from en, ko, zh (default "
                                                         "%(default)s)")
    run.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default %(default)s)")
    run.add_argument("--max-images", type=int, help="images to select (default: every eligible one)")
    run.add_argument("--min-objects", type=int, default=3, help="fewest main objects per image (default 3)")
    run.add_argument("--max-objects", type=int, default=10, help="most main objects per image (default 10)")
    run.add_argument("--min-object-area", type=float, default=0.02,
                     help="Visual Genome: share of the image a box must cover to be a main object (default 0.02)")
    run.add_argument("--seed", type=int, default=0, help="selection and shuffle seed (default 0)")
    run.add_argument("--min-script-share", type=float, default=0.6,
                     help="share of a language's letters that must be in its script (default 0.6)")
    run.add_argument("--reject-proper-nouns", action="store_true",
                     help="reject replies with proper nouns absent from the object list (default: flag them)")
    run.add_argument("--review", choices=("csv", "html"), help="also write OUT/review.csv or OUT/review.html")
    _client_options(run, 0.7)
    run.set_defaults(run=run_generate, flags=RUN_FLAGS)

    review = _step(
        steps, "review", "export accepted records for human review, or import pass/error labels",
        "Write OUT/review.csv or OUT/review.html (image, flags, all languages side by side); with "
        "--import, read a CSV with key,label(pass|error),note columns, drop error-labelled records from "
        "the LLaVA files and list them in summary.json (removed_by_review).")
    review.add_argument("--out", required=True, help="the output folder of `xllava datagen run`")
    review.add_argument("--format", default="csv", choices=("csv", "html"), help="(default: csv)")
    review.add_argument("--inline-images", action="store_true", help="html: embed the images as data URLs")
    review.add_argument("--import", dest="import_file", help="CSV of labels to apply (e.g. the edited review.csv)")
    review.set_defaults(run=run_review, flags=OUT_FLAGS)

    tr = _step(
        steps, "translate", "machine-translate a LLaVA-format dataset",
        "Translate every turn of a LLaVA JSON/JSONL dataset (one request per record), validate turn "
        "count and script, keep <image> exactly where it was, and write OUT/translated_<lang>.json, "
        "OUT/rejected.jsonl and OUT/summary.json. Resumable like `run`.")
    tr.add_argument("--src", required=True, help="LLaVA-format JSON or JSONL file")
    tr.add_argument("--target", default="ko", help="target language: en, ko or zh (default ko)")
    tr.add_argument("--source-lang", default="en", help="language of the source (default en)")
    tr.add_argument("--max-records", type=int, help="translate only the first N records")
    tr.add_argument("--min-script-share", type=float, default=0.5,
                    help="share of the translation's letters that must be in the target script (default 0.5)")
    _client_options(tr, 0.2)
    tr.set_defaults(run=run_translate, flags=TRANSLATE_FLAGS)

    tpl = _step(steps, "templates", "copy the packaged prompt templates for editing",
                "Copy the prompt templates, seed examples and tasks.json to a new folder; pass it to run or "
                "translate with --templates.")
    tpl.add_argument("--out", required=True, help="new folder for the copy")
    tpl.set_defaults(run=run_templates, flags=OUT_FLAGS)


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list as a tuple of its non-empty, stripped names."""
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _client_kwargs(args: argparse.Namespace) -> dict:
    return dict(out=args.out, api_base=args.api_base, model=args.model, api_key_env=args.api_key_env,
                concurrency=args.concurrency, budget_usd=args.budget_usd, price_in=args.price_in,
                price_out=args.price_out, timeout_s=args.timeout, max_retries=args.max_retries,
                backoff_s=args.backoff, max_attempts=args.max_attempts, temperature=args.temperature,
                templates=args.templates, json_mode=args.json_mode, min_script_share=args.min_script_share,
                progress=sys.stderr.isatty())


def _finish(res, what: str) -> int:
    """Print how a run ended (stderr) and its summary (last stdout line); the exit code."""
    result, summary = res.run, res.summary
    if result.stopped == "interrupted":
        print(f"xllava: interrupted: {res.saved} {what} saved ({res.saved - res.accepted_before} this run); rerun "
              "the same command to continue", file=sys.stderr)
        return 130
    print(json.dumps(summary, ensure_ascii=False))
    if result.stopped == "budget":
        print(f"xllava: stopped: budget of ${summary['budget_usd']:g} reached (${summary['cost_usd']:.4f} spent over "
              f"all runs); {res.saved} {what} saved; rerun with a larger --budget-usd to continue", file=sys.stderr)
        return EXIT_BUDGET
    if result.stopped == "errors":
        print(f"xllava: error: {result.message}, the last: {res.last_api_error}; {res.saved} {what} saved; rerun to "
              "continue", file=sys.stderr)
        return 2
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """`xllava datagen run`: the exit code (0 done, 3 budget reached, 130 interrupted, 2 endpoint failing)."""
    from xllava_jax.datagen.pipeline import GenerateSettings, generate
    from xllava_jax.datagen.review import export_review

    settings = GenerateSettings(
        vg=args.vg, images=args.images, objects=args.objects, langs=_names(args.langs), tasks=_names(args.tasks),
        max_images=args.max_images, min_objects=args.min_objects,
        max_objects=args.max_objects, min_object_area=args.min_object_area, seed=args.seed,
        reject_proper_nouns=args.reject_proper_nouns, **_client_kwargs(args))
    res = generate(settings)
    if res.summary is not None:
        print(f"{res.summary['accepted']} accepted of {res.summary['work_items']} items, {res.summary['rejections']} "
              f"rejected replies, ${res.summary['cost_usd']:.4f}; wrote {args.out}/llava_*.json and summary.json",
              file=sys.stderr)
        if args.review:
            print(f"wrote {export_review(args.out, args.review)}", file=sys.stderr)
    return _finish(res, "accepted records")


def run_review(args: argparse.Namespace) -> int:
    """`xllava datagen review`: write the review file, or import labels and re-export."""
    from xllava_jax.datagen.review import export_review, import_labels

    if args.import_file:
        summary = import_labels(args.out, args.import_file)
        print(f"{len(summary['removed_by_review'])} records labelled error removed from the LLaVA files",
              file=sys.stderr)
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    print(f"wrote {export_review(args.out, args.format, inline_images=args.inline_images)}")
    return 0


def run_translate(args: argparse.Namespace) -> int:
    """`xllava datagen translate`: the exit code, as for `run`."""
    from xllava_jax.datagen.translate import TranslateSettings, translate

    settings = TranslateSettings(src=args.src, target=args.target, source_lang=args.source_lang,
                                 max_records=args.max_records, **_client_kwargs(args))
    res = translate(settings)
    if res.summary is not None:
        print(f"{res.summary['translated']} of {res.summary['records']} records translated, "
              f"{res.summary['rejections']} rejected replies; wrote {args.out}/translated_{args.target}.json",
              file=sys.stderr)
    return _finish(res, "translated records")


def run_templates(args: argparse.Namespace) -> int:
    """`xllava datagen templates`: copy the packaged templates."""
    from xllava_jax.datagen.prompts import copy_templates

    print(f"wrote {copy_templates(args.out)}")
    return 0
