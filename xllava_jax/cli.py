"""The `xllava` command.

Every subcommand is registered by its package's `cli.py`: `add_<command>_parser(subparsers)` adds the
command's parser and sets, on each parser that runs something, `run=` (the function `main` calls with the
parsed arguments; it returns the exit code, None meaning 0) and, where library messages name settings in
backticks, `flags=` (an `errors.SettingFlags` saying how the command spells them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from xllava_jax.errors import UserError, spell_flags
from xllava_jax.hostmem import tune_malloc_for_xla_cpu
from xllava_jax.train.cli import CONFIG_PREFIX

# The commands whose time goes into many executions of one compiled step: they trade slower compiles for faster
# steps (xllava_jax/hostmem.py); `train --compile-only` runs none.
STEP_COMMANDS = ("train", "demo")


def registrations() -> tuple[Callable, ...]:
    """The `add_<command>_parser` functions, in the order `xllava --help` lists the commands."""
    from xllava_jax.convert.cli import add_convert_parser
    from xllava_jax.data.cli import add_data_parser
    from xllava_jax.datagen.cli import add_datagen_parser
    from xllava_jax.demo.cli import add_demo_parser
    from xllava_jax.eval.cli import add_eval_parser
    from xllava_jax.infer.cli import add_chat_parser, add_generate_parser, add_serve_parser
    from xllava_jax.tokenizer.cli import add_vocab_parser
    from xllava_jax.train.cli import add_train_parser

    return (add_convert_parser, add_data_parser, add_vocab_parser, add_train_parser, add_eval_parser,
            add_generate_parser, add_datagen_parser, add_chat_parser, add_serve_parser, add_demo_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllava", description="X-LLaVA in JAX: convert, train, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in registrations():
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--config.KEY=VALUE` (any config key of `xllava train`) is no flag argparse knows: taken out here and
    # handed to the command as args.config_overrides.
    overrides = [a[len(CONFIG_PREFIX):] for a in argv if a.startswith(CONFIG_PREFIX)]
    args = build_parser().parse_args([a for a in argv if not a.startswith(CONFIG_PREFIX)])
    args.config_overrides = overrides
    if args.command in STEP_COMMANDS and not getattr(args, "compile_only", False):
        tune_malloc_for_xla_cpu()  # before XLA's threads first allocate (parsing starts none)
    from xllava_jax.train.errors import Preempted

    try:
        return args.run(args) or 0
    except Preempted as e:
        print(f"xllava: {spell_flags(str(e), getattr(args, 'flags', None))}", file=sys.stderr)
        return 143
    except (UserError, FileNotFoundError) as e:
        print(f"xllava: error: {spell_flags(str(e), getattr(args, 'flags', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xllava: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
