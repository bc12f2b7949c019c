"""The ``kn`` command line."""

from __future__ import annotations

import logging
import sys
import warnings

from kn_plugin.cli.common import _apply_converged, _check_outputs, _check_pool_args, _format_warning, _UsageError
from kn_plugin.cli.parser import build_parser
from kn_plugin.errors import KnowledgeNeuronError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"kn: error: {exc}", file=sys.stderr)
        return 2
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        _apply_converged(args)
        _check_outputs(args)
        _check_pool_args(args)
        return args.func(args)
    except KnowledgeNeuronError as exc:
        print(f"kn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kn: interrupted (results written so far are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
