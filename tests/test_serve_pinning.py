"""CPU pinning for `asyncbatch serve` (`engine.serve.cpu_pinning`): the plan, the YAML spelling, and a real engine
process whose step loop, receiver thread and other threads end up where the plan says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch import EngineConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.serve.pinning import MIN_CPUS, CpuPlan, parse_cpu_list, plan_cpus

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched_setaffinity per thread is Linux's")


def test_the_kernel_cpu_list_format_is_read():
    assert frozenset({3, 11}) == parse_cpu_list("3,11\n")
    assert frozenset({0, 1, 2, 3, 8, 9}) == parse_cpu_list("0-3,8-9")
    assert frozenset({5}) == parse_cpu_list("5")


@st.composite
def machines(draw):
    """A machine of `cores` cores with 1 or 2 hardware threads each (Linux numbers the second threads after all
    the first ones), and the CPUs of it that a process may use."""
    cores = draw(st.integers(1, 12))
    smt = draw(st.sampled_from([1, 2]))
    siblings = {}
    for c in range(cores):
        core = frozenset(c + k * cores for k in range(smt))
        siblings.update({cpu: core for cpu in core})
    allowed = frozenset(draw(st.sets(st.sampled_from(sorted(siblings)), min_size=1)))
    return allowed, siblings


@given(machines())
def test_a_plan_gives_the_loop_a_whole_core_and_everything_else_the_rest(machine):
    allowed, siblings = machine
    plan = plan_cpus(allowed, siblings)
    if isinstance(plan, str):  # no plan: too few CPUs, said so
        assert len(allowed) < MIN_CPUS or len(allowed - siblings[max(allowed)]) < 2
        assert "CPU" in plan
        return
    assert allowed == plan.loop | plan.rest
    assert frozenset() == plan.loop & plan.rest
    assert siblings[max(allowed)] & allowed == plan.loop  # every allowed hardware thread of one core
    assert all(siblings[c] & plan.loop == frozenset() for c in plan.rest)  # nothing else shares the loop's core
    assert len(plan.rest) >= 2


def test_a_small_machine_gets_no_plan_and_a_reason():
    assert "only 2 CPUs allowed (pinning needs at least 4)" == plan_cpus(frozenset({0, 1}), {0: {0}, 1: {1}})


def test_yaml_off_is_the_word_off_and_on_is_refused_with_the_reason():
    # YAML 1.1 (PyYAML) reads a bare `off` as false and `on` as true.
    assert "off" == EngineConfig.from_dict({"serve": {"cpu_pinning": False}}).serve.cpu_pinning
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"serve": {"cpu_pinning": True}})
    assert "engine.serve.cpu_pinning" in str(info.value) or "serve.cpu_pinning" in str(info.value)
    assert "quote the word" in str(info.value) and "auto" in str(info.value)


SERVE_PINNED = textwrap.dedent("""
    import asyncio, json, logging, multiprocessing, os, sys, threading
    from asyncbatch import Engine, EngineConfig, SamplingParams
    from asyncbatch.core.intake import Intake
    from asyncbatch.serve.engine_core import EngineCore
    from asyncbatch.serve.live import served_model
    from asyncbatch.serve.pinning import CpuPlan
    from asyncbatch.serve.remote import RemoteEngine

    logging.basicConfig(level=logging.INFO)
    loop_cpus, rest_cpus = json.loads(sys.argv[1])
    plan = CpuPlan(loop=frozenset(loop_cpus), rest=frozenset(rest_cpus))
    engine = Engine.from_config(EngineConfig.from_dict({"runtime": "cpu", "model": {"preset": "tiny"}}))
    ours, theirs = multiprocessing.Pipe(duplex=True)
    core = EngineCore(engine, ours, cpus=plan)
    seen = {}

    def serve():
        seen["loop_tid"] = threading.get_native_id()
        core.serve()

    def affinities():
        return {int(t): (sorted(os.sched_getaffinity(int(t))), open(f"/proc/self/task/{t}/comm").read().strip())
                for t in os.listdir("/proc/self/task")}

    async def main():
        remote = RemoteEngine(theirs, ring_name=core.ring.name, served=served_model(engine),
                              intake=Intake(**engine.intake.settings()), max_waiting=8, shutdown_timeout_s=5.0)
        thread = threading.Thread(target=serve)
        thread.start()
        await remote.start()
        stream = remote.add_request([1, 2, 3], SamplingParams(max_new_tokens=16))
        tokens = [ev.token_id async for ev in stream]
        seen["affinities"] = affinities()
        seen["receiver"] = [t.native_id for t in threading.enumerate() if t.name.endswith("receiver")]
        seen["tokens"] = len(tokens)
        await remote.shutdown()
        await asyncio.to_thread(thread.join, 30)
        core.ring.close(unlink=True)

    asyncio.run(main())
    print(json.dumps(seen))
""")


@linux_only
def test_the_step_loop_gets_its_core_and_every_other_thread_the_rest():
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    plan = CpuPlan(loop=frozenset(allowed[-1:]), rest=frozenset(allowed[:-1]))
    done = subprocess.run([sys.executable, "-c", SERVE_PINNED, json.dumps([sorted(plan.loop), sorted(plan.rest)])],
                          capture_output=True, text=True, timeout=120)
    assert 0 == done.returncode, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    affinities = {int(k): v[0] for k, v in seen["affinities"].items()}
    names = {int(k): v[1] for k, v in seen["affinities"].items()}
    assert 16 == seen["tokens"]
    assert sorted(plan.loop) == affinities[seen["loop_tid"]]
    assert [sorted(plan.rest)] == [affinities[t] for t in seen["receiver"]]
    others = {t: cpus for t, cpus in affinities.items() if t != seen["loop_tid"]}
    assert others and all(sorted(plan.rest) == cpus for cpus in others.values()), sorted((t, c, names[t]) for t, c in others.items())
    assert "CPU pinning: the step loop on CPU" in done.stderr
