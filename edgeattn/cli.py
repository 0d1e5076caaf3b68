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


class ThresholdError(click.ClickException):
    """A numerics check failed: one line on stderr, exit code 1."""

    exit_code = EXIT_THRESHOLD


def _input_errors(command):
    """Turn the project's own input errors into one-line CLI errors (exit 2)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from edgeattn.errors import EdgeattnError

        try:
            return command(*args, **kwargs)
        except (EdgeattnError, FileNotFoundError) as error:
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


SPEC_FIELDS = ("kv_heads", "gqa_method", "uptrain_steps", "window", "sinks", "block_size", "top_blocks",
               "block_mass", "kv_cache", "kv_quant")


def _spec_from(kwargs, recipe_spec: dict | None = None):
    """The AttentionSpec of the flags; recipe values fill the flags not given on the command line."""
    from edgeattn.spec import AttentionSpec

    values = {name: kwargs.pop(name) for name in SPEC_FIELDS}
    context = click.get_current_context()
    for name, value in (recipe_spec or {}).items():
        if context.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            values[name] = value
    return AttentionSpec(**values)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeattn")
def main() -> None:
    """edgeattn: rewrite a language model's attention for phones and boards, export it, run it.

    \b
    Example:
      edgeattn models
      edgeattn quality smollm2 --kv-heads 1 --window 512 --sinks 4 --kv-cache int8
      edgeattn convert smollm2 -o out/ --kv-heads 1 --kv-cache int8 --weights int4
      edgeattn generate out/ "The capital of France is"
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
                            context=context, max_windows=max_windows)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_quality(report)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@spec_options
@click.option("--weights", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True)
@click.option("--weights-block-size", type=int, default=32, show_default=True,
              help="Block size of int4/int8 weight quantization (MatMulNBits).")
@click.option("--attention-op", type=click.Choice(["auto", "ort", "onnx", "edgeattn"]), default="auto", show_default=True)
@click.option("--max-length", type=int, default=2048, show_default=True, help="KV-cache capacity in tokens (full caches).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--calibration-text", type=click.Path(dir_okay=False), help="Text for calibrated steps (default: packaged text).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="TOML recipe with [spec] and [convert] tables.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@_input_errors
def convert(model, output, weights, weights_block_size, attention_op, max_length, provider, calibration_text,
            recipe, force, as_json, **spec_kwargs) -> None:
    """Rewrite MODEL's attention and export it to an ONNX folder that onnxruntime runs.

    \b
    Example:
      edgeattn convert smollm2 -o out/ --kv-heads 1 --kv-cache int8 --weights int4
      edgeattn convert smollm2 -o out/ --recipe recipe.toml --force
    """
    from pathlib import Path

    from edgeattn.convert import ConvertOptions, NumericsError, convert as run_convert
    from edgeattn.recipe import read_recipe

    tables = read_recipe(recipe) if recipe else {}
    spec = _spec_from(spec_kwargs, tables.get("spec"))
    flags = {"weights": weights, "block_size": weights_block_size, "attention_op": attention_op,
             "max_length": max_length, "provider": provider, "calibration_text": calibration_text}
    context = click.get_current_context()
    for name, value in tables.get("convert", {}).items():
        flag = "weights_block_size" if name == "block_size" else name
        if context.get_parameter_source(flag) != click.core.ParameterSource.COMMANDLINE:
            flags[name] = value
    options = ConvertOptions(model, Path(output), spec, force=force,
                             **{**flags, "calibration_text": Path(flags["calibration_text"]) if flags["calibration_text"] else None})
    try:
        manifest = _with_progress(lambda progress: run_convert(options, progress), quiet=as_json)
    except NumericsError as error:
        raise ThresholdError(str(error)) from error
    summary = _convert_summary(Path(output), manifest)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            click.echo(f"  {key:<22} {value}")


def _with_progress(work, quiet: bool):
    if quiet:
        return work(lambda step: None)
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("starting") as status:
        def progress(step: str) -> None:
            console.log(step)
            status.update(step)

        return work(progress)


def _convert_summary(output, manifest: dict) -> dict:
    size = sum(path.stat().st_size for path in output.iterdir() if path.is_file())
    kv = manifest["kv_cache"]
    return {
        "output": str(output), "size_mb": round(size / 1e6, 1), "weights": manifest["weights"]["dtype"],
        "lowering": f"{manifest['lowering']['per_layer'][0]} ({manifest['lowering']['op']}) x {len(manifest['lowering']['per_layer'])} layers",
        "kv_cache": f"{kv['codec']} {'ring' if kv['ring'] else 'full'} buffer, capacity {kv['capacity']}",
        "kv_bytes_per_token": kv["bytes_per_token"], "kv_mb_at_capacity": round(kv["bytes_at_capacity"] / 1e6, 2),
        "numerics": manifest["numerics"],
    }


@main.command()
@click.argument("folder", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (reproducible output).")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user turn of the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token ids and timings as JSON.")
@_input_errors
def generate(folder, prompt, max_new_tokens, provider, threads, temperature, top_k, top_p, seed, chat, as_json) -> None:
    """Generate text from an exported FOLDER with onnxruntime (no PyTorch needed).

    \b
    Example:
      edgeattn generate out/ "The capital of France is" --max-new-tokens 32
      edgeattn generate out/ "Write a haiku about the sea" --chat --temperature 0.7 --seed 1 --json
    """
    from edgeattn.runtimes import EdgeLM, Generation, SamplingConfig, stream

    lm = EdgeLM.load(folder, provider=provider, threads=threads)
    config = SamplingConfig(temperature, top_k, top_p, seed)
    text = lm.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    result = Generation(lm.encode(text))
    printed = ""
    for _ in stream(lm, result.prompt_tokens, max_new_tokens, config, result=result):
        if not as_json:
            decoded = lm.decode(result.tokens)
            click.echo(decoded[len(printed):], nl=False)
            printed = decoded
    result.text = lm.decode(result.tokens)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo()


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
