"""Kills at named moments (maxscale/train/faults.py, maxscale/tools/chaos_moments.py; docs/reliability.md section 7).

One chain per model (configs/tiny.py and configs/moe_tiny.py): seven real SIGKILLs, at a local-tier save, a persistent
save, a step, start-up, a local save again, eval and the final save, each delivered by the trainer's own fault point;
then an attempt without a fault finishes. Each kill must land (its line printed, the process dead by SIGKILL), the next
attempt must resume from the newest committed checkpoint, which the save ordering fixes (0, 3, 3, 3, 4, 4, 9), and
every record and the final state must equal the uninterrupted run's bit for bit.
"""

import os
import signal

import pytest
from conftest import ROOT, xla_flags

from maxscale import errors
from maxscale.tools import chaos, chaos_moments
from maxscale.train import faults

MODELS = {"dense": "tiny.py", "moe": "moe_tiny.py"}
MOMENTS = chaos_moments.ALL_MOMENTS.split("+")


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """{model: the chain's Round}, each run once, on first use, with one CPU device (and the run's compile cache)."""
    results = {}

    def get(model: str) -> chaos_moments.Round:
        if model not in results:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("XLA_FLAGS", xla_flags(1))
                mp.delenv(faults.FAULT_ENV, raising=False)
                args = [f"--config={os.path.join(ROOT, 'configs', MODELS[model])}", *chaos_moments.MOMENT_OVERRIDES]
                workdir = str(tmp_path_factory.mktemp(f"moments-{model}"))
                (results[model],) = chaos_moments.run_moments(
                    args, [chaos_moments.ALL_MOMENTS], workdir, log=lambda line: None
                )
        return results[model]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("i", range(len(MOMENTS)), ids=[f"{i}-{m}" for i, m in enumerate(MOMENTS)])
def test_kill_at_a_named_moment_lands_and_resumes_from_the_last_checkpoint(chains, model, i):
    kill = chains(model).kills[i]
    assert kill.spec == MOMENTS[i]
    assert kill.landed and kill.exit == -signal.SIGKILL, kill.line()
    assert kill.committed == chaos_moments.RESUME_STEPS[i], kill.line()  # the save in flight never committed
    assert kill.resumed == kill.committed, kill.line()
    assert kill.records >= max(kill.committed, 1) and kill.mismatched == 0, kill.line()  # incl. steps past it


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_a_chain_of_kills_ends_bitwise_equal_to_the_uninterrupted_run(chains, model):
    r = chains(model)
    assert [k.spec for k in r.kills] == MOMENTS
    assert r.final_exit == 0 and r.failures == [], r.line()
    assert r.records == 14 and r.divergences == 0 and r.state_identical, r.line()  # 12 steps + 2 evals
    assert r.line().endswith("divergences=0 final state identical failures=0")
    # the save kills landed while orbax was writing: the step they interrupted left its uncommitted tmp directory
    # (orbax creates it in its own thread, so this is asserted for the chain, not for each kill)
    assert any(k.tmp_left for k in r.kills if k.spec.endswith("_save")), [k.line() for k in r.kills]


def test_a_fault_point_fires_at_its_nth_hit_only(monkeypatch, capfd):
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        monkeypatch.setattr(faults, "_hits", {})
        monkeypatch.setenv(faults.FAULT_ENV, "eval@2:usr1")
        faults.point("step")  # another point: never counted, never fires
        faults.point("eval")
        assert got == []
        faults.point("eval")
        assert got == [signal.SIGUSR1]
        faults.point("eval")  # the third hit: nothing
        assert got == [signal.SIGUSR1]
        assert capfd.readouterr().err == "maxscale.train: fault point eval hit 2: killing with SIGUSR1\n"
        monkeypatch.delenv(faults.FAULT_ENV)
        faults.point("eval")
        assert got == [signal.SIGUSR1] and faults._hits == {"eval": 3}
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("spec", ["bogus", "step@0", "step@x", "eval:SIGNOPE", "@2"])
def test_malformed_fault_specs_are_one_line_config_errors(spec, monkeypatch, capsys, tmp_path):
    with pytest.raises(errors.ConfigError, match=f"MAXSCALE_FAULT={spec!r}: expected <point>"):
        faults.parse_fault(spec)
    rc = chaos.main([f"--config={ROOT}/configs/tiny.py", f"--moments=step+{spec}", f"--workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_USAGE == 2 and err.count("\n") == 1 and "--moments: " in err, err
    assert os.listdir(tmp_path) == []  # refused before anything ran
    assert chaos_moments.parse_rounds("all,step@5+startup") == [chaos_moments.ALL_MOMENTS, "step@5+startup"]


def test_the_trainer_refuses_a_malformed_fault_before_writing(monkeypatch, capsys, tmp_path):
    from maxscale.train import command

    monkeypatch.setenv(faults.FAULT_ENV, "step@first")
    rc = command.main([f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "MAXSCALE_FAULT='step@first'" in err, err
    assert not (tmp_path / "run").exists()
