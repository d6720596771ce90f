"""optimum-cli hook of hwnas, found by optimum-cli in the `optimum.commands.register` namespace.

- `optimum-cli hwnas <command> ...` runs `hwnas <command> ...` (search, onnx, quantize, benchmark, run, ...).
- `optimum-cli export onnx|openvino --model DIR` exports hwnas sub-network checkpoints (`hwnas_llama`):
  before an export, the model type is registered with Optimum's TasksManager. Only then, since the
  registration imports transformers and the exporters, which every other optimum-cli call can skip.
"""
import argparse
import logging
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class HwnasCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hwnas", help="hardware-aware NAS of LLaMA models (hwnas's own commands)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("hwnas_args", nargs=argparse.REMAINDER, help="an hwnas command and its arguments")

    def run(self) -> None:
        from hwnas.cli import main

        sys.exit(main(self.args.hwnas_args or ["--help"]))


def _register_model_type() -> None:
    try:
        from hwnas.export import register_optimum

        register_optimum()
    except Exception as e:  # never break optimum-cli for other models
        logging.getLogger("hwnas").warning("hwnas could not register hwnas_llama with Optimum: %s", e)


if sys.argv[1:2] == ["export"]:
    _register_model_type()

REGISTER_COMMANDS = [HwnasCommand]
