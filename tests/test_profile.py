"""edgeattn profile: tiny-model runs checked against the manifest and hand arithmetic, the JSON schema,
the plot, target presets and their memory check, bad options, Ctrl-C, the profiler parser, torch-freedom.

Timings are never asserted (the machine is shared): only what follows from them (ratios, units, order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from edgeattn.cli import main
from edgeattn.convert import ConvertOptions, convert
from edgeattn.runtimes import profile as profile_module
from edgeattn.runtimes import roofline, targets
from edgeattn.runtimes.ops_profile import top_ops
from edgeattn.runtimes.peak_memory import measure_peak_rss
from edgeattn.runtimes.profile import ProfileOptions, profile
from edgeattn.runtimes.profile_report import SCHEMA_PATH
from edgeattn.runtimes.roofline import TargetMemoryError
from edgeattn.runtimes.targets import TARGETS, Target
from edgeattn.spec import AttentionSpec

MAX_LENGTH = 64
WINDOW = 8
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny-llama: layers x (K, V) x kv heads x head dim x fp32
QUICK = dict(threads=1, contexts=(16, 32), prompt_lengths=(8,), repeats=3, warmup=1)


@pytest.fixture(scope="module")
def folders(converted, tmp_path_factory) -> tuple[Path, Path]:
    """The session's tiny-llama folders, full cache and ring, as links named full and ring (the report names a
    model by its folder)."""
    root = tmp_path_factory.mktemp("profile")
    full, ring = root / "full", root / "ring"
    full.symlink_to(converted("tiny-llama", max_length=MAX_LENGTH)[0], target_is_directory=True)
    ring.symlink_to(converted("tiny-llama", AttentionSpec(window=WINDOW), max_length=MAX_LENGTH)[0],
                    target_is_directory=True)
    return full, ring


@pytest.fixture(scope="module")
def report(folders) -> dict:
    return profile(folders, ProfileOptions(target=TARGETS["pi5"], ops=True, **QUICK))


def _validate(report: dict) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)


def _decode(entry: dict, context: int) -> dict:
    return next(row for row in entry["decode"] if row["context"] == context)


def test_report_validates_against_its_schema(report):
    _validate(report)
    assert report["complete"] is True
    assert [entry["name"] for entry in report["models"]] == ["full", "ring"]


def test_schema_rejects_a_malformed_report(report):
    broken = json.loads(json.dumps(report))
    del broken["models"][0]["decode"][0]["ms_per_token"]["p90"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_sizes_and_kv_bytes_follow_the_folder(report, folders):
    for entry, folder in zip(report["models"], folders):
        onnx_files = (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size
        assert entry["weights_bytes"] == onnx_files
        assert entry["disk_bytes"] == sum(path.stat().st_size for path in folder.iterdir())
        assert entry["kv_cache"]["bytes_per_token"] == KV_BYTES_PER_TOKEN
    full, ring = report["models"]
    assert _decode(full, 16)["kv_bytes"] == 16 * KV_BYTES_PER_TOKEN
    assert _decode(full, 32)["kv_bytes"] == 32 * KV_BYTES_PER_TOKEN
    assert _decode(ring, 32)["kv_bytes"] == WINDOW * KV_BYTES_PER_TOKEN  # the ring holds only the window
    assert full["target_fit"] == {"max_length": MAX_LENGTH, "weights_bytes": full["weights_bytes"],
                                  "kv_bytes": MAX_LENGTH * KV_BYTES_PER_TOKEN,
                                  "required_bytes": full["weights_bytes"] + MAX_LENGTH * KV_BYTES_PER_TOKEN,
                                  "budget_bytes": int(8 * 2**30 * 0.75), "fits": True}
    assert ring["target_fit"]["kv_bytes"] == WINDOW * KV_BYTES_PER_TOKEN


def test_roofline_projection_and_ratios_by_hand(report):
    bandwidth = report["machine"]["bandwidth"]["gb_per_s"]
    first = report["models"][0]
    for entry in report["models"]:
        for row in entry["decode"]:
            stats = row["ms_per_token"]
            assert stats["n"] == QUICK["repeats"] and stats["p10"] <= stats["median"] <= stats["p90"]
            bytes_read = entry["weights_bytes"] + row["kv_bytes"]
            assert row["bytes_read_per_token"] == bytes_read
            assert row["roofline_ms"] == pytest.approx(bytes_read / (bandwidth * 1e9) * 1e3, rel=1e-3)
            assert row["roofline_ratio"] == pytest.approx(stats["median"] / row["roofline_ms"], rel=1e-2)
            assert row["target_roofline_ms"] == pytest.approx(bytes_read / 17.1e9 * 1e3, rel=1e-3)
            assert row["target_projected_ms"] == pytest.approx(row["target_roofline_ms"] * row["roofline_ratio"], rel=1e-2)
            assert row["tokens_per_s"] == pytest.approx(1e3 / stats["median"], rel=1e-3)
            if entry is not first:
                first_median = _decode(first, row["context"])["ms_per_token"]["median"]
                assert row["vs_first"] == pytest.approx(stats["median"] / first_median, rel=1e-2)
    assert "vs_first" not in first["decode"][0]
    prefill = report["models"][1]["prefill"][0]
    assert prefill["prefill_tokens_per_s"] == pytest.approx(8 / prefill["ttft_ms"]["median"] * 1e3, rel=1e-3)


def test_the_cache_is_really_filled_to_each_context(folders, monkeypatch):
    lengths = []
    original = profile_module.decode_step

    def recording(lm, token):
        lengths.append(lm.length)
        return original(lm, token)

    monkeypatch.setattr(profile_module, "decode_step", recording)
    profile(folders[:1], ProfileOptions(**{**QUICK, "prompt_lengths": ()}))
    # warmup 1 + repeats 3 steps end at the context: tokens cached before each step, spelled out
    assert lengths == [12, 13, 14, 15, 28, 29, 30, 31]


def test_contexts_beyond_the_cache_are_skipped_with_the_reason(folders):
    result = profile(folders, ProfileOptions(**{**QUICK, "contexts": (16, 128), "prompt_lengths": (8, 100)}))
    full, ring = result["models"]
    skipped = f"the KV cache holds {MAX_LENGTH} tokens (convert with a larger --max-length)"
    assert _decode(full, 128) == {"context": 128, "skipped": skipped}
    assert _decode(ring, 128) == {"context": 128, "skipped": f"the position table has {MAX_LENGTH} positions"}
    assert full["prefill"][1] == {"prompt_tokens": 100, "skipped": full["decode"][1]["skipped"]}
    _validate(result)


def test_ops_come_from_the_profiler(report):
    ops = report["models"][0]["ops"]
    assert ops["context"] == 32 and ops["runs"] == QUICK["repeats"]
    names = [row["op"] for row in ops["top"]]
    assert "MatMul" in names
    assert sum(row["share"] for row in ops["top"]) <= 1.0 + 1e-6
    assert [row["ms_per_run"] for row in ops["top"]] == sorted((row["ms_per_run"] for row in ops["top"]), reverse=True)


def test_top_ops_counts_only_the_last_runs():
    def node(op, ts, dur):
        return {"cat": "Node", "name": f"n_{op}_{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # the fill: not counted
        node("MatMul", 10, 90),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        node("MatMul", 210, 30), node("Add", 250, 10), node("MatMul", 260, 10),
        {"cat": "Node", "name": "n_fence_before", "ts": 255, "dur": 500, "args": {"op_name": "MatMul"}},  # not a kernel
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        node("MatMul", 410, 20), node("Add", 440, 30),
    ]
    # last 2 runs: MatMul 30 + 10 + 20 = 60 us, Add 10 + 30 = 40 us; per run 0.030 ms and 0.020 ms
    assert top_ops(events, runs=2) == [
        {"op": "MatMul", "ms_per_run": 0.03, "share": 0.6, "calls_per_run": 1},
        {"op": "Add", "ms_per_run": 0.02, "share": 0.4, "calls_per_run": 1},
    ]


@pytest.mark.parametrize("kv, tokens, held, resident, limit", [
    # preallocated full cache of 100 slots: memory is the whole buffer from the start
    ({"bytes_per_token": 10, "capacity": 100, "ring": False, "max_positions": 100}, 40, 400, 1000, 100),
    # ring of 8 slots, unlimited positions: holds at most 8 tokens, reaches any context
    ({"bytes_per_token": 10, "capacity": 8, "ring": True, "max_positions": None}, 40, 80, 80, None),
    # ring within a position table of 64
    ({"bytes_per_token": 10, "capacity": 8, "ring": True, "max_positions": 64}, 40, 80, 80, 64),
    # growing cache (present = concat(past, new)): memory follows the tokens
    ({"bytes_per_token": 10, "capacity": 100, "ring": False, "growing": True, "max_positions": 100}, 40, 400, 400, 100),
])
def test_kv_bytes_and_limits_by_hand(kv, tokens, held, resident, limit):
    assert roofline.kv_bytes_held(kv, tokens) == held
    assert roofline.kv_bytes_resident(kv, tokens) == resident
    assert roofline.context_limit(kv)[0] == limit


def test_peak_rss_is_in_bytes_and_not_the_parents():
    """The child touches 200 MiB; its parent holds 800 MiB when it starts the child (as a test runner or a
    profile of several models does). getrusage's peak survives fork + exec on Linux and would report >= 800 MiB."""
    child = ("import numpy as np\n"
             "block = np.ones(200 * 2**20 // 8)\n"
             "from edgeattn.runtimes.peak_memory import process_peak_bytes\n"
             "print(process_peak_bytes())\n")
    parent = ("import subprocess, sys\n"
              "import numpy as np\n"
              "ballast = np.ones(800 * 2**20 // 8)\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)\n")
    peak = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert 200 * 2**20 <= peak < 700 * 2**20  # KiB-vs-bytes confusion is off by 1024x, the parent's peak by 800 MiB


def test_peak_rss_of_a_model_covers_its_weights(report, folders):
    for entry in report["models"]:
        assert entry["peak_rss"]["bytes"] > entry["weights_bytes"]
        assert entry["peak_rss"]["tokens"] == 32 - QUICK["warmup"]  # the longest context, then the warm-up steps
    failed = measure_peak_rss(folders[0] / "missing", "cpu", 1, 4, 1)
    assert failed["bytes"] is None and "no such folder" in failed["error"]


def test_target_sets_threads_capped_to_this_machine(monkeypatch):
    monkeypatch.setattr(profile_module.os, "cpu_count", lambda: 2)
    assert ProfileOptions(target=TARGETS["iphone15"]).resolved_threads() == (2, "target iphone15")
    threads, why = ProfileOptions(target=TARGETS["jetson-orin-nano"]).resolved_threads()
    assert threads == 2 and "wants 6" in why
    assert ProfileOptions(target=TARGETS["pi5"], threads=1).resolved_threads() == (1, "--threads")


def test_every_preset_names_a_source_for_each_figure():
    for target in TARGETS.values():
        assert set(target.sources) == {"cores", "memory", "bandwidth", "budget"}
        assert all(len(source) > 10 for source in target.sources.values())
        assert 1 <= target.threads <= 16 and 0 < target.budget_fraction <= 1 and target.bandwidth_gb_per_s > 1


def test_a_model_that_does_not_fit_the_target_is_a_clear_error(folders):
    tiny_board = Target("tiny-board", "a board with 100 kB", "1 core", 1, 100_000, 0.5, 1.0,
                        {"cores": "test", "memory": "test", "bandwidth": "test", "budget": "test"})
    with pytest.raises(TargetMemoryError) as error:
        profile(folders[:1], ProfileOptions(target=tiny_board, **QUICK))
    message = str(error.value)
    assert "does not fit tiny-board" in message and f"at {MAX_LENGTH} tokens" in message
    assert "full needs" in message and "budget 50.0 kB" in message and "\n" not in message


def test_cli_target_memory_failure_exits_2(folders, monkeypatch):
    tiny_board = Target("tiny-board", "a board with 100 kB", "1 core", 1, 100_000, 0.5, 1.0,
                        {"cores": "t", "memory": "t", "bandwidth": "t", "budget": "t"})
    monkeypatch.setitem(targets.TARGETS, "tiny-board", tiny_board)
    result = CliRunner().invoke(main, ["profile", str(folders[0]), "--target", "tiny-board", "--quiet"])
    assert result.exit_code == 2
    assert "does not fit tiny-board" in result.output


def test_cli_writes_json_markdown_and_a_png(folders, tmp_path):
    from PIL import Image

    paths = {kind: tmp_path / f"r.{kind}" for kind in ("json", "md", "png")}
    result = CliRunner().invoke(main, [
        "profile", *map(str, folders), "--contexts", "16,32", "--prompt-lengths", "8", "--repeats", "3",
        "--warmup", "1", "--threads", "1", "--target", "pi5", "--json", str(paths["json"]),
        "--markdown", str(paths["md"]), "--plot", str(paths["png"])])
    assert result.exit_code == 0, result.output
    written = json.loads(paths["json"].read_text())
    _validate(written)
    assert "PROJECTION" in result.output and "vs first" in result.output
    assert "| context | model | ms/token (p10-p90) |" in paths["md"].read_text()
    with Image.open(paths["png"]) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in paths.values()} == {0o666 & ~umask}  # not mkstemp's 0600


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "threads must be >= 1, got 0"),
    (["--contexts", "16,-32"], "every context must be a positive number of tokens, got -32"),
    (["--prompt-lengths", "0"], "every prompt length must be a positive number of tokens, got 0"),
    (["--contexts", "4"], "context 4 is too short"),
    (["--contexts", "16,abc"], "--contexts takes comma-separated whole numbers"),
    (["--target", "toaster"], "unknown target 'toaster'; choose from: pi5"),
    (["--target", "pi5", "--max-length", "65"], "--max-length 65 is beyond what the folder can hold"),
])
def test_cli_rejects_bad_options(folders, flags, message):
    result = CliRunner().invoke(main, ["profile", str(folders[0]), "--quiet", *flags])
    assert result.exit_code == 2
    assert message in result.output


def test_ctrl_c_keeps_and_writes_what_was_measured(folders, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile_module, "_measure_decode", interrupted)
    path = tmp_path / "partial.json"
    result = CliRunner().invoke(main, ["profile", str(folders[0]), "--quiet", "--json", str(path), *_quick_flags()])
    assert result.exit_code == 130
    written = json.loads(path.read_text())
    _validate(written)
    assert written["complete"] is False and written["interrupted_during"] == "decode at 16 tokens of context"
    assert written["models"][0]["prefill"][0]["ttft_ms"]["n"] == 3 and written["models"][0]["decode"] == []


def test_plot_without_matplotlib_is_a_clear_error(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = CliRunner().invoke(main, ["profile", str(folders[0]), "--plot", str(tmp_path / "r.png"), *_quick_flags()])
    assert result.exit_code == 2
    assert 'pip install "edgeattn[plot]"' in result.output


def test_profile_imports_only_the_runtime(folders, tmp_path):
    script = (
        "import sys\n"
        "from edgeattn.cli import main\n"
        f"main(['profile', {str(folders[0])!r}, '--quiet', '--json', {str(tmp_path / 'r.json')!r}, "
        f"'--markdown', {str(tmp_path / 'r.md')!r}, {', '.join(map(repr, _quick_flags()))}], standalone_mode=False)\n"
        "heavy = ('torch', 'transformers', 'onnxscript', 'onnx', 'jinja2', 'rich', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _quick_flags() -> list[str]:
    return ["--contexts", "16", "--prompt-lengths", "8", "--repeats", "3", "--warmup", "1", "--threads", "1"]


@pytest.mark.real_model
def test_smollm2_profile_against_its_architecture(tmp_path):
    """SmolLM2-135M: 30 layers x (K, V) x 3 kv heads x 64 dims x 4 bytes = 46,080 KV bytes per token."""
    folder = tmp_path / "smollm2"
    convert(ConvertOptions("smollm2", folder, max_length=2048))
    result = profile([folder], ProfileOptions(threads=2, contexts=(128,), prompt_lengths=(128,), repeats=3,
                                              target=TARGETS["pi5-2gb"]))
    _validate(result)
    entry = result["models"][0]
    assert entry["kv_cache"]["bytes_per_token"] == 46_080
    assert _decode(entry, 128)["kv_bytes"] == 128 * 46_080
    assert 500e6 < entry["weights_bytes"] < 600e6  # ~135M fp32 parameters (tied embedding stored once)
    assert entry["target_fit"]["required_bytes"] == entry["weights_bytes"] + 2048 * 46_080
    assert entry["target_fit"]["fits"] is True
    assert entry["peak_rss"]["bytes"] > entry["weights_bytes"]
