"""Which keep rule gains the most val_bpb per GPU hour: a simulation of nights of the loop.

    uv run benchmarks/keep_rules.py                           # sigma 0.001, 0.002, 0.005
    uv run benchmarks/keep_rules.py --sigma 0.002 --p-good 0.1 --overhead-s 90

A night is a baseline (the unchanged code, run a rule's number of times) and then ideas, one run
each, until the night's GPU time is spent: a run costs --train-s of training plus --overhead-s of
start-up, compilation and evaluation, and a rule's re-runs cost the same. An idea's true effect
on val_bpb: a fraction --p-good gain between G/4 and 2G (uniform; G is a column of the table), a
fraction --p-zero change nothing, the rest harm (exponential, mean --harm); a fraction
--p-shorter of all ideas make train.py shorter. A run observes the code's true val_bpb plus
N(0, sigma). Every rule meets the same ideas and the same noise.

Per night: real gain (how much better the code the night ends on truly is than the code it
started from), false keeps (ideas kept whose true effect is none or harm; deletions kept for being
shorter are counted in the gain, not here), runs. The table gives gain per GPU hour, in 1e-3
val_bpb, and false keeps per night, for each gain size G; `share` is a rule's gain as a share of
the best rule's, averaged over the columns where the best gains at least 1e-4 val_bpb an hour
(below that no rule finds anything, and the shares are noise).
"""

import argparse

import numpy as np

FLOOR = 0.0005  # NOISE's floor in program.md: two runs that agree by luck must not make it zero
# name, baseline runs, BEST ("lowest" single kept run, or "mean" of the tip's runs), NOISE ("gap" of the
# first two baseline runs, or "pooled" sd of every commit run more than once), then the decision:
# keep if val_bpb < BEST - margin * NOISE; a win smaller than confirm * NOISE is run again and kept if
# the mean of both still wins; after `remeasure` runs without a keep the tip is run again; a shorter
# train.py is kept if val_bpb < BEST + shorter * NOISE (None: no such clause).
RULES = [
    dict(name="greedy (the original)", start=1, best="lowest", noise="gap", margin=0, shorter=None),
    dict(name="gap (today's)", start=2, best="lowest", noise="gap", margin=1, shorter=1),
    dict(name="mean, margin 0", start=2, margin=0),
    dict(name="mean, margin 0, 3 baseline runs", start=3, margin=0),
    dict(name="mean, margin 0.5", start=2, margin=0.5),
    dict(name="mean, margin 1", start=3, margin=1),
    dict(name="mean, margin 2", start=3, margin=2),
    dict(name="confirm wins < 0.5 NOISE", start=2, margin=0, confirm=0.5),
    dict(name="confirm wins < 1 NOISE", start=2, margin=0, confirm=1),
    dict(name="confirm every win", start=2, margin=0, confirm=np.inf),
    dict(name="re-run the tip after 5 misses", start=2, margin=0, remeasure=5),
    dict(name="re-run the tip after 8 misses", start=2, margin=0, remeasure=8),
    dict(name="re-run the tip after 12 misses", start=2, margin=0, remeasure=12),
]
DEFAULTS = dict(best="mean", noise="pooled", confirm=0, remeasure=None, shorter=1)


def draw(rng, nights, ideas, gain, p_good, p_zero, harm, p_shorter):
    """The ideas of `nights` nights (true effects on val_bpb, whether they shorten train.py) and every
    noise draw a rule may need (standard normal: times sigma, a run's error)."""
    u = rng.random((nights, ideas))
    good = -rng.uniform(gain / 4, 2 * gain, (nights, ideas))
    bad = rng.exponential(harm, (nights, ideas)) if harm > 0 else np.zeros((nights, ideas))
    return dict(effect=np.where(u < p_good, good, np.where(u < p_good + p_zero, 0.0, bad)),
                shorter=rng.random((nights, ideas)) < p_shorter,
                baseline=rng.standard_normal((nights, 3)), run=rng.standard_normal((nights, ideas)),
                again=rng.standard_normal((nights, ideas)), tip=rng.standard_normal((nights, ideas)))


def play(rule, d, sigma, runs_per_night):
    """One rule over every night of d at once (arrays over nights); returns per-night arrays."""
    rule = {**DEFAULTS, **rule}
    effect = d["effect"]
    nights, ideas = effect.shape
    base = sigma * d["baseline"][:, :rule["start"]]
    tip = np.zeros(nights)  # the true val_bpb of the code on the branch, less the start's
    # the tip's runs (sum, sum of squares, count) and the closed groups' squared deviations, for NOISE
    tip_sum, tip_sq, tip_n = base.sum(1), (base ** 2).sum(1), np.full(nights, float(rule["start"]))
    closed_ss, closed_df = np.zeros(nights), np.zeros(nights)
    lowest = base[:, 0].copy()
    gap = np.abs(base[:, 0] - base[:, 1]) if rule["start"] > 1 else np.zeros(nights)
    runs, misses = tip_n.copy(), np.zeros(nights)
    false_keeps, harmful_keeps, keeps = np.zeros(nights), np.zeros(nights), np.zeros(nights)
    for i in range(ideas):
        if rule["remeasure"]:
            again = (misses >= rule["remeasure"]) & (runs < runs_per_night)
            x = tip + sigma * d["tip"][:, i]
            tip_sum, tip_sq, tip_n = tip_sum + again * x, tip_sq + again * x * x, tip_n + again
            runs, misses = runs + again, np.where(again, 0, misses)
        active = runs < runs_per_night
        if not active.any():
            break
        tip_ss = tip_sq - tip_sum ** 2 / tip_n
        if rule["noise"] == "gap":
            noise = np.maximum(gap, FLOOR)
        else:
            df = closed_df + tip_n - 1
            noise = np.maximum(np.sqrt((closed_ss + tip_ss) / np.maximum(df, 1)), FLOOR)
        best = lowest if rule["best"] == "lowest" else tip_sum / tip_n
        true = tip + effect[:, i]
        v = true + sigma * d["run"][:, i]
        runs += active
        keep = v < best - rule["margin"] * noise
        new_sum, new_sq, new_n = v, v * v, np.ones(nights)
        if rule["confirm"]:  # a small win is run again if the night has time left; the mean of both decides
            small = keep & (v >= best - rule["confirm"] * noise)
            again = small & active & (runs < runs_per_night)
            v2 = true + sigma * d["again"][:, i]
            runs += again
            keep = np.where(small, again & ((v + v2) / 2 < best - rule["margin"] * noise), keep)
            closed_ss += np.where(again & ~keep, (v - v2) ** 2 / 2, 0)  # a pair that was not kept still measures NOISE
            closed_df += again & ~keep
            new_sum, new_sq, new_n = np.where(again, v + v2, v), np.where(again, v * v + v2 * v2, v * v), 1.0 + again
        if rule["shorter"] is not None:
            keep |= d["shorter"][:, i] & (v < best + rule["shorter"] * noise)
        keep &= active
        keeps += keep
        false_keeps += keep & (effect[:, i] >= 0) & ~d["shorter"][:, i]
        harmful_keeps += keep & (effect[:, i] > 0)
        misses = np.where(keep, 0, misses + active)
        closed_ss, closed_df = closed_ss + keep * tip_ss, closed_df + keep * (tip_n - 1)
        tip, lowest = np.where(keep, true, tip), np.where(keep, np.minimum(lowest, v), lowest)
        tip_sum, tip_sq = np.where(keep, new_sum, tip_sum), np.where(keep, new_sq, tip_sq)
        tip_n = np.where(keep, new_n, tip_n)
    return dict(gain=-tip, false_keeps=false_keeps, harmful_keeps=harmful_keeps, keeps=keeps, runs=runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.001, 0.002, 0.005], help="sd of val_bpb")
    parser.add_argument("--gain", type=float, nargs="+", default=[0.001, 0.002, 0.004, 0.008], help="G: see above")
    parser.add_argument("--p-good", type=float, default=0.2)
    parser.add_argument("--p-zero", type=float, default=0.3)
    parser.add_argument("--harm", type=float, default=0.005, help="mean harm of a harmful idea")
    parser.add_argument("--p-shorter", type=float, default=0.1)
    parser.add_argument("--hours", type=float, default=8)
    parser.add_argument("--train-s", type=float, default=300)
    parser.add_argument("--overhead-s", type=float, default=60, help="start-up, compilation, evaluation: 30-90 s a run")
    parser.add_argument("--nights", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs_per_night = int(args.hours * 3600 // (args.train_s + args.overhead_s))
    print(f"a night: {args.hours:g} h, {runs_per_night} runs of {args.train_s:g} + {args.overhead_s:g} s; ideas: "
          f"{args.p_good:.0%} gain G/4 to 2G, {args.p_zero:.0%} none, {1 - args.p_good - args.p_zero:.0%} harm "
          f"(mean {args.harm:g}); {args.p_shorter:.0%} make train.py shorter; {args.nights} nights a cell")
    print("cells: real gain per GPU hour (1e-3 val_bpb) / false keeps per night")
    for sigma in args.sigma:
        results = {}
        for gain in args.gain:
            d = draw(np.random.default_rng(args.seed), args.nights, runs_per_night, gain, args.p_good, args.p_zero,
                     args.harm, args.p_shorter)
            for rule in RULES:
                r = play(rule, d, sigma, runs_per_night)
                results[rule["name"], gain] = (1000 * r["gain"].mean() / args.hours, r["false_keeps"].mean())
        tops = {g: max(results[rule["name"], g][0] for rule in RULES) for g in args.gain}
        columns = "".join(f"{'G ' + format(g, 'g'):>14}" for g in args.gain)
        print(f"\nsigma {sigma:g}\n{'rule':<32}{columns}{'share':>7}")
        shares = {}
        for rule in RULES:
            name = rule["name"]
            counted = [results[name, g][0] / tops[g] for g in args.gain if tops[g] >= 0.1]
            shares[name] = sum(counted) / len(counted) if counted else float("nan")
            print(f"{name:<32}" + "".join(f"{results[name, g][0]:>8.2f} {results[name, g][1]:>5.2f}" for g in args.gain)
                  + f"{shares[name]:>7.2f}")
        print(f"most gain at sigma {sigma:g}: {max(shares, key=shares.get)}")


if __name__ == "__main__":
    main()
