"""benchmarks/keep_rules.py, the simulation that chose program.md's keep rule: the properties its
comparison rests on, on small draws, and program.md's rule as its winner at the measured noise."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import keep_rules  # noqa: E402
RULES = {rule["name"]: rule for rule in keep_rules.RULES}


def draws(nights, ideas, gain=0.002, p_good=0.2, p_zero=0.3, harm=0.005, p_shorter=0.1, seed=0):
    return keep_rules.draw(np.random.default_rng(seed), nights, ideas, gain, p_good, p_zero, harm, p_shorter)


def test_without_noise_no_rule_keeps_anything_that_does_not_help():
    """sigma 0 and no idea that gains: every rule sees each idea's true effect, so it keeps none of
    them (a no-effect idea ties BEST, which is no win) and ends the night where it started."""
    d = draws(300, 30, p_good=0.0, p_shorter=0.0)
    assert (d["effect"] == 0).any() and (d["effect"] > 0).any()
    for rule in keep_rules.RULES:
        r = keep_rules.play(rule, d, 0.0, 30)
        assert r["keeps"].sum() == 0 and (r["gain"] == 0).all(), rule["name"]


def test_without_noise_the_plain_rule_gains_every_good_idea_it_tries():
    """The bookkeeping: with sigma 0, keeping anything below BEST gains exactly the sum of the good
    ideas' effects among those the night had time for (its runs less the baseline's)."""
    d = draws(300, 30, p_shorter=0.0)
    rule = RULES["mean, margin 0"]
    r = keep_rules.play(rule, d, 0.0, 30)
    tried = d["effect"][:, :30 - rule["start"]]
    assert np.allclose(r["gain"], -np.minimum(tried, 0).sum(1)) and r["gain"].min() > 0
    assert (r["runs"] == 30).all() and r["false_keeps"].sum() == 0


@pytest.mark.parametrize("name, rate", [("greedy (the original)", 1 / 2), ("gap (today's)", 1 / 4),
                                        ("mean, margin 0", 1 / 2)])
def test_how_often_a_first_no_effect_idea_is_kept(name, rate):
    """A night of one idea with no effect, 20,000 times. Greedy keeps it when its run beats the
    baseline's: 1/2. Today's rule keeps it when v < b1 - |b1 - b2|, that is when v - b2 < 0 and
    v - 2 b1 + b2 < 0, two independent events (their covariance is var v - var b2 = 0): 1/4. The
    noise (0.01) dwarfs NOISE's floor, which would make the rule a little stricter."""
    rule = RULES[name]
    d = draws(20000, 1, p_good=0.0, p_zero=1.0, p_shorter=0.0)
    r = keep_rules.play(rule, d, 0.01, rule["start"] + 1)
    assert abs(r["keeps"].mean() - rate) < 0.015 and r["false_keeps"].sum() == r["keeps"].sum()


def test_a_stricter_margin_keeps_no_more_that_does_not_help():
    """The same nights under margins 0, 0.5, 1, 2 (in NOISE): false keeps never rise with the margin."""
    d = draws(2000, 40)
    false = [keep_rules.play(dict(name="m", start=3, margin=k), d, 0.002, 40)["false_keeps"].sum()
             for k in (0, 0.5, 1, 2)]
    assert false == sorted(false, reverse=True) and false[0] > 2 * false[-1], false


def test_re_runs_cost_their_run():
    """No rule spends more runs than the night has; a confirming rule tries fewer ideas in it."""
    d = draws(500, 40, p_good=0.5)
    for rule in keep_rules.RULES:
        assert keep_rules.play(rule, d, 0.002, 40)["runs"].max() <= 40, rule["name"]
    plain, confirm = (keep_rules.play(RULES[n], d, 0.002, 40) for n in ("mean, margin 0", "confirm every win"))
    assert (plain["runs"] == 40).all() and (confirm["runs"] <= 40).all()
    assert confirm["keeps"].sum() < plain["keeps"].sum()


def test_program_md_rule_wins_at_the_measured_noise():
    """The rule program.md gives (keep anything below BEST, re-run the tip after its number of runs
    without a keep) is the one the table picks at the sigma benchmarks/README.md gives."""
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    program = re.sub(r"\s+", " ", open(os.path.join(ROOT, "program.md")).read())
    sigma = re.search(r"\*\*σ = ([0-9.]+)\*\*", readme).group(1)
    misses = int(re.search(r"after (\d+) runs without a keep", program).group(1))
    assert re.search(r"^\s*keep\s+if val_bpb < BEST$", open(os.path.join(ROOT, "program.md")).read(), re.M)
    (name,) = [r["name"] for r in keep_rules.RULES if r.get("remeasure") == misses and r["margin"] == 0]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "keep_rules.py"), "--sigma", sigma],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == f"most gain at sigma {float(sigma):g}: {name}", out
    assert len(re.findall(r"^\S.*\s+-?\d+\.\d\d\s+\d+\.\d\d", out, re.M)) == len(keep_rules.RULES)
