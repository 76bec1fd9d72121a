"""Eleventh round: the auto rule's stop with a look-ahead (choose_pruning's ``hold``), replayed on recorded walks.
python hold_sim.py RULES_JSON[,RULES_JSON] [LADDER_JSON[,LADDER_JSON]]
RULES_JSON: rules.py outputs (the package's own walk: per candidate the patch's share, seed 0). For each subject and
hold 0-2: the k confirm_sim.py's replay of choose_pruning's walk chooses on those points (the candidate whose share
stays at most 0.05 over it and the next ``hold`` candidates, within the 10-point budget, then the 0.25 margin; else
the lowest held share). LADDER_JSON (ladder_study.py outputs: the same walk measured further, with the true ACC / ASR
after every k) continue the walk past the recorded points and give the true ACC / ASR at the choice."""
import json
import sys

from confirm_sim import walk

MARGIN = 0.25  # choose_pruning's default


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
        curve = {k: {"k": k, "defender_acc": acc, "shares": {"walk": share}} for k, acc, share in points}
        truth = {r["k"]: r for r in ladders[name]["curve"]} if name in ladders else {}
        for k, r in truth.items():  # past the recorded points, the ladder (the same order, probe and seed)
            curve.setdefault(k, {"k": k, "defender_acc": r["defender_acc"], "shares": {"walk": seed0(r["shares"])}})
        step = points[1][0] - points[0][0]
        numbers = list(range(0, max(curve) + 1, step))
        cells = []
        for hold in (0, 1, 2):
            try:
                p, why = walk(list(curve.values()), numbers, "walk", (0,), MARGIN, hold)
            except SystemExit:
                cells.append(f"hold {hold}: the walk ends at {max(curve)} before the look-ahead")
                continue
            r = truth.get(p["k"])
            cells.append(f"hold {hold}: {why}, chosen {p['k']}" +
                         ("" if r is None else f", true {100 * r['acc']:.1f} / {100 * r['asr']:.1f}"))
        print(f"{name} (recorded: {recorded})", *cells, sep="\n  ")
