"""Start-up warm-up: a warmed engine captures nothing during a run, the shapes it warms cover every shape a run
produces, warm-up does not change tokens, and its time is reported apart from the run's."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import engine_dict, geometries, workloads

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core import startup
from asyncbatch.core.runtime.sim import SimRuntime, SimRuntimeConfig
from asyncbatch.core.shapes import StepShapes

STATIC_SDPA = {"name": "sdpa", "static_shapes": True}
PROMPTS = [[(7 * i + j) % 500 for j in range(3 + 5 * i)] for i in range(9)]
PARAMS = [SamplingParams(max_new_tokens=6 + i % 4, temperature=(0.0, 0.8, 0.9)[i % 3], top_k=(0, 0, 20)[i % 3],
                         seed=i) for i in range(9)]


def _engine(model, graphs, warmup="always", attention=STATIC_SDPA, **geometry):
    cfg = engine_dict("double", "three", graphs, "fifo", **{"max_tokens": 24, "max_seqs": 4, "num_blocks": 80,
                                                            "block_size": 4, **geometry})
    cfg = {**cfg, "attention": attention, "startup": {"warmup": warmup}}
    return Engine.from_model(model, EngineConfig.from_dict(cfg), runtime=SimRuntime(SimRuntimeConfig(seed=3)))


@pytest.mark.parametrize("graphs", ["per_slot", "staged", "mixed"])
def test_a_warmed_engine_captures_nothing_during_a_run(tiny64, graphs):
    """Every step of the run replays a graph captured before the clock started; sampling paths the build did not
    warm up (here `sample` and `filter`) are warmed before the run's clock, and reported as its start-up."""
    engine = _engine(tiny64, graphs)
    built = engine.graphs.captures

    result = engine.run(engine.make_requests(PROMPTS, PARAMS))
    after_prewarm = engine.graphs.captures

    assert built > 0 and after_prewarm > built
    assert [True] * len(result.steps) == [s.graph_replay for s in result.steps]
    assert any(s.num_tokens > s.num_seqs for s in result.steps)  # steps holding prefill chunks replayed too
    assert result.summary.startup_s > 0
    engine.run(engine.make_requests(PROMPTS, PARAMS))
    assert after_prewarm == engine.graphs.captures
    assert 0.0 == engine.last_result.summary.startup_s  # nothing left to warm, nothing to report


def test_without_warmup_the_run_captures_and_tokens_do_not_change(tiny64):
    """The contrast: left to the run, first occurrences of shapes capture inside it. Warm-up runs padding only
    (trash block and row), so both engines give the same tokens."""
    cold = _engine(tiny64, "mixed", warmup="never")
    warm = _engine(tiny64, "mixed")

    cold_out = cold.generate(PROMPTS, PARAMS)
    warm_out = warm.generate(PROMPTS, PARAMS)

    assert 0 < cold.graphs.captures
    assert not all(s.graph_replay for s in cold.last_result.steps)
    assert [o.token_ids for o in cold_out] == [o.token_ids for o in warm_out]


def test_mixed_steps_run_eagerly_where_the_backend_bakes_lengths(tiny64):
    """With the plain reference backend the launch depends on query and context lengths: the `mixed` policy
    keeps decode graphs and runs steps holding prefill chunks eagerly, never capturing them in a run."""
    engine = _engine(tiny64, "mixed", attention="sdpa")
    built = engine.graphs.captures

    result = engine.run(engine.make_requests(PROMPTS, [SamplingParams(max_new_tokens=6)] * len(PROMPTS)))

    assert built == engine.graphs.captures
    assert [s.num_tokens == s.num_seqs for s in result.steps] == [s.graph_replay for s in result.steps]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(work=workloads(max_requests=8, max_prompt=30), geometry=geometries,
       attention=st.sampled_from([STATIC_SDPA, "sdpa"]))
def test_step_shapes_list_every_shape_a_run_produces(tiny64, work, geometry, attention):
    """`StepShapes.enumerate` (`Pipeline.step_shapes`) is what warm-up captures: every shape a run's steps take
    is in it (decode shapes always; shapes of steps holding prefill chunks where the backend's launch is static)."""
    engine = _engine(tiny64, "eager", warmup="never", attention=attention, **geometry)
    seen = []
    original = StepShapes.of

    def spy(self, entries):
        shape = original(self, entries)
        seen.append(shape)
        return shape

    StepShapes.of = spy
    try:
        engine.generate([p for p, _ in work], [s for _, s in work])
    finally:
        StepShapes.of = original
    shapes, complete = engine.pipeline.step_shapes(startup.MODES)
    listed = set(shapes)

    assert (attention == STATIC_SDPA) == complete
    assert [] == [s for s in seen if (s.is_decode or complete) and s not in listed]


def test_compile_cache_goes_to_the_configured_directory(tmp_path, monkeypatch):
    """A directory the user did not choose is replaced by the configured one; one the user chose wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes on first use
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert tmp_path / "c" == startup.use_compile_cache(str(tmp_path / "c"))
    assert str(tmp_path / "c") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert str(tmp_path / "c" / "triton") == os.environ["TRITON_CACHE_DIR"]

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert tmp_path / "mine" == startup.use_compile_cache(str(tmp_path / "other"))
    assert str(tmp_path / "mine") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert startup.use_compile_cache(None) is None
