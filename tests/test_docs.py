"""The manual's generated pages (bench.docs_reference) and its worked example method (docs/examples/)."""

import importlib.util
from pathlib import Path

import pytest

from bench import config_reference, docs_reference
from bench.config import SweepConfig
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented_from_the_code():
    assert config_reference.undocumented_keys() == []
    keys = {k.key for k in config_reference.config_keys()}
    for name, section in SweepConfig.SECTIONS.items():
        assert {f"{name}.{k}" for k in section.yaml_keys()} <= keys
    page = docs_reference.config_page()
    for k in config_reference.config_keys():  # the page shows each key with the description the CLI prints
        assert f"| `{k.key}` |" in page and config_reference.md_cell(k.help) in page, k.key
    assert "`ray.execution`" in page and "`train.gpus_per_worker`" in page and "`fit.from`" in page


def test_field_comments_join_the_lines_above_and_beside_a_field():
    class Example:
        plain: int = 1
        # first line
        # second line
        above: int = 2
        beside: str = "a # b"  # the comment, not the string's hash

        def method(self):
            plain: int = 3  # inside a method: not a field's comment
            return plain

    comments = config_reference.field_comments(Example)
    assert comments == {"above": "first line second line", "beside": "the comment, not the string's hash"}


def test_markdown_cells_show_angle_brackets_and_pipes_outside_code():
    assert config_reference.md_cell("a <run>/x | b `<c> | d`") == "a &lt;run>/x \\| b `<c> | d`"
    assert config_reference.md_cell("x <= 1") == "x <= 1"


def test_generated_pages_cover_every_method_sweep_and_dataset():
    pages = docs_reference.pages(ROOT)
    for name in METHODS.names():
        page = pages[f"methods/{name}.md"]
        assert "## Parameters" in page and f"Method version {METHODS.get(name).version}" in page
        for param in METHODS.get(name).params:
            assert f"| `{param}` |" in page
    assert "| paper | released code | option | default |" in pages["methods/iseg.md"]  # methods/README.md's table
    for sweep in (ROOT / "sweeps").glob("*.yaml"):
        assert f"`{sweep.name}`" in pages["reference/sweeps.md"]
    assert "| `shapes_many` |" in pages["reference/datasets.md"]


def test_reference_cli_writes_the_pages(tmp_path):
    assert docs_reference.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "reference" / "config.md").read_text() == docs_reference.config_page()


@pytest.fixture
def example_method():
    """docs/examples/cross_threshold.py registered for the test, unregistered after."""
    spec = importlib.util.spec_from_file_location("cross_threshold_example",
                                                  ROOT / "docs" / "examples" / "cross_threshold.py")
    module = importlib.util.module_from_spec(spec)
    METHODS.names()  # discover the shipped methods first
    spec.loader.exec_module(module)
    try:
        yield METHODS.get("cross_threshold")
    finally:
        METHODS._entries.pop("cross_threshold", None)


def test_worked_example_method_predicts_on_a_trace(tiny, example_method):
    from bench.data import build_dataset
    from bench.evaluate import trace_samples

    method = example_method(tiny)
    dataset = build_dataset({"name": "shapes", "size": 32, "limit": 2})
    for threshold in (0.2, 0.9):
        cfg = method.resolve({"threshold": threshold})
        batch = trace_samples(method, dataset, [dataset[0]], cfg, 0, method.trace_request(cfg))
        query, trace = batch.queries[0], batch.traces[0]
        pred = method.predict(trace, query, cfg, (32, 32))
        assert pred.scores.shape[0] == len(query.ids) and tuple(pred.labels.shape) == (32, 32)
        assert 0.0 <= float(pred.scores.min()) and float(pred.scores.max()) <= 1.0
        assert set(pred.labels.unique().tolist()) <= {0, *query.ids}
    assert "threshold" in method.keys_of("post") and "template" in method.keys_of("forward")
