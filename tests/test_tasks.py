"""The Prefect task layer without a server: retry rule, cache key, injected failure."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

from longrecipe.artifacts import StageSpec
from longrecipe.errors import InputError
from tasks.common import (
    FAIL_ONCE_ENV,
    InjectedFailure,
    maybe_fail,
    results_dir,
    retry_unless_bad_input,
    stage_cache_key,
)


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self, raise_on_failure=True):
        raise self.exc


@pytest.mark.parametrize("exc,retry", [
    (InputError("bad row"), False),
    (InjectedFailure("test"), False),
    (OSError("disk hiccup"), True),
    (RuntimeError("out of memory"), True),
])
def test_retry_only_errors_that_can_pass(exc, retry):
    assert retry_unless_bad_input(None, None, _State(exc)) is retry


def test_cache_key_is_the_stage_key_and_a_corrupt_artifact_drops_the_record(store):
    spec = StageSpec("demo", "demo_v1", {"a": 1}, {})
    key_fn = stage_cache_key(lambda s, p: spec)
    params = {"store": store.root}
    record = results_dir(store.root) / f"demo-{spec.key}"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    # no artifact yet: same key, but the stale record is removed so Prefect misses
    assert key_fn(SimpleNamespace(), params) == f"demo-{spec.key}" and not record.exists()
    ref = store.produce(spec, lambda w: w.write_table("t", pa.table({"x": [1, 2, 3]})))
    record.write_text("{}")
    assert key_fn(SimpleNamespace(), params) == f"demo-{spec.key}" and record.exists()
    part = ref.path / "t" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[-20] ^= 1
    part.write_bytes(bytes(data))
    key_fn(SimpleNamespace(), params)
    assert not record.exists()


def test_fail_once_raises_exactly_once(store, monkeypatch):
    monkeypatch.setenv(FAIL_ONCE_ENV, "train")
    maybe_fail("ingest", store.root)  # other stages untouched
    with pytest.raises(InjectedFailure):
        maybe_fail("train", store.root)
    maybe_fail("train", store.root)  # second time passes


@pytest.mark.parametrize("entry", ["flows.pipeline:pipeline", "flows.compare:compare",
                                   "flows.evaluate:evaluate_models"])
def test_flow_parameters_are_described_and_hold_no_test_hook(entry):
    """What Prefect's Custom Run form shows: a description for every parameter (from the
    flow's docstring), and no testing aid among them."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = entry.split(":")
    flow = getattr(importlib.import_module(module), name)
    props = parameter_schema(flow.fn).model_dump_for_openapi()["properties"]
    assert "config" in props and "fail_once_at" not in props
    for param, schema in props.items():
        assert len(schema.get("description", "")) > 10, f"{entry}: {param} has no description"
