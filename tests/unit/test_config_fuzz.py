"""Property-based fuzzing of the CLI's config loading and ``--set`` (issue 16, section 3).

Random ``--set`` items (known and unknown dotted names, list indices, values of every YAML type:
whole and fractional numbers, sizes with units, ``.inf``/``.nan``, text, nested lists and
mappings) on top of the tiny example, and random YAML documents, go through ``memtrain plan
--quiet`` in this process. Each must end in exit 0 or 2 within the deadline, with no traceback:
an exception other than a user error fails the example, and an exit 2 prints one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memtrain.models.gpt import GPTConfig
from memtrain.runtime.cli import main
from memtrain.runtime.config_docs import field_docs

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny-cpu.yaml"

FIELDS = [dotted.replace("[]", "[0]") for dotted, *_ in field_docs()]
GPT_FIELDS = [f"model.overrides.{f.name}" for f in dataclasses.fields(GPTConfig)]
SECTIONS = ["model", "data", "train", "train.optimizer", "cluster", "cluster.nodes[0]", "cluster.nodes[0].devices[0]",
            "cluster.nodes[0].nvme", "memory", "snapshot", "model.overrides", "model.hf_config"]
NAMES = sorted({d.split(".")[-1].split("[")[0] for d in FIELDS + GPT_FIELDS + SECTIONS})

SETTINGS = settings(
    max_examples=150, deadline=timedelta(seconds=10), database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
# Whole numbers: small, around the global batch bound (2**20), and huge. Mid-range values are valid
# configs (a model of 200 layers, a batch of 720720 with its 240 divisors) whose planning takes
# seconds of search, which is the planner's speed, not the checking of input that this file tests.
whole = st.one_of(st.integers(-8, 16), st.integers(2**20 - 2, 2**20 + 2), st.integers(10**7, 2**70),
                  st.integers(-(2**70), -(10**7)))
numbers = st.one_of(
    whole.map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "2", "8", "-1", "1.5", "2.0", "2.9", "1e-3", "1E+4", "+2.5e+3", "3.0e-4", ".5",
                     ".inf", "-.inf", ".nan", "1e999", "-0.0", "0x10", "0o17", "1_000", "12:30", "1e12"]),
)
sizes = st.builds(
    lambda n, unit: f"{n}{unit}",
    st.one_of(st.integers(-5, 10**7), st.floats(0, 1e7, allow_nan=False).map(lambda x: f"{x:g}"), st.sampled_from([".inf", "nan", "1e400"])),
    st.sampled_from(["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "GB", "k", "x", " GiB", "gib"]),
)
words = st.one_of(
    st.sampled_from(["true", "false", "no", "yes", "null", "~", "", "auto", "gpt", "hf", "python", "tiny", "100m",
                     "bf16", "fp16", "fp32", "int8", "adamw", "sgd", "cosine", "cpu", "rtx4090", "h100-sxm",
                     "synthetic", "tokens", "rotary", "swiglu", "os:getcwd", "a:b", "/tmp", "&a [1, *a]", "*nope"]),
    st.text(max_size=20),
)
scalars = st.one_of(numbers, sizes, words)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), identifiers), inner), max_size=4)
        .map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
    ),
    max_leaves=8,
)
keys = st.one_of(
    st.sampled_from(FIELDS + GPT_FIELDS),
    st.sampled_from(SECTIONS),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(SECTIONS), identifiers),  # unknown fields
    st.builds(lambda a, i, b: f"{a}[{i}].{b}", st.sampled_from(["cluster.nodes", "cluster.nodes[0].devices", "train"]),
              st.integers(0, 3), st.sampled_from(NAMES)),
    st.text(max_size=20),
)
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, values), min_size=1, max_size=4)


def _plan(config: Path, run_dir: Path, sets: list[str]) -> tuple[int, str]:
    """``memtrain plan CONFIG --quiet --set ...`` in this process: (exit status, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    args = ["plan", str(config), "--quiet", f"--set=run_dir={run_dir}", *(f"--set={s}" for s in sets)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse refusing the command line itself
            rc = e.code
    return rc, err.getvalue()


def _check(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("memtrain: error: "), err
        assert len(err) < 2000, err  # a message quotes a user's value, never the whole of it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory for every example; planning once here first makes the deadline measure a
    plan, not the first import of torch."""
    path = tmp_path_factory.mktemp("fuzz")
    assert _plan(TINY, path, [])[0] == 0
    return path


@SETTINGS
@given(sets=overrides)
def test_fuzz_set_overrides(run_dir, sets):
    _check(*_plan(TINY, run_dir, sets))


leaves = st.one_of(
    st.none(), st.booleans(), whole, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16), sizes, st.sampled_from(["tiny", "cpu", "adamw", "bf16", "auto", "1e-3", "64GiB"]),
)
documents = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(NAMES), identifiers, st.integers(-3, 3)), inner, max_size=5),
    ),
    max_leaves=30,
)
tops = st.dictionaries(st.sampled_from(["name", "model", "data", "train", "cluster", "memory", "snapshot", "run_dir", "extra"]),
                       documents, max_size=6)
texts = st.one_of(
    tops.map(lambda d: yaml.safe_dump(d, sort_keys=False)),
    documents.map(lambda d: yaml.safe_dump(d)),
    # YAML-level mistakes: a repeated section, an alias, anything at all
    tops.map(lambda d: yaml.safe_dump(d, sort_keys=False) + "train: {steps: 3}\ntrain: {steps: 4}\n"),
    tops.map(lambda d: "base: &b {steps: 2}\n" + yaml.safe_dump(d, sort_keys=False) + "extra: [*b, *b]\n"),
    st.text(max_size=200),
)


@SETTINGS
@given(text=texts)
def test_fuzz_config_documents(run_dir, text):
    config = run_dir / "fuzz.yaml"
    config.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(*_plan(config, run_dir, []))
