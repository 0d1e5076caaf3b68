"""Property tests: whatever a user or a file gives, edgeattn answers with a result or one EdgeattnError
(exit 2 on the command line), never another exception, and writes nothing when it refuses.

Inputs are generated with hypothesis under the fixed-seed profile of conftest.py, so every run sees
the same few thousand cases. Nothing heavy runs: model loading is stubbed, ``generate`` drives one
tiny folder loaded once, and folders are damaged by rewriting only their manifest or golden file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import string
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeattn.cli import main
from edgeattn.errors import EdgeattnError
from edgeattn.spec import AttentionSpec, SpecError

EXIT_CODES = {0, 1, 2}  # ok, a numerics threshold failed, bad input (130 needs a Ctrl-C)
STUB = "stub: no model is loaded in property tests"

# -- values of every type ---------------------------------------------------------------------------

NAME = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=8)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
ANY_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 5000),
                       st.floats(allow_nan=True, allow_infinity=True), TEXT)
ANY_VALUE = st.recursive(ANY_SCALAR, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
SPEC_VALUES = {
    "kv_heads": st.one_of(st.none(), st.integers(-2, 64)), "gqa_method": st.sampled_from(["calibrated", "mean"]),
    "uptrain_steps": st.integers(-2, 10), "window": st.one_of(st.none(), st.integers(-2, 4096)),
    "sinks": st.integers(-2, 64), "block_size": st.one_of(st.none(), st.integers(-2, 512)),
    "top_blocks": st.one_of(st.none(), st.integers(-2, 64)),
    "block_mass": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    "kv_cache": st.sampled_from(["fp32", "fp16", "int8", "int4"]),
    "kv_quant": st.sampled_from(["per-channel", "per-token"]),
}


def spec_kwargs(wild: bool):
    """Spec fields, each either a plausible value or (``wild``) a value of any type."""
    values = {name: st.one_of(strategy, ANY_VALUE) if wild else strategy for name, strategy in SPEC_VALUES.items()}
    return st.fixed_dictionaries({}, optional=values)


# -- AttentionSpec --------------------------------------------------------------------------------

def _check_spec(kwargs: dict) -> AttentionSpec | None:
    try:
        spec = AttentionSpec(**kwargs)
    except SpecError:
        return None
    for name in ("kv_heads", "window", "block_size", "top_blocks"):
        value = getattr(spec, name)
        assert value is None or (type(value) is int and value >= 1), (name, value)
    assert type(spec.sinks) is int and spec.sinks >= 0 and type(spec.uptrain_steps) is int
    assert spec.block_mass is None or 0.0 < spec.block_mass <= 1.0
    assert spec.kv_bits in (4, 8, 16, 32)
    assert not spec.sinks or spec.window is not None or spec.block_size is not None
    assert AttentionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # the manifest round trip
    return spec


@settings(max_examples=1000)
@given(spec_kwargs(wild=False))
def test_spec_of_plausible_values_is_valid_or_one_spec_error(kwargs):
    _check_spec(kwargs)


@settings(max_examples=500)
@given(spec_kwargs(wild=True))
def test_spec_of_values_of_any_type_is_valid_or_one_spec_error(kwargs):
    _check_spec(kwargs)


@settings(max_examples=300)
@given(st.one_of(ANY_VALUE, st.dictionaries(st.one_of(st.sampled_from(list(SPEC_VALUES)), TEXT), ANY_VALUE,
                                            max_size=5)))
def test_spec_from_any_json_is_a_spec_or_one_spec_error(data):
    try:
        spec = AttentionSpec.from_dict(data)
    except SpecError:
        return
    assert isinstance(spec, AttentionSpec)


# -- recipes --------------------------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


def toml_document(tables: dict) -> str:
    lines = []
    for table, values in tables.items():
        if not isinstance(values, dict):
            lines.insert(0, f"{json.dumps(table)} = {toml_value(values)}")
            continue
        lines.append(f"[{json.dumps(table)}]")
        lines += [f"{json.dumps(key)} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


TOML_SCALAR = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.integers(-3, 5000),
                        st.floats(allow_nan=True, allow_infinity=True), TEXT,
                        st.sampled_from(["int4", "int3", "fp32", "ort", "auto", "cpu", "tpu", "mean", "per-token"]))
TOML_VALUE = st.recursive(TOML_SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(NAME, inner, max_size=2), max_leaves=4)
RECIPE_KEYS = sorted({*SPEC_VALUES, "weights", "weights_block_size", "block_size", "attention_op", "max_length",
                      "provider", "calibration_text", "max_kl", "min_top1", "max_ppl_delta", "steps", "prompts", "text"})
RECIPES = st.dictionaries(
    st.one_of(st.sampled_from(["spec", "convert", "validate"]), NAME),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from(RECIPE_KEYS), NAME), TOML_VALUE, max_size=4), TOML_SCALAR),
    max_size=3)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@settings(max_examples=300)
@given(RECIPES)
def test_any_recipe_is_read_or_refused_in_one_error_and_what_it_gives_is_typed(scratch, tables):
    """A recipe that reads is safe to hand on: its spec table makes a spec or a SpecError, its convert
    table passes convert's checks or fails them in one EdgeattnError."""
    from edgeattn.convert import ConvertOptions, _check_options
    from edgeattn.recipe import RecipeError, read_recipe

    path = scratch / "recipe.toml"
    path.write_text(toml_document(tables), encoding="utf-8")
    try:
        data = read_recipe(path)
    except RecipeError:
        return
    _check_spec(data.get("spec", {}))
    try:
        _check_options(ConvertOptions("tiny-llama", scratch / "out", **data.get("convert", {})))
    except EdgeattnError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_recipe_are_read_or_refused_in_one_error(scratch, raw):
    from edgeattn.recipe import RecipeError, read_recipe

    path = scratch / "bytes.toml"
    path.write_bytes(raw)
    try:
        read_recipe(path)
    except RecipeError:
        pass


# -- the command line: any options, one line and exit 2 or a result --------------------------------

INTEGER = st.one_of(st.integers(-3, 70000).map(str), st.integers(-2**70, 2**70).map(str),
                    st.sampled_from(["", "abc", "1.5", "nan", "0x10", " 3", "1e3"]))
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(-2, 2).map(str),
                  st.sampled_from(["nan", "inf", "-inf", "", "x", "1e999", "-0"]))
COUNTS = st.one_of(st.lists(st.integers(-5, 9000).map(str), max_size=4).map(",".join),
                   st.sampled_from([",", "", " , ", "128,,512", "a,b", "128;512"]))


def choice(*valid: str):
    return st.one_of(st.sampled_from(valid), st.sampled_from(["", "bogus", valid[0].upper()]))


SPEC_FLAGS = {"--kv-heads": INTEGER, "--gqa-method": choice("calibrated", "mean"), "--uptrain-steps": INTEGER,
              "--window": INTEGER, "--sinks": INTEGER, "--block-size": INTEGER, "--top-blocks": INTEGER,
              "--block-mass": FLOAT, "--kv-cache": choice("fp32", "fp16", "int8", "int4"),
              "--kv-quant": choice("per-channel", "per-token")}


def invocations(command: list[str], flags: dict, switches: tuple[str, ...] = ()):
    """``command`` with a random subset of ``flags`` (random values) and ``switches``."""
    def build(chosen, values, on):
        args = list(command)
        for flag, value in zip(chosen, values):
            args += [flag, value]
        return args + list(on)

    return st.lists(st.sampled_from(sorted(flags)), unique=True, max_size=6).flatmap(
        lambda chosen: st.tuples(st.just(chosen), st.tuples(*(flags[flag] for flag in chosen)),
                                 st.lists(st.sampled_from(switches), unique=True) if switches else st.just([]))
    ).map(lambda drawn: build(*drawn))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A working folder with what options may name: texts, recipes, a file where a folder is expected."""
    root = tmp_path_factory.mktemp("cli")
    (root / "text.txt").write_text("Plain calibration text for the property tests. " * 50, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (root / "a_file").write_text("not a folder\n")
    (root / "recipe.toml").write_text('[spec]\nkv_heads = 1\n[convert]\nweights = "int8"\n[validate]\nmax_kl = 0.1\n')
    (root / "bad_types.toml").write_text('[spec]\nwindow = true\n[convert]\nmax_length = "big"\n')
    (root / "golden_steps.toml").write_text("[validate]\nsteps = 8\n")
    (root / "existing").mkdir()
    return root


PATH = st.one_of(st.sampled_from(["text.txt", "latin1.txt", "a_file", "a_file/sub", "missing.txt", "existing",
                                  "new/deeper/out", "", ".", "-", "recipe.toml", "bad_types.toml",
                                  "golden_steps.toml"]), NAME)
REPORT = st.one_of(st.sampled_from(["a_file/r.json", "existing", "-", "", "new/r.json"]), NAME)


@contextmanager
def inside(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def assert_clean_exit(world: Path, args: list[str]):
    """Run ``args`` in ``world``: a documented exit code, no traceback, one error line, nothing new on disk."""
    before = sorted(path.name for path in world.iterdir())
    with inside(world):
        result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"edgeattn {' '.join(args)!r} raised {result.exception!r}") from result.exception
    assert result.exit_code in EXIT_CODES, (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
        event("options passed, the load was reached" if STUB in errors[0]
              else "refused: " + re.sub(r"-?\d+", "N", errors[0][7:40]))
    else:
        event(f"exit {result.exit_code}")
    assert sorted(path.name for path in world.iterdir()) == before, args
    return result


@contextmanager
def stubbed_loads():
    """Within ``with``: every model load ends in one EdgeattnError, so options are all that run."""
    import edgeattn.convert
    import edgeattn.evaluation.quality_report
    import edgeattn.evaluation.validate
    from edgeattn.runtimes import golden, profile

    def stub(*args, **kwargs):
        raise EdgeattnError(STUB)

    with pytest.MonkeyPatch.context() as patch:
        for module in (edgeattn.convert, edgeattn.evaluation.quality_report, edgeattn.evaluation.validate):
            patch.setattr(module, "load", stub)
        patch.setattr(edgeattn.evaluation.validate, "validate", stub)
        patch.setattr(golden, "validate_golden", stub)
        patch.setattr(profile, "profile", stub)
        yield


@settings(max_examples=400)
@given(st.tuples(PATH, invocations([], {
    **SPEC_FLAGS, "--weights": choice("fp32", "fp16", "int8", "int4"), "--weights-block-size": INTEGER,
    "--attention-op": choice("auto", "ort", "onnx", "edgeattn"), "--max-length": INTEGER,
    "--provider": choice("cpu", "cuda"), "--calibration-text": PATH, "--recipe": PATH}, ("--force", "--json"))))
def test_convert_options(world, drawn):
    output, options = drawn
    with stubbed_loads():
        assert_clean_exit(world, ["convert", "tiny-llama", "-o", output, *options])


@settings(max_examples=200)
@given(invocations(["quality", "tiny-llama"], {**SPEC_FLAGS, "--text": PATH, "--calibration-text": PATH,
                                                "--context": INTEGER, "--max-windows": INTEGER}, ("--json",)))
def test_quality_options(world, args):
    with stubbed_loads():
        assert_clean_exit(world, args)


THRESHOLD_FLAGS = {"--max-kl": FLOAT, "--min-top1": FLOAT, "--max-abs-error": FLOAT, "--max-ppl-delta": FLOAT,
                   "--min-kv-sqnr": FLOAT}


@settings(max_examples=300)
@given(st.tuples(PATH, invocations([], {
    **THRESHOLD_FLAGS, "--reference": NAME, "--provider": choice("cpu", "cuda"), "--text": PATH,
    "--calibration-text": PATH, "--prompts": INTEGER, "--prefill": INTEGER, "--steps": INTEGER,
    "--greedy-tokens": INTEGER, "--threads": INTEGER, "--recipe": PATH, "--json": REPORT, "--junit-xml": REPORT},
    ("--golden",))))
def test_validate_options(world, drawn):
    folder, options = drawn
    with stubbed_loads():
        assert_clean_exit(world, ["validate", folder, *options])


@settings(max_examples=300)
@given(st.tuples(PATH, invocations([], {
    "--provider": choice("cpu", "cuda"), "--threads": INTEGER, "--prompt-lengths": COUNTS, "--contexts": COUNTS,
    "--repeats": INTEGER, "--warmup": INTEGER, "--target": st.one_of(st.sampled_from(["pi5", "pixel8"]), NAME),
    "--max-length": INTEGER, "--json": REPORT, "--markdown": REPORT, "--plot": REPORT}, ("--ops", "--quiet"))))
def test_profile_options(world, drawn):
    folder, options = drawn
    with stubbed_loads():
        assert_clean_exit(world, ["profile", folder, *options])


@pytest.fixture(scope="module")
def tiny(converted) -> Path:
    """One tiny folder (a cache of 32 tokens), converted once per session."""
    return converted("tiny-llama", max_length=32)[0]


@pytest.fixture(scope="module")
def loaded_once(tiny):
    """generate on the tiny folder reuses one loaded session (loading is what the other tests cover)."""
    from edgeattn.runtimes.session import EdgeLM

    lm = EdgeLM.load(tiny)
    real_load = EdgeLM.load.__func__
    patch = pytest.MonkeyPatch()
    patch.setattr(EdgeLM, "load", classmethod(
        lambda cls, folder, *args, **kwargs: lm if Path(folder) == tiny else real_load(cls, folder, *args, **kwargs)))
    yield
    patch.undo()


@settings(max_examples=250)
@given(st.tuples(st.sampled_from(["tiny"] * 4 + ["missing", "a_file"]),
                 st.one_of(st.sampled_from(["hello", "The capital of"]), TEXT),
                 invocations([], {"--max-new-tokens": st.one_of(st.integers(1, 40).map(str), INTEGER),
                                  "--provider": choice("cpu", "cuda"), "--threads": INTEGER,
                                  "--temperature": st.one_of(st.floats(0, 3).map(str), FLOAT),
                                  "--top-k": st.one_of(st.integers(0, 300).map(str), INTEGER),
                                  "--top-p": st.one_of(st.floats(0, 1).map(str), FLOAT),
                                  "--seed": st.one_of(st.integers(0, 2**64).map(str), INTEGER)},
                             ("--chat", "--json"))))
def test_generate_options(world, tiny, loaded_once, drawn):
    which, prompt, options = drawn
    from edgeattn.runtimes.generate import STOPS

    result = assert_clean_exit(world, ["generate", str(tiny) if which == "tiny" else which, prompt, *options])
    if result.exit_code == 0 and "--json" in options:
        assert json.loads(result.stdout)["stop"] in STOPS


# -- folders: any manifest, any golden file -------------------------------------------------------

def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _mutated(manifest: dict, mutations) -> dict:
    damaged = json.loads(json.dumps(manifest))
    for path, action, value in mutations:
        if not path:
            damaged = value if action == "replace" else {}
            continue
        parent = damaged
        try:
            for key in path[:-1]:
                parent = parent[key]
            if action == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path
    return damaged


FOLDER_VALUES = st.one_of(ANY_VALUE, st.sampled_from([
    "../outside/model.onnx", "/etc/hostname", "model.onnx", "tokenizer.json", "golden.npz", "", ".", "..",
    -1, 0, 2**40, 1.5, True, [1, 2], {"a": 1}, "int3", "float16", [1, 4, 2**31, 16]]))


def manifest_mutations(manifest: dict):
    paths = sorted(set(_paths(manifest)), key=str)
    return st.lists(st.tuples(st.sampled_from(paths), st.sampled_from(["delete", "replace"]), FOLDER_VALUES),
                    min_size=1, max_size=3)


@pytest.fixture(scope="module")
def damaged_copy(tiny, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("damaged") / "tiny"
    shutil.copytree(tiny, target)
    return target


def _manifest_of(folder: Path) -> dict:
    return json.loads((folder / "edgeattn.json").read_text())


def test_the_undamaged_copy_loads(damaged_copy):
    from edgeattn.runtimes.session import EdgeLM

    assert EdgeLM.load(damaged_copy).manifest.model.vocab_size > 0  # the baseline the mutations depart from


@pytest.fixture(scope="module")
def original_manifest(tiny) -> dict:
    return _manifest_of(tiny)


@pytest.fixture(scope="module")
def unhashed_manifest(original_manifest) -> dict:
    """Without the files' sha256, so that a golden file written here is judged on its arrays."""
    return {key: value for key, value in original_manifest.items() if key != "sha256"}


@settings(max_examples=300)
@given(st.data())
def test_any_damaged_manifest_is_read_or_refused_in_one_error(damaged_copy, original_manifest, data):
    from edgeattn.runtimes.manifest import read_manifest

    damaged = _mutated(original_manifest, data.draw(manifest_mutations(original_manifest)))
    (damaged_copy / "edgeattn.json").write_text(json.dumps(damaged))
    try:
        read_manifest(damaged_copy)
    except EdgeattnError:
        pass


@settings(max_examples=60)
@given(st.data())
def test_any_damaged_manifest_loads_and_runs_a_token_or_is_refused(damaged_copy, original_manifest, data):
    from edgeattn.runtimes.session import EdgeLM

    damaged = _mutated(original_manifest, data.draw(manifest_mutations(original_manifest)))
    (damaged_copy / "edgeattn.json").write_text(json.dumps(damaged))
    try:
        lm = EdgeLM.load(damaged_copy)
        lm.forward(np.array([lm.encode("hello")]))
        event("loaded and ran")
    except EdgeattnError:
        event("refused")


@settings(max_examples=150)
@given(st.one_of(st.binary(max_size=300), TEXT.map(str.encode)))
def test_any_bytes_as_a_manifest_are_refused_in_one_error(damaged_copy, raw):
    from edgeattn.runtimes.manifest import read_manifest

    (damaged_copy / "edgeattn.json").write_bytes(raw)
    try:
        read_manifest(damaged_copy)
    except EdgeattnError:
        pass


GOLDEN_KEYS = ("format_version", "input_ids", "prefill", "logits", "greedy_tokens")
DTYPES = st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.float64, np.float16, np.bool_])


def random_array():
    return DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)))


def golden_damage(real: dict):
    """The real golden arrays with some replaced by random ones, some values pushed out of range, or gone."""
    def damage(choices):
        arrays = dict(real)
        for key, action, array, position in choices:
            if action == "delete":
                arrays.pop(key, None)
            elif action == "replace":
                arrays[key] = array
            elif key in arrays and arrays[key].size:
                changed = arrays[key].copy()
                flat = changed.reshape(-1)
                flat[position % flat.size] = {"input_ids": 10**6, "greedy_tokens": -1, "prefill": 10**6,
                                              "format_version": 99}.get(key, np.nan)
                arrays[key] = changed
        return arrays

    return st.lists(st.tuples(st.sampled_from([*GOLDEN_KEYS, "extra"]), st.sampled_from(["delete", "replace", "poke"]),
                              random_array(), st.integers(0, 10**6)), min_size=1, max_size=3).map(damage)


@pytest.fixture(scope="module")
def golden_arrays(tiny) -> dict:
    with np.load(tiny / "golden.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@settings(max_examples=250)
@given(st.data())
def test_any_damaged_golden_file_is_read_or_refused_in_one_error(damaged_copy, unhashed_manifest, golden_arrays, data):
    from edgeattn.runtimes.golden import read_golden
    from edgeattn.runtimes.manifest import Manifest

    (damaged_copy / "edgeattn.json").write_text(json.dumps(unhashed_manifest))
    np.savez(damaged_copy / "golden.npz", **data.draw(golden_damage(golden_arrays)))
    try:
        read_golden(damaged_copy, Manifest.from_dict(unhashed_manifest))
    except EdgeattnError:
        pass


@settings(max_examples=100)
@given(st.binary(max_size=400))
def test_any_bytes_as_a_golden_file_are_refused_in_one_error(damaged_copy, unhashed_manifest, raw):
    from edgeattn.runtimes.golden import read_golden
    from edgeattn.runtimes.manifest import Manifest

    (damaged_copy / "edgeattn.json").write_text(json.dumps(unhashed_manifest))
    (damaged_copy / "golden.npz").write_bytes(raw)
    with pytest.raises(EdgeattnError):
        read_golden(damaged_copy, Manifest.from_dict(unhashed_manifest))


@settings(max_examples=25)
@given(st.data())
def test_validate_golden_on_a_damaged_golden_file_exits_0_1_or_2(damaged_copy, unhashed_manifest, golden_arrays,
                                                                  world, data):
    (damaged_copy / "edgeattn.json").write_text(json.dumps(unhashed_manifest))
    np.savez(damaged_copy / "golden.npz", **data.draw(golden_damage(golden_arrays)))
    assert_clean_exit(world, ["validate", str(damaged_copy), "--golden"])
