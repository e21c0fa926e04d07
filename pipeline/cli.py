"""What the three jobs share on the command line: help that shows each job's examples and exit status,
and each option's default once."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The job's docstring as written (its examples and exit status), and `(default: X)` after an option's
    help unless the help already says its default or the option is a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is argparse.SUPPRESS
                or action.default in (None, []) or isinstance(action.default, bool)):
            return text
        return text + " (default: %(default)s)"


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_dry_run(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help=f"check the settings and print them resolved{what}, then exit 0: nothing is written to "
                        "MLflow and no Ray task runs")


def settings_yaml(settings: dict) -> str:
    """Settings as the YAML printed by --dry-run and saved with every run (`settings.yaml`)."""
    import yaml

    return yaml.safe_dump(settings, sort_keys=False, default_flow_style=False)
