"""`scalecert tune`: fine-tune for the split, gates and windows."""
from __future__ import annotations

import click

from scalecert.cli import options
from scalecert.cli.app import main


@main.command()
@click.argument("model", required=False)
@click.option("--arch", required=True, help="built-in architecture of the state_dict (see scalecert-export --list-archs)")
@click.option("--pretrained", is_flag=True, help="start from the weights shipped for --arch")
@options.data("training images", required=True)
@click.option("--val", metavar="DIR", help="held-out validation images, the same folder rule as --data "
              "[default: hold out 5% of --data, at most --val-limit]")
@click.option("--patch", default="2%", show_default=True, help="patch size: N, HxW or P% of the input area")
@click.option("--layer", default="auto", show_default=True, help="superficial layer, as for export")
@click.option("--prune-rate", default=0.0, show_default=True,
              help="fraction of feature positions gated off in training (0: no gate)")
@click.option("--stride", default="auto", show_default=True, help="occluding stride, as for export")
@click.option("--window-budget", type=int, help="most windows for --stride auto [default: 100; 36 with --mode recover]")
@click.option("--epochs", type=int, help="[default: 3; 6 with --mode recover]")
@click.option("--batch", default=128, show_default=True)
@click.option("--lr", default=0.01, show_default=True, help="peak learning rate (one-cycle, SGD with momentum)")
@click.option("--occlusions", default=1, show_default=True,
              help="occluded copies per training image (with --mode recover, as many again with two windows zeroed)")
@options.mode("what the occluded copies teach: detect (one window zeroed) or recover (one and two windows zeroed, "
              "for double masking; validation then certifies recovery over every pair); export makes a bundle of "
              "this mode", default="detect", aliases=("--for",))
@click.option("--limit", type=int, help="use at most N training images")
@click.option("--val-limit", default=1000, show_default=True)
@click.option("--cert-limit", default=200, show_default=True, help="validation images certified each epoch")
@click.option("--max-clean-drop", default=0.03, show_default=True,
              help="an epoch whose validation clean accuracy falls further below the input's is never kept (1: off)")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="continue from OUTPUT.last")
@options.threads("PyTorch threads for training and validation (tune runs no ONNX Runtime) [default: torch's choice]")
@options.output("tuned checkpoint (.pt); OUTPUT.last holds the resumable state", required=True)
@click.option("--force", is_flag=True, help="replace an existing OUTPUT file")
@options.as_json("print one JSON object at the end: the checkpoint, the epoch kept and its validation metrics")
@options.quiet()
def tune(mode, as_json, **kwargs):
    """Fine-tune MODEL for its superficial split, SIN gates and window occlusion."""
    from scalecert.training.tune import TuneOptions, tune as run_tune

    say = options.say_for(kwargs["quiet"], as_json)
    kwargs["quiet"] = kwargs["quiet"] or as_json  # progress bars off: stdout holds the JSON
    result = run_tune(TuneOptions(target=mode, **kwargs), say=say)
    best = result["best"]
    say(f"wrote {result['output']} (epoch {best['epoch']}: val clean {best['clean_accuracy']:.1%}, "
        f"certified{' recovery' if mode == 'recover' else ''} {best['certified_accuracy']:.1%})")
    if as_json:
        options.print_json({"output": result["output"], "last": result["output"] + ".last", "mode": mode,
                            "epoch": best["epoch"], "kept_input": best["epoch"] == 0,
                            "metrics": {k: v for k, v in best.items() if k != "epoch"}})
