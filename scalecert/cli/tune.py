"""`scalecert tune`: fine-tune for the split, gates and windows."""
from __future__ import annotations

import click

from scalecert.cli.app import main


@main.command()
@click.argument("model", required=False)
@click.option("--arch", required=True, help="built-in architecture of the state_dict (see scalecert-export --list-archs)")
@click.option("--pretrained", is_flag=True, help="start from the weights shipped for --arch")
@click.option("--data", required=True, help="training images: ImageFolder tree, or flat folder with labels.csv")
@click.option("--val", help="validation images (default: hold out 5% of --data, at most --val-limit)")
@click.option("--patch", default="2%", show_default=True, help="patch size: N, HxW or P% of the input area")
@click.option("--layer", default="auto", show_default=True, help="superficial layer, as for export")
@click.option("--prune-rate", default=0.0, show_default=True,
              help="fraction of feature positions gated off in training (0: no gate)")
@click.option("--stride", default="auto", show_default=True, help="occluding stride, as for export")
@click.option("--window-budget", type=int, help="most windows for --stride auto [default: 100; 36 --for recover]")
@click.option("--epochs", type=int, help="[default: 3; 6 --for recover]")
@click.option("--batch", default=128, show_default=True)
@click.option("--lr", default=0.01, show_default=True, help="peak learning rate (one-cycle, SGD with momentum)")
@click.option("--occlusions", default=1, show_default=True,
              help="occluded copies per training image (with --for recover, as many again with two windows zeroed)")
@click.option("--for", "target", type=click.Choice(["detect", "recover"]), default="detect", show_default=True,
              help="what the occluded copies teach: detect (one window zeroed) or recover (one and two windows "
                   "zeroed, for double masking; validation then certifies recovery over every pair)")
@click.option("--limit", type=int, help="use at most N training images")
@click.option("--val-limit", default=1000, show_default=True)
@click.option("--cert-limit", default=200, show_default=True, help="validation images certified each epoch")
@click.option("--max-clean-drop", default=0.03, show_default=True,
              help="an epoch whose validation clean accuracy falls further below the input's is never kept (1: off)")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="continue from OUTPUT.last")
@click.option("--threads", type=int, help="torch threads (default: torch's choice)")
@click.option("-o", "--output", required=True, help="tuned checkpoint (.pt); OUTPUT.last holds the resumable state")
@click.option("--force", is_flag=True, help="replace an existing OUTPUT file")
@click.option("--quiet", is_flag=True, help="no progress bars or epoch lines")
def tune(**kwargs):
    """Fine-tune MODEL for its superficial split, SIN gates and window occlusion."""
    from scalecert.training.tune import TuneOptions, tune as run_tune

    quiet = kwargs["quiet"]
    result = run_tune(TuneOptions(**kwargs), say=(lambda _: None) if quiet else click.echo)
    best = result["best"]
    click.echo(f"wrote {result['output']} (epoch {best['epoch']}: val clean {best['clean_accuracy']:.1%}, "
               f"certified{' recovery' if kwargs['target'] == 'recover' else ''} {best['certified_accuracy']:.1%})")
