"""``refresherd completion bash|zsh|tcsh``: a shell completion script, generated from the
argparse tree itself (shtab), so that it never drifts from the commands."""

from __future__ import annotations

import argparse
import sys

import shtab

from refresherd.cli.parser import build_parser


def command(args: argparse.Namespace) -> int:
    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0
