"""Command line: one module per command, all registered on the `scalecert` group (cli/app.py);
`scalecert-export` is the export command on its own. The options several commands share (data
folders, -o/--output, --threads, --backend, --precision, --mode, --json, --quiet) and their old
spellings are declared once in cli/options.py."""
from scalecert.cli import bench, build, certify, demo, doctor, export, inspect_bundle, tune  # noqa: F401  (register commands)
from scalecert.cli.app import main
from scalecert.cli.export import export_main

__all__ = ["main", "export_main"]
