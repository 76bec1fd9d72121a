"""Eleventh round: the auto rule's stop with a look-ahead (choose_pruning's ``hold``), replayed on recorded walks.
python hold_sim.py RULES_JSON[,RULES_JSON] [LADDER_JSON[,LADDER_JSON]]
RULES_JSON: rules.py outputs (the package's own walk: per candidate the patch's share, seed 0). For each subject and
hold 0-2: the stop the walk makes on those points (choose_pruning's logic: the candidate whose share stays at most
0.05 over it and the next ``hold`` candidates, within the 10-point budget, then the 0.25 margin), or where the
recorded walk ends before the look-ahead is complete, the k from which it would have to go on. LADDER_JSON
(ladder_study.py outputs, the same walk measured further, with the true ACC / ASR after every k) continue the
walk past the recorded points and give the true ACC / ASR at the stop."""
import json
import math
import sys

MAX_SHARE, MAX_DROP, MARGIN = 0.05, 0.1, 0.25  # choose_pruning's defaults


def stop(points, hold):
    """(k chosen, k found) on points [(k, defender acc, share)], or (None, k) where the points end too early."""
    floor = points[0][1] - MAX_DROP - 1e-9
    found = goal = None
    for i in range(1, len(points)):
        j = i - hold  # the candidate whose look-ahead is complete at i
        if found is None and j >= 1 and points[j][1] >= floor and max(p[2] for p in points[j:i + 1]) <= MAX_SHARE:
            found, goal = points[j][0], math.ceil(points[j][0] * (1 + MARGIN))
        if points[i][1] < floor or (found is not None and points[i][0] >= goal):
            within = [p[0] for p in points[:i + 1] if p[1] >= floor]
            if found is not None:
                return max(k for k in within if k <= max(goal, found)), found
            return fallback(points[:i + 1], hold, floor), "none"
    return None, points[-1][0]  # the recorded walk ended first


def fallback(points, hold, floor):
    """choose_pruning's fallback: the lowest held share within the budget if at most half the unpruned share, else 0."""
    held = [(max(p[2] for p in points[i:i + hold + 1]), p[0]) for i, p in enumerate(points) if p[1] >= floor]
    share, k = min(held)
    return k if share <= points[0][2] / 2 else 0


def seed0(shares):
    """The share of the walk's own patch (seed 0) among a ladder point's shares ({"0.01": .., "0.01@s1": ..})."""
    return next(v for key, v in shares.items() if "@" not in key)


if __name__ == "__main__":
    walks = {}
    for path in sys.argv[1].split(","):
        for name, row in json.load(open(path)).items():
            walks[name.split("/")[0]] = [(p[0], p[1], p[4]) for p in row["auto"][4]], row["auto"][0]
    ladders = {}
    for path in sys.argv[2].split(",") if len(sys.argv) > 2 else []:
        ladders.update(json.load(open(path)))
    for name, (points, recorded) in walks.items():
        cells = []
        for hold in (0, 1, 2):
            k, found = stop(points, hold)
            truth = ""
            if k is None and name in ladders:  # go on along the ladder's curve (the same order, probe and seed)
                ladder = ladders[name]
                step = points[1][0] - points[0][0]
                curve = {r["k"]: r for r in ladder["curve"]}
                more = [(k_, curve[k_]["defender_acc"], seed0(curve[k_]["shares"]))
                        for k_ in range(0, max(curve) + 1, step) if k_ in curve]
                k, found = stop(more, hold)
            if isinstance(k, int) and name in ladders:
                r = {row["k"]: row for row in ladders[name]["curve"]}.get(k)
                truth = "" if r is None else f", true {100 * r['acc']:.1f} / {100 * r['asr']:.1f}"
            cells.append(f"hold {hold}: " + (f"found {found}, chosen {k}{truth}" if k is not None else
                                             f"the recorded walk ends at {found} before the look-ahead"))
        print(f"{name} (recorded: {recorded})", *cells, sep="\n  ")
