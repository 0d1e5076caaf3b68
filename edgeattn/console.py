"""What edgeattn's commands show on stderr besides their results: progress, and no other library's noise.

``ProgressDisplay`` is the CLI's progress callback (``edgeattn.progress``). On a terminal it
keeps one line per step: a spinner (or a bar for a counted step) and the elapsed time while
it runs, a check mark and its time once done. Elsewhere (a log, CI) it writes one plain line
as each step starts, with the time since the command began, and for a long counted step
(distillation) its count at each quarter reached after ``PLAIN_INTERVAL_S``.

``quiet_other_libraries`` keeps warnings, log lines and progress bars that say nothing to
an edgeattn user (the torch exporter's, transformers' GGUF tensor bar, onnxruntime's
logs) out of the console; ``edgeattn --verbose`` leaves them on.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import click

# Read by other libraries when they are imported or start a bar: torch's loggers at errors only, no
# tqdm bars (transformers' GGUF tensor bar is a plain tqdm), no transformers or huggingface_hub bars
# ("Loading weights"), transformers' log at errors only.
QUIET_ENVIRONMENT = {"TORCH_LOGS": "-all", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
# Python loggers of other libraries (onnxruntime's quantizer logs per node); their errors still show.
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "onnxruntime", "onnxruntime.quantization")
PLAIN_INTERVAL_S = 30.0


def quiet_other_libraries() -> None:
    """Silence other libraries' warnings, info logs and progress bars in this process (edgeattn's stay).

    Environment variables, warning filters and logger levels only: nothing is imported here, so a
    command that never loads torch does not pay for it.
    """
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"edgeattn(\.|$)")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class ProgressDisplay:
    """The CLI's progress callback: ``with ProgressDisplay() as progress: api_call(..., progress=progress)``.

    Plain lines need only click: commands of the runtime-only install (no rich) can use it too.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.started = time.perf_counter()
        self._live = None  # rich.progress.Progress on a terminal
        self._task = None
        self._step: str | None = None
        self._printed = 0.0  # when the last plain line was written
        self._quarter = 0  # the last quarter of a counted step a plain line reported

    def __enter__(self) -> ProgressDisplay:
        if not self.quiet:
            self._live = _live_progress()
            if self._live is not None:
                self._live.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._live is not None:
            if kind is None:
                self._finish()
            self._live.stop()

    def __call__(self, step: str, done: int | None = None, total: int | None = None) -> None:
        if self.quiet:
            return
        if self._live is None:
            now = time.perf_counter()
            quarter = 4 * done // total if total and done is not None else 0
            if step != self._step:
                self._quarter = quarter
            elif not (self._quarter < quarter < 4 and now - self._printed >= PLAIN_INTERVAL_S):
                return
            count = f" ({done}/{total})" if step == self._step else ""
            click.echo(f"edgeattn: [{now - self.started:6.1f} s] {step}{count}", err=True)
            self._step, self._printed, self._quarter = step, now, quarter
            return
        if step != self._step:
            self._finish()
            self._task = self._live.add_task(step, total=total, counted=total is not None)
            self._step = step
        if total is not None:
            self._live.update(self._task, completed=done or 0, total=total, counted=True)

    def _finish(self) -> None:
        """Mark the running step done: its spinner becomes a check mark, its time stops."""
        if self._task is not None:
            total = self._live.tasks[self._task].total or 1
            self._live.update(self._task, total=total, completed=total)
            self._live.stop_task(self._task)


def _live_progress():
    """A rich Progress on stderr when stderr is a terminal and rich is installed, else None."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return None
    console = Console(stderr=True)
    if not console.is_terminal:
        return None

    class CountedBar(ProgressColumn):
        """A bar and done/total for a counted step; nothing for the others."""

        def __init__(self) -> None:
            super().__init__()
            self.bar = BarColumn(bar_width=24)

        def render(self, task):
            if not task.fields.get("counted"):
                return Text("")
            row = Table.grid(padding=(0, 1))
            row.add_row(self.bar.render(task), Text(f"{int(task.completed)}/{int(task.total)}"))
            return row

    return Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"), CountedBar(),
                    TimeElapsedColumn(), console=console)
