"""The ``edgeattn`` command line. Each command parses options and makes one API call."""

from __future__ import annotations

import functools
import json
import sys

import click

from edgeattn import __version__

EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE = 0, 1, 2


class InputError(click.ClickException):
    """Bad input (model, option, file): one line on stderr, exit code 2, no traceback."""

    exit_code = EXIT_USAGE


def _input_errors(command):
    """Turn the project's own input errors into one-line CLI errors."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from edgeattn.kvcache import KVCacheFullError
        from edgeattn.models import ModelLoadError, UnsupportedModelError
        from edgeattn.rewrites import RewriteError
        from edgeattn.spec import SpecError

        try:
            return command(*args, **kwargs)
        except (ModelLoadError, UnsupportedModelError, SpecError, RewriteError, KVCacheFullError,
                FileNotFoundError) as error:
            raise InputError(str(error)) from error

    return wrapper


def spec_options(command):
    """The AttentionSpec flags: one flag per spec field."""
    options = [
        click.option("--kv-heads", type=int, help="Merge KV heads into N groups (GQA; 1 = MQA)."),
        click.option("--gqa-method", type=click.Choice(["calibrated", "mean"]), default="calibrated", show_default=True),
        click.option("--uptrain-steps", type=int, default=0, show_default=True, help="Distillation steps after a calibrated merge."),
        click.option("--window", type=int, help="Sliding window: attend to the last W tokens (ring-buffer cache)."),
        click.option("--sinks", type=int, default=0, show_default=True, help="Always attend to the first S tokens."),
        click.option("--block-size", type=int, help="Hierarchical attention: block size B."),
        click.option("--top-blocks", type=int, help="Hierarchical attention: blocks kept per query."),
        click.option("--block-mass", type=float, help="Hierarchical attention: keep blocks until this estimated mass."),
        click.option("--kv-cache", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True),
        click.option("--kv-quant", type=click.Choice(["per-channel", "per-token"]), default="per-channel", show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _spec_from(kwargs):
    from edgeattn.spec import AttentionSpec

    fields = ("kv_heads", "gqa_method", "uptrain_steps", "window", "sinks", "block_size", "top_blocks",
              "block_mass", "kv_cache", "kv_quant")
    return AttentionSpec(**{name: kwargs.pop(name) for name in fields})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeattn")
def main() -> None:
    """edgeattn: rewrite a language model's attention for phones and boards, export it, run it.

    \b
    Example:
      edgeattn models
      edgeattn quality smollm2 --kv-heads 1 --window 512 --sinks 4 --kv-cache int8
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def models(as_json: bool) -> None:
    """List supported model families and built-in model names.

    \b
    Example:
      edgeattn models --json
    """
    from edgeattn.models import builtin_names, supported_families

    listing = {"families": supported_families(), "builtin": builtin_names()}
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    click.echo("Families: " + ", ".join(listing["families"]))
    click.echo("Built-in models:")
    for name, description in listing["builtin"].items():
        click.echo(f"  {name:<14} {description}")
    click.echo("Also: a Hugging Face folder (config.json + *.safetensors) or a .gguf file.")


@main.command()
@click.argument("model")
@spec_options
@click.option("--text", "text_path", type=click.Path(dir_okay=False), help="Text to score (default: packaged calibration text).")
@click.option("--calibration-text", type=click.Path(dir_okay=False), help="Text for calibrated steps (default: packaged text).")
@click.option("--context", type=int, default=512, show_default=True, help="Tokens per perplexity window.")
@click.option("--max-windows", type=int, default=4, show_default=True, help="Windows to score at most.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@_input_errors
def quality(model, text_path, calibration_text, context, max_windows, as_json, **spec_kwargs) -> None:
    """Rewrite MODEL's attention and report perplexity before and after.

    \b
    Example:
      edgeattn quality smollm2 --kv-heads 1 --window 512 --sinks 4 --text valid.txt --context 2048
    """
    from edgeattn.quality_report import quality_report

    spec = _spec_from(spec_kwargs)
    report = quality_report(model, spec, text_path=text_path, calibration_text=calibration_text,
                            context=context, max_windows=max_windows, progress=not as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_quality(report)


def _print_quality(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{report['model']}: perplexity over {report['tokens']} tokens (context {report['context']})")
    for column in ("model", "ppl", "delta", "KV bytes/token"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("original", f"{report['original']['ppl']:.3f}", "", str(report["original"]["kv_bytes_per_token"]))
    rewritten = report["rewritten"]
    table.add_row("rewritten", f"{rewritten['ppl']:.3f}", f"{100 * report['ppl_delta_relative']:+.2f}%",
                  str(rewritten["kv_bytes_per_token"]))
    console.print(table)
    for line in report["rewrites"]:
        console.print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
