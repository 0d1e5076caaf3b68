"""The ``edgeattn`` command line. Each command parses options and makes one API call."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click
from click.core import ParameterSource

from edgeattn import __version__
from edgeattn.choices import (
    ATTENTION_OPS,
    BLOCK_SELECTS,
    GQA_METHODS,
    KV_CACHE_PRECISIONS,
    KV_QUANT_MODES,
    PROVIDERS,
    WEIGHTS_PRECISIONS,
)

EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class InputError(click.ClickException):
    """Bad input (model, option, file): one line on stderr, exit code 2, no traceback."""

    exit_code = EXIT_USAGE


class ThresholdError(click.ClickException):
    """A numerics check failed: one line on stderr, exit code 1."""

    exit_code = EXIT_THRESHOLD


def _input_errors(command):
    """Turn the project's own input errors and file-system errors into one-line CLI errors (exit 2),
    and Ctrl-C into one line and exit 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from edgeattn.errors import EdgeattnError
        from edgeattn.user_paths import FILESYSTEM_ERRNOS, describe_os_error

        try:
            return command(*args, **kwargs)
        except (EdgeattnError, FileNotFoundError) as error:
            raise InputError(_one_line(str(error))) from error
        except OSError as error:
            if error.errno not in FILESYSTEM_ERRNOS:
                raise
            raise InputError(_one_line(describe_os_error(error))) from error
        except KeyboardInterrupt:
            click.echo("edgeattn: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _one_line(message: str) -> str:
    """Messages that quote other libraries (transformers' are paragraphs) condensed to one line."""
    return " ".join(message.split())


def _text_file(context, parameter, value):
    """Option callback: a text the command will read exists and is UTF-8, checked before anything loads."""
    if value is not None:
        from edgeattn.user_paths import UserPathError, check_text_file

        try:
            check_text_file(value, parameter.opts[-1])
        except UserPathError as error:
            raise InputError(str(error)) from error
    return value


def _writable_file(context, parameter, value):
    """Option callback: a report file the command will write can be created ('-' is stdout)."""
    if value is not None and value != "-":
        from edgeattn.user_paths import UserPathError, check_writable

        try:
            check_writable(value, parameter.opts[-1])
        except UserPathError as error:
            raise InputError(str(error)) from error
    return value


def _thread_count(context, parameter, value):
    """Option callback: 1 to this machine's core count (more threads only contend, and each costs memory)."""
    import os

    cores = os.cpu_count() or 1
    if value is not None and value < 1:
        raise InputError(f"--threads must be >= 1, got {value} (leave it out for the default)")
    if value is not None and value > cores:
        raise InputError(f"--threads {value} is more than this machine's {cores} cores, the limit "
                         "(leave it out for the default)")
    return value


def _at_least(least: int):
    """Option callback factory: a whole number >= ``least``, refused in one line."""

    def check(context, parameter, value):
        if value is not None and value < least:
            raise InputError(f"{parameter.opts[-1]} must be >= {least}, got {value}")
        return value

    return check


class _EchoHandler(logging.Handler):
    """The library's log messages (e.g. what a killed run left and was cleaned) as lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"edgeattn: {record.getMessage()}", err=True)


def spec_options(command):
    """The AttentionSpec flags: one flag per spec field."""
    options = [
        click.option("--kv-heads", type=int, help="Merge KV heads into N groups (GQA; 1 = MQA)."),
        click.option("--gqa-method", type=click.Choice(GQA_METHODS), default="calibrated", show_default=True),
        click.option("--uptrain-steps", type=int, default=0, show_default=True,
                     help="Distillation steps after a calibrated merge."),
        click.option("--uptrain-minutes", type=float,
                     help="Instead of --uptrain-steps: distil for about this many minutes on this machine (the "
                          "steps that fit are recorded)."),
        click.option("--window", type=int, help="Sliding window: attend to the last W tokens (ring-buffer cache)."),
        click.option("--sinks", type=int, default=0, show_default=True, help="Always attend to the first S tokens."),
        click.option("--block-size", type=int, help="Hierarchical attention: block size B."),
        click.option("--top-blocks", type=int, help="Hierarchical attention: blocks kept per query."),
        click.option("--block-mass", type=float, help="Hierarchical attention: keep blocks until this estimated mass."),
        click.option("--block-select", type=click.Choice(BLOCK_SELECTS), default="query-head", show_default=True,
                     help="Hierarchical attention: blocks chosen per query head, or shared by a kv head's query heads "
                          "(fewer rows read per token)."),
        click.option("--kv-cache", type=click.Choice(KV_CACHE_PRECISIONS), default="fp32", show_default=True),
        click.option("--kv-quant", type=click.Choice(KV_QUANT_MODES), default="per-channel", show_default=True),
        click.option("--kv-residual", type=int, default=0, show_default=True,
                     help="With --kv-quant per-token: each token reads its last N tokens at full precision (KIVI's "
                          "residual window; a constant N-token float32 buffer per layer)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


SPEC_FIELDS = ("kv_heads", "gqa_method", "uptrain_steps", "uptrain_minutes", "window", "sinks", "block_size", "top_blocks",
               "block_mass", "block_select", "kv_cache", "kv_quant", "kv_residual")


# Spec fields that say the same thing in different units: a recipe's one gives way to a flag's other.
SPEC_ALTERNATIVES = (("uptrain_steps", "uptrain_minutes"),)


def _spec_from(kwargs, recipe_spec: dict | None = None):
    """The AttentionSpec of the flags; recipe values fill the flags not given on the command line."""
    from edgeattn.spec import AttentionSpec

    values = {name: kwargs.pop(name) for name in SPEC_FIELDS}
    table = dict(recipe_spec or {})
    context = click.get_current_context()
    for group in SPEC_ALTERNATIVES:  # one of a group given on the command line replaces the recipe's choice
        if any(context.get_parameter_source(name) == ParameterSource.COMMANDLINE for name in group):
            for name in group:
                table.pop(name, None)
    return AttentionSpec(**_recipe_fills(values, table))


def _recipe_fills(flags: dict, table: dict) -> dict:
    """``flags`` (the command's parameters by name) with ``table``'s values (a recipe table, whose keys are
    parameter names) for every flag not given on the command line: a flag given wins over the recipe."""
    context = click.get_current_context()
    recipe = {name: value for name, value in table.items()
              if context.get_parameter_source(name) != ParameterSource.COMMANDLINE}
    return {**flags, **recipe}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeattn")
@click.option("--verbose", is_flag=True, help="Also show other libraries' warnings, logs and progress bars.")
def main(verbose: bool) -> None:
    """edgeattn: rewrite a language model's attention for phones and boards, export it, run it.

    \b
    Example:
      edgeattn models
      edgeattn quality smollm2 --kv-heads 1 --window 512 --sinks 4 --kv-cache int8
      edgeattn convert smollm2 -o out/ --kv-heads 1 --kv-cache int8 --weights int4
      edgeattn generate out/ "The capital of France is"
    """
    if not verbose:
        from edgeattn.console import quiet_other_libraries

        quiet_other_libraries()
    library = logging.getLogger("edgeattn")
    if not any(isinstance(handler, _EchoHandler) for handler in library.handlers):
        library.addHandler(_EchoHandler())
    # Shown once, by the handler above: onnxruntime's quantizer configures the root logger when imported.
    library.propagate = False


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
@click.option("--text", "text_path", type=click.Path(dir_okay=False), callback=_text_file,
              help="Text to score (default: the packaged evaluation text, ~2,500 SmolLM2 tokens).")
@click.option("--calibration-text", type=click.Path(dir_okay=False), callback=_text_file,
              help="Text for calibrated steps (default: packaged text).")
@click.option("--context", type=int, default=512, show_default=True, help="Tokens per perplexity window.")
@click.option("--max-windows", type=int, default=4, show_default=True,
              help="Windows to score at most (fewer, or one shorter window, when the text is shorter; said so).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@_input_errors
def quality(model, text_path, calibration_text, context, max_windows, as_json, **spec_kwargs) -> None:
    """Rewrite MODEL's attention and report perplexity before and after.

    \b
    Example:
      edgeattn quality smollm2 --kv-heads 1 --window 512 --sinks 4 --text valid.txt --context 2048
    """
    from edgeattn.evaluation.quality_report import quality_report, render_text

    spec = _spec_from(spec_kwargs)
    report = _with_progress(lambda progress: quality_report(
        model, spec, text_path=text_path, calibration_text=calibration_text, context=context,
        max_windows=max_windows, progress=progress), quiet=as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_text(report), nl=False)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@spec_options
@click.option("--weights", type=click.Choice(WEIGHTS_PRECISIONS), default="fp32", show_default=True,
              help="From a GGUF, int4/int8 carry its own blocks where they map exactly; source keeps each GGUF "
                   "tensor at its own precision.")
@click.option("--weights-block-size", type=int, default=32, show_default=True,
              help="Block size of int4/int8 weight quantization (MatMulNBits).")
@click.option("--attention-op", type=click.Choice(ATTENTION_OPS), default="auto", show_default=True)
@click.option("--max-length", type=int, help="KV-cache capacity in tokens (full caches). "
              "[default: 2048, or the model's position limit when smaller]")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True)
@click.option("--calibration-text", type=click.Path(dir_okay=False), callback=_text_file,
              help="Text for calibrated steps (default: packaged text).")
@click.option("--recipe", type=click.Path(dir_okay=False), callback=_text_file,
              help="TOML recipe with [spec] and [convert] tables.")
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

    from edgeattn import convert_report
    from edgeattn.convert import ConvertOptions, NumericsError
    from edgeattn.convert import convert as run_convert
    from edgeattn.recipe import read_recipe

    tables = read_recipe(recipe) if recipe else {}
    spec = _spec_from(spec_kwargs, tables.get("spec"))
    flags = _recipe_fills({"weights": weights, "weights_block_size": weights_block_size, "attention_op": attention_op,
                           "max_length": max_length, "provider": provider, "calibration_text": calibration_text},
                          tables.get("convert", {}))
    options = ConvertOptions(model, Path(output), spec, force=force,
                             **{**flags,
                                "calibration_text": Path(flags["calibration_text"]) if flags["calibration_text"] else None})
    from edgeattn.user_paths import reporting_write_errors

    try:
        with reporting_write_errors(output):
            manifest = _with_progress(lambda progress: run_convert(options, progress), quiet=as_json)
    except NumericsError as error:
        raise ThresholdError(str(error)) from error
    summary = convert_report.summary(Path(output), manifest, max_length_given=flags["max_length"] is not None)
    click.echo(json.dumps(summary, indent=2) if as_json else convert_report.render_text(summary))


def _with_progress(work, quiet: bool):
    """``work(progress)`` with its progress on stderr (edgeattn.console), or none when ``quiet``."""
    from edgeattn.console import ProgressDisplay

    with ProgressDisplay(quiet) as progress:
        return work(progress)


@main.command()
@click.argument("folder", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, callback=_at_least(1))
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True)
@click.option("--threads", type=int, callback=_thread_count,
              help="onnxruntime intra-op threads, 1 to the core count (default: onnxruntime's choice).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (reproducible output).")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user turn of the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token ids and timings as JSON.")
@click.option("--verify", is_flag=True, help="First check every file against the sha256 in FOLDER's manifest.")
@_input_errors
def generate(folder, prompt, max_new_tokens, provider, threads, temperature, top_k, top_p, seed, chat, as_json,
             verify) -> None:
    """Generate text from an exported FOLDER with onnxruntime (no PyTorch needed).

    \b
    Example:
      edgeattn generate out/ "The capital of France is" --max-new-tokens 32
      edgeattn generate out/ "Write a haiku about the sea" --chat --temperature 0.7 --seed 1 --json
      edgeattn generate out/ "Hello" --verify    # first check the files against their recorded sha256
    """
    from edgeattn.runtimes import EdgeLM, Generation, SamplingConfig, stream

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"the prompt is not valid UTF-8 (character {error.start}): pass text in UTF-8") from None
    config = SamplingConfig(temperature, top_k, top_p, seed)
    lm = EdgeLM.load(folder, provider=provider, threads=threads, verify=verify)
    text = lm.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    result = Generation(lm.encode(text))
    printed = ""
    try:
        for _ in stream(lm, result.prompt_tokens, max_new_tokens, config, result=result):
            if not as_json:
                decoded = lm.decode(result.tokens)
                click.echo(decoded[len(printed):], nl=False)
                printed = decoded
    except KeyboardInterrupt:
        result.stop = "interrupted"
        _print_generation(lm, result, as_json)
        raise
    _print_generation(lm, result, as_json)
    if result.stop == "cache_full" and not as_json:
        click.echo(f"edgeattn: stopped: KV cache full ({lm.kv.cache_tokens} tokens); convert with a larger "
                   "--max-length, or a --window for constant memory", err=True)


def _print_generation(lm, result, as_json: bool) -> None:
    """What was generated: the JSON of it, or the end of the streamed line."""
    result.text = lm.decode(result.tokens)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo()


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path())
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True)
@click.option("--threads", type=int, callback=_thread_count,
              help="onnxruntime intra-op threads, 1 to the core count (default: the target's, else all cores).")
@click.option("--prompt-lengths", default="128,512", show_default=True, help="Prompt lengths for time to first token.")
@click.option("--contexts", default="128,512,2048,4096", show_default=True,
              help="Contexts for decode ms/token (the cache is filled to each).")
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed repeats (decode: timed tokens).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up decode steps.")
@click.option("--target", help="Device preset, e.g. pi5, pi5-2gb, pi4, pixel8, iphone15, jetson-orin-nano "
                               "(an unknown name lists them; docs/profile.md gives their sources).")
@click.option("--max-length", type=int, help="KV length for the target's memory check (default: each folder's own).")
@click.option("--ops", is_flag=True, help="Add the top operators of decode from onnxruntime's profiler.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), callback=_writable_file,
              help="Write the report as JSON (docs/profile.md).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), callback=_writable_file,
              help="Write the report as markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_writable_file,
              help="Plot decode ms/token vs context to a PNG (needs matplotlib).")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@_input_errors
def profile(folders, provider, threads, prompt_lengths, contexts, repeats, warmup, target, max_length, ops, json_path,
            markdown_path, plot_path, quiet) -> None:
    """Measure exported FOLDERS on this machine: load, first token, decode speed, memory, roofline.

    Several folders are measured interleaved in one run, with ratios against the first.
    Needs only the runtime install, so it runs on the device itself. Ctrl-C stops
    measuring and still writes what was measured.

    \b
    Example:
      edgeattn profile out/ --target pi5 --json r.json --plot r.png
      edgeattn profile fp32/ int4/ --contexts 128,512,2048 --threads 2 --markdown r.md --ops
    """
    from edgeattn.runtimes import profile_report
    from edgeattn.runtimes.profile import ProfileOptions
    from edgeattn.runtimes.profile import profile as run_profile
    from edgeattn.runtimes.targets import get_target

    if plot_path:
        profile_report.require_matplotlib()
    options = ProfileOptions(
        provider=provider, threads=threads, prompt_lengths=_token_counts(prompt_lengths, "--prompt-lengths"),
        contexts=_token_counts(contexts, "--contexts"), repeats=repeats, warmup=warmup,
        target=get_target(target) if target else None, max_length=max_length, ops=ops)
    report = run_profile(list(folders), options, progress=None if quiet else _plain_progress)
    click.echo(profile_report.render_text(report))
    from edgeattn.user_paths import reporting_write_errors

    if json_path:
        with reporting_write_errors(json_path):
            profile_report.write_json(report, json_path)
    if markdown_path:
        with reporting_write_errors(markdown_path):
            profile_report.write_atomic(markdown_path, profile_report.render_markdown(report) + "\n")
    if plot_path:
        with reporting_write_errors(plot_path):
            profile_report.write_plot(report, plot_path)
    if not report["complete"]:
        click.echo("edgeattn: interrupted; the partial results above were written", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _plain_progress(step: str, done: int | None = None, total: int | None = None) -> None:
    """Profile's progress: a plain line per step, never a live display whose repainting would share the cores
    being timed."""
    click.echo(step, err=True)


def _token_counts(text: str, flag: str) -> tuple[int, ...]:
    """'128,512' -> (128, 512); ranges are checked by ProfileOptions. A list that names nothing is refused."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"{flag} takes comma-separated whole numbers of tokens, got {text!r}") from None
    if not counts:
        raise InputError(f"{flag} names no token count ({text!r}): give at least one, e.g. {flag} 128")
    return counts


def _threshold_options(command):
    """One flag per threshold of edgeattn.runtimes.thresholds (--max-kl ...), collected into ``thresholds``."""
    from edgeattn.runtimes.thresholds import THRESHOLDS

    for threshold in reversed(THRESHOLDS.values()):
        bound = "at most" if threshold.upper else "at least"
        command = click.option(threshold.flag, threshold.key, type=float,
                               help=f"Bound: {threshold.meaning}, {bound} this.")(command)
    return command


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--reference", help="The original model (default: the source recorded in FOLDER's manifest).")
@click.option("--golden", is_flag=True, help="Check against FOLDER's golden.npz only: no PyTorch needed (phones, boards).")
@click.option("--provider", "providers", multiple=True, type=click.Choice(PROVIDERS),
              help="onnxruntime provider (default: cpu); repeat it to compare providers with each other too.")
@click.option("--text", type=click.Path(dir_okay=False), callback=_text_file,
              help="Text to compare on (default: packaged calibration text).")
@click.option("--calibration-text", type=click.Path(dir_okay=False), callback=_text_file,
              help="Calibration text of the rewrite (default: the one convert recorded).")
@click.option("--prompts", type=int, help="Prompts cut from the text. [default: 2]")
@click.option("--prefill", type=int, help="Tokens each prompt gives at once. [default: 32]")
@click.option("--steps", type=int, help="Teacher-forced single-token decode steps per prompt. [default: 64]")
@click.option("--greedy-tokens", type=int, help="Greedy tokens generated per prompt. [default: 32]")
@click.option("--threads", type=int, callback=_thread_count,
              help="onnxruntime intra-op threads, 1 to the core count (default: onnxruntime's choice).")
@_threshold_options
@click.option("--recipe", type=click.Path(dir_okay=False), callback=_text_file,
              help="TOML recipe; its [validate] table sets the same keys.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), callback=_writable_file,
              help="Write the report as JSON to FILE ('-': stdout, no table); schema in docs/validate.md.")
@click.option("--junit-xml", "junit_path", type=click.Path(dir_okay=False), callback=_writable_file,
              help="Write one JUnit test case per metric.")
@_input_errors
def validate(folder, reference, golden, providers, text, calibration_text, prompts, prefill, steps, greedy_tokens,
             threads, recipe, json_path, junit_path, **thresholds) -> None:
    """Check that an exported FOLDER computes what the PyTorch model computes.

    Compares onnxruntime with the rewritten PyTorch model (export:*, gated by defaults of
    the folder's precision) and with the original model (rewrite:*, gated by the bounds you
    set). Exit codes: 0 every threshold holds, 1 a threshold failed, 2 usage or input error.

    \b
    Example:
      edgeattn validate out/ --json report.json --junit-xml report.xml
      edgeattn validate out/ --max-ppl-delta 0.05 --min-top1 0.9 --provider cpu --provider cuda
      edgeattn validate out/ --golden          # on the device: needs only `pip install edgeattn`
    """
    from pathlib import Path

    from edgeattn.recipe import read_recipe
    from edgeattn.runtimes.thresholds import user_bounds
    from edgeattn.user_paths import check_text_file, reporting_write_errors

    recipe_table = read_recipe(recipe).get("validate", {}) if recipe else {}
    settings = _recipe_fills({"prompts": prompts, "prefill": prefill, "steps": steps, "greedy_tokens": greedy_tokens,
                              "text": text, **thresholds}, recipe_table)
    bounds = {key: settings.pop(key) for key in thresholds if settings[key] is not None}
    user_bounds(bounds)  # NaN, infinite or negative bounds are refused before anything loads
    lengths = {key: value for key, value in settings.items() if value is not None}
    providers = tuple(providers) or ("cpu",)
    if golden:
        from edgeattn.runtimes.golden import validate_golden

        flags = {"--reference": reference, "--calibration-text": calibration_text, "--text": text,
                 "--prompts": prompts, "--prefill": prefill, "--steps": steps, "--greedy-tokens": greedy_tokens}
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise InputError(f"--golden takes its inputs from golden.npz; {', '.join(given)} do not apply")
        replayed = sorted(key for key in recipe_table if key not in thresholds)
        if replayed:
            raise InputError(f"--golden replays the prompts and steps stored in golden.npz; recipe {recipe} sets "
                             f"[validate] {', '.join(replayed)}: remove them, or validate without --golden")
        report = validate_golden(folder, providers, bounds, threads)
    else:
        from edgeattn.evaluation.validate import ValidateOptions
        from edgeattn.evaluation.validate import validate as run_validate

        if "text" in lengths:
            where = "--text" if text else f"recipe {recipe}: [validate] text"
            lengths["text"] = check_text_file(lengths["text"], where)
        options = ValidateOptions(Path(folder), providers, reference,
                                  calibration_text=Path(calibration_text) if calibration_text else None,
                                  bounds=bounds, threads=threads, **lengths)
        report = _with_progress(lambda progress: run_validate(options, progress=progress), quiet=json_path == "-")
    from edgeattn.runtimes.validation_report import render_text, write_json, write_junit

    if json_path == "-":
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_text(report))
        if json_path:
            with reporting_write_errors(json_path):
                write_json(report, json_path)
    if junit_path:
        with reporting_write_errors(junit_path):
            write_junit(report, junit_path)
    click.get_current_context().exit(report["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
