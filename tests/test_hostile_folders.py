"""Hostile, damaged and edited folders: no checkpoint code runs, nothing outside a folder is read, --force
deletes nothing that is not edgeattn's, and every damaged folder is refused in one line with exit 2."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, models

from edgeattn.cli import main
from edgeattn.models import load_hf
from edgeattn.runtimes.manifest import MANIFEST_NAME, SCHEMA_PATH
from edgeattn.runtimes.schema_check import first_problem

CODE_REFUSED = "asks to run its own code (auto_map); edgeattn never runs code from a checkpoint"
EVIL_MODULE = """\
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""
# Classes transformers does not have, so that it would ask to import evil.py (the loader before this change
# did, and with "y" on stdin ran it: the marker was written).
AUTO_MAPS = {
    "config.json": {"model_type": "evil",
                    "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}},
    "tokenizer_config.json": {"tokenizer_class": "EvilTokenizer",
                              "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}},
}
GOLDEN_LENGTHS = ("--prefill", "8", "--steps", "8", "--greedy-tokens", "4")


def run(*args, stdin: str | None = None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=stdin, catch_exceptions=False)


def assert_refused(result, message: str) -> None:
    """Exit 2, and the error is one line that says ``message`` (progress lines may come before it)."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and "Do you wish to run the custom code" not in result.output


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """tiny-llama saved as a Hugging Face folder (safetensors + a fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from edgeattn.models.tiny import byte_tokenizer

    path = tmp_path_factory.mktemp("hf") / "tiny-llama-hf"
    load_hf("tiny-llama").model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(converted) -> Path:
    return converted("tiny-llama", max_length=64)[0]


def _copy(source: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(source, tmp_path / name, symlinks=True))


def _hostile(hf_folder: Path, tmp_path: Path, config_file: str) -> tuple[Path, Path]:
    """A copy of ``hf_folder`` whose ``config_file`` maps classes to evil.py, which writes a marker when run."""
    folder = _copy(hf_folder, tmp_path, "hostile")
    marker = tmp_path / "the-checkpoint-code-ran"
    (folder / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((folder / config_file).read_text())
    config.update(AUTO_MAPS[config_file])
    (folder / config_file).write_text(json.dumps(config))
    return folder, marker


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# -- no code from a checkpoint ever runs, and nothing prompts ------------------------------------------


@pytest.mark.parametrize("config_file", sorted(AUTO_MAPS))
def test_convert_refuses_a_folder_that_asks_to_run_its_code(hf_folder, tmp_path, config_file):
    hostile, marker = _hostile(hf_folder, tmp_path, config_file)
    result = run("convert", hostile, "-o", tmp_path / "out", "--json", stdin="y\n")
    assert_refused(result, CODE_REFUSED)
    assert config_file in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_command_line_answers_yes_to_nothing(hf_folder, tmp_path):
    """As the report tried it: `echo y | edgeattn convert ./folder -o out`."""
    hostile, marker = _hostile(hf_folder, tmp_path, "config.json")
    command = [sys.executable, "-m", "edgeattn.cli", "convert", str(hostile), "-o", str(tmp_path / "out")]
    result = subprocess.run(command, input="y\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(CODE_REFUSED)
    assert "Error:" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert not marker.exists()


def test_a_gguf_beside_a_tokenizer_config_with_code_is_refused(hf_folder, tmp_path):
    hostile, marker = _hostile(hf_folder, tmp_path, "tokenizer_config.json")
    (hostile / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    assert_refused(run("convert", hostile / "model.gguf", "-o", tmp_path / "out", "--json", stdin="y\n"), CODE_REFUSED)
    assert not marker.exists()


def test_validate_does_not_rebuild_from_a_source_that_asks_to_run_its_code(hf_folder, folder, tmp_path):
    hostile, marker = _hostile(hf_folder, tmp_path, "config.json")
    target = _copy(folder, tmp_path)
    _edit_manifest(target, lambda m: m["source"].update(model=str(hostile), weights_sha256=None))
    result = run("validate", target, *GOLDEN_LENGTHS, stdin="y\n")
    assert_refused(result, CODE_REFUSED)
    assert not marker.exists()


def _spy_on_loaders(monkeypatch, fakes: dict | None = None) -> list[tuple[str, dict]]:
    """Record the keyword arguments of every transformers from_pretrained edgeattn calls."""
    import transformers

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _name=cls.__name__, _original=original, **kwargs):
            calls.append((_name, kwargs))
            return fakes[_name]() if fakes else _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_every_folder_loader_is_told_never_to_run_checkpoint_code(hf_folder, monkeypatch):
    calls = _spy_on_loaders(monkeypatch)
    load_hf(hf_folder)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code") is False and kwargs.get("local_files_only")
               for _, kwargs in calls), calls


def test_every_gguf_loader_is_told_never_to_run_checkpoint_code(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from edgeattn.models.tiny import TINY_CONFIGS, byte_tokenizer, tiny_hf_model

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    calls = _spy_on_loaders(monkeypatch, {
        "AutoConfig": TINY_CONFIGS["llama"], "AutoModelForCausalLM": lambda: tiny_hf_model("llama"),
        "AutoTokenizer": lambda: PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer())})
    load_hf(gguf)
    assert sorted(name for name, _ in calls) == ["AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kwargs.get("trust_remote_code") is False and kwargs.get("gguf_file") == "model.gguf"
               for _, kwargs in calls)


# -- every file a folder names lies inside it -------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute, existing", "absolute, missing", "parent", "link out"])
def test_files_outside_the_folder_are_never_read(folder, tmp_path, where):
    target = _copy(folder, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(folder / name, outside / name)  # a loadable model, should anything follow the name
    (target / "link.onnx").symlink_to(outside / "model.onnx")
    name = {"absolute, existing": str(outside / "model.onnx"), "absolute, missing": str(tmp_path / "none.onnx"),
            "parent": "../outside/model.onnx", "link out": "link.onnx"}[where]
    _edit_manifest(target, lambda m: m["files"].update(model=name))
    result = run("generate", target, "hi", "--max-new-tokens", "1")
    assert_refused(result, f"the manifest names model file {name!r} outside the folder")
    assert_refused(run("validate", target, "--golden"), "outside the folder")


def test_the_refusal_does_not_tell_whether_an_outside_path_exists(folder, tmp_path):
    target = _copy(folder, tmp_path)
    messages = []
    for name in ("/etc/passwd", "/etc/no-such-file-here"):
        _edit_manifest(target, lambda m, name=name: m["files"].update(tokenizer=name))
        messages.append(run("generate", target, "hi").output.replace(name, "NAME"))
    assert messages[0] == messages[1] and "outside the folder" in messages[0]


def test_hashes_of_files_outside_the_folder_are_refused(folder, tmp_path):
    target = _copy(folder, tmp_path)
    _edit_manifest(target, lambda m: m["sha256"].update({"../../x": "0" * 64}))
    assert_refused(run("generate", target, "hi"), "the manifest names file '../../x' outside the folder")


# -- a damaged or edited folder: one line, exit 2 ---------------------------------------------------

WHOLE = "must be a whole number >= 1, got"
MANIFEST_DAMAGE = {
    "no kv_cache": (lambda m: m.pop("kv_cache"), "kv_cache is missing"),
    "no model": (lambda m: m.pop("model"), "model is missing"),
    "no io": (lambda m: m.pop("io"), "io is missing"),
    "files null": (lambda m: m.update(files=None), "files must be an object, got null"),
    "no tokenizer file": (lambda m: m["files"].pop("tokenizer"), "files.tokenizer is missing"),
    "format_version '1'": (lambda m: m.update(format_version="1"), f'format_version {WHOLE} "1"'),
    "format_version -5": (lambda m: m.update(format_version=-5), f"format_version {WHOLE} -5"),
    "format_version true": (lambda m: m.update(format_version=True), f"format_version {WHOLE} true"),
    "kv dtype of another graph": (lambda m: m["kv_cache"].update(dtype="float16"),
                                  "KV-cache dtype float16 does not match the graph's tensor(float)"),
    "kv dtype unknown": (lambda m: m["kv_cache"].update(dtype="float64"), "kv_cache.dtype must be one of"),
    "kv shape": (lambda m: m["kv_cache"].update(shape_tail=[2, 64, 8]),
                 "KV-cache shape [batch, 2, 64, 8] does not match"),
    "kv shape of text": (lambda m: m["kv_cache"].update(shape_tail=[2, "64", 16]),
                         "kv_cache.shape_tail[1] must be a whole"),
    "kv capacity": (lambda m: m["kv_cache"].update(capacity=4096), "capacity 4096 does not match its shape_tail"),
    "more layers": (lambda m: m["model"].update(num_layers=3), "describes 3 layers"),
    "fewer layers": (lambda m: m["model"].update(num_layers=1), "describes 1 layer ("),
    "vocab_size": (lambda m: m["model"].update(vocab_size=100),
                   "vocab_size 100 does not match the graph's logits (256)"),
    "cache names": (lambda m: m["io"]["cache_names"].update(past="{layer.__class__}.{kind}"),
                    "io.cache_names.past has an unexpected form"),
    "eos ids": (lambda m: m["model"].update(eos_token_ids="2"), "model.eos_token_ids must be a list"),
}


GRAPH_ONLY = ("kv dtype of another graph", "kv shape", "kv capacity", "more layers", "fewer layers", "vocab_size")


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_one_line_and_exit_2(folder, tmp_path, damage):
    edit, message = MANIFEST_DAMAGE[damage]
    target = _copy(folder, tmp_path)
    _edit_manifest(target, edit)
    assert_refused(run("generate", target, "hi", "--max-new-tokens", "2"), message)
    assert_refused(run("validate", target, "--golden"), "")  # the golden file may be the first to disagree


def test_the_schema_file_and_the_stdlib_checker_agree(folder):
    """The runtime's checker reads the same schema that jsonschema (a test-only dependency) validates with."""
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = json.loads((folder / MANIFEST_NAME).read_text())
    assert validator.is_valid(good) and first_problem(good, schema) is None
    for damage, (edit, _) in MANIFEST_DAMAGE.items():
        if damage in GRAPH_ONLY:
            continue  # the manifest is well-formed; only the graph shows it is wrong
        bad = copy.deepcopy(good)
        edit(bad)
        assert not validator.is_valid(bad) and first_problem(bad, schema), damage


@pytest.mark.parametrize("damage", ["truncated", "foreign", "not json"])
def test_a_damaged_or_foreign_tokenizer_is_refused(folder, tmp_path, damage):
    target = _copy(folder, tmp_path)
    path = target / "tokenizer.json"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "not json":
        path.write_bytes(b"\xff\xfe not a tokenizer")
    else:  # another model's tokenizer, with ids beyond this model's 256 logits
        Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0")).save(str(path))
    message = ("has 300 tokens but the model only 256" if damage == "foreign"
               else "tokenizer tokenizer.json cannot be read")
    assert_refused(run("generate", target, "hi", "--max-new-tokens", "2"), message)


def _edit_golden(folder: Path, edit) -> None:
    path = folder / "golden.npz"
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    edit(arrays)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def _out_of_range(arrays, key, value):
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = value


GOLDEN_DAMAGE = {
    "logits float64": (lambda a: a.update(logits=a["logits"].astype(np.float64)),
                       "logits must be float32 with 3 dimensions, got float64 with 3"),
    "input_ids int32": (lambda a: a.update(input_ids=a["input_ids"].astype(np.int32)), "input_ids must be int64"),
    "input_ids flat": (lambda a: a.update(input_ids=a["input_ids"].reshape(-1)),
                       "input_ids must be int64 with 2 dimensions, got int64 with 1"),
    "format_version list": (lambda a: a.update(format_version=np.array([1, 1])), "format_version must be int64 with 0"),
    "logits shape": (lambda a: a.update(logits=a["logits"][:, :, :100]), "inconsistent golden arrays"),
    "prefill beyond": (lambda a: a.update(prefill=np.int64(10_000)), "inconsistent golden arrays"),
    "id beyond vocabulary": (lambda a: _out_of_range(a, "input_ids", 999), "input_ids holds token ids outside"),
    "negative greedy id": (lambda a: _out_of_range(a, "greedy_tokens", -1), "greedy_tokens holds token ids outside"),
    "nan logits": (lambda a: _out_of_range(a, "logits", np.nan), "logits hold NaN or infinity"),
    "pickled array": (lambda a: a.update(logits=np.array([{"pickled": 1}], dtype=object)), "unreadable golden file"),
}


@pytest.mark.parametrize("damage", sorted(GOLDEN_DAMAGE))
def test_a_damaged_golden_file_is_one_line_and_exit_2(folder, tmp_path, damage):
    edit, message = GOLDEN_DAMAGE[damage]
    target = _copy(folder, tmp_path)
    _edit_golden(target, edit)
    assert_refused(run("validate", target, "--golden"), message)


def test_a_single_array_is_not_a_golden_file(folder, tmp_path):
    target = _copy(folder, tmp_path)
    with (target / "golden.npz").open("wb") as handle:
        np.save(handle, np.zeros(3))
    assert_refused(run("validate", target, "--golden"), "unreadable golden file (a single array")


# -- sha256 of every file: recorded by convert, checked by validate and generate --verify -------------------


def test_convert_records_the_sha256_of_every_file(folder):
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    names = sorted(path.name for path in folder.iterdir() if path.name != MANIFEST_NAME)
    assert sorted(manifest["sha256"]) == names and "model.onnx.data" in names
    for name in names:
        assert manifest["sha256"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_a_changed_file_fails_validate_and_generate_verify(folder, tmp_path):
    target = _copy(folder, tmp_path)
    data = bytearray((target / "model.onnx.data").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: still loads and runs
    (target / "model.onnx.data").write_bytes(bytes(data))
    message = "model.onnx.data does not match the sha256 in the manifest"
    assert run("generate", target, "hi", "--max-new-tokens", "2").exit_code == 0
    assert_refused(run("generate", target, "hi", "--max-new-tokens", "2", "--verify"), message)
    assert_refused(run("validate", target, "--golden"), message)
    assert_refused(run("validate", target, *GOLDEN_LENGTHS), message)


def test_a_folder_written_before_sha256_still_loads(folder, tmp_path):
    target = _copy(folder, tmp_path)
    _edit_manifest(target, lambda m: m.pop("sha256"))
    assert run("generate", target, "hi", "--max-new-tokens", "2").exit_code == 0
    assert run("validate", target, "--golden").exit_code == 0
    assert_refused(run("generate", target, "hi", "--verify"), "records no sha256 of its files")
    assert run("generate", folder, "hi", "--max-new-tokens", "2", "--verify").exit_code == 0


# -- a folder created at OUT while convert runs, --force onto what is not edgeattn's ------------------------


def test_convert_keeps_a_folder_created_at_out_while_it_runs(tmp_path, monkeypatch):
    import edgeattn.convert as convert_module

    out = tmp_path / "race"
    check_graph = convert_module.check_graph

    def someone_creates_out(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("mine")
        return check_graph(*args, **kwargs)

    monkeypatch.setattr(convert_module, "check_graph", someone_creates_out)
    result = run("convert", "tiny-llama", "-o", out, "--max-length", "32", "--json")
    assert_refused(result, "appeared while this run was writing it and was left as it is")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["race"]


@pytest.mark.parametrize("case", ["the model folder", "a parent of the model folder", "the working folder",
                                  "a parent of the working folder", "the home folder", "a folder of documents"])
def test_convert_force_deletes_nothing_that_is_not_edgeattns(hf_folder, tmp_path, monkeypatch, case):
    models_dir = tmp_path / "models"
    source = _copy(hf_folder, models_dir, "hf")
    work, home = tmp_path / "work", tmp_path / "home"
    for path in (work, home):
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    out, message = {
        "the model folder": (source, "holds the source model"),
        "a parent of the model folder": (models_dir, "holds the source model"),
        "the working folder": (".", "is the working folder or one of its parents"),
        "a parent of the working folder": ("..", "is the working folder or one of its parents"),
        "the home folder": (home, "is the home folder"),
        "a folder of documents": (tmp_path / "Documents", "is not an edgeattn output folder (no edgeattn.json)"),
    }[case]
    (tmp_path / "Documents").mkdir()
    (tmp_path / "Documents" / "thesis.txt").write_text("years")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert_refused(run("convert", source, "-o", out, "--force", "--json"), message)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
