"""Ninth round: the auto rule's walk along the trigger-guided order, replayed from ladder_study.py's curves
(SEEDS=0,1,2) with its stop confirmed by several patch seeds, with and without the margin (docs/anp-selection.md).
python confirm_sim.py LADDER_JSON[,LADDER_JSON] AREA[,AREA per subject] [ORDER_JSON[,ORDER_JSON]]
For each subject: the k the walk chooses under each variant (seeds whose patches must all send at most
max_target_share of the other images to the target; margin), and the true ACC / ASR there (the ladder's: 2,000 test
images on CIFAR-10). With ORDER_JSON (the rules.py outputs the ladder re-applied) also on the whole test set, pruned
along the same order (common.py's subjects and masks: CIFAR, SUBJECTS, MASKS, DIGITS)."""
import json, math, sys
from fastpurify.selection import candidate_numbers

MAX_SHARE, MAX_DROP, MAX_FRACTION, CANDIDATES = 0.05, 0.1, 0.5, 50  # choose_pruning's defaults
VARIANTS = [((0,), 0.25), ((0, 1, 2), 0.25), ((0,), 0.0), ((0, 1, 2), 0.0)]


def key(area, seed):
    return str(area) + (f"@s{seed}" if seed else "")


def walk(curve, numbers, area, seeds, margin, hold=0):
    """The k choose_pruning's walk stops at (its found / goal / within-budget logic, with its look-ahead ``hold``),
    from the curve."""
    at = {r["k"]: r for r in curve}
    first = at[0]
    floor = first["defender_acc"] - MAX_DROP - 1e-9
    share = lambda r: max(r["shares"][key(area, s)] for s in seeds)
    points, found, goal = [first], None, None
    held = lambda i: max(share(p) for p in points[i:i + hold + 1])  # the largest share over a point and its look-ahead
    for k in numbers[1:]:
        if k not in at:
            raise SystemExit(f"the curve stops at k = {max(at)}; the walk needs k = {k} (raise KMAX)")
        p = at[k]
        points.append(p)
        i = len(points) - 1 - hold  # the candidate whose look-ahead is now complete
        if found is None and i >= 1 and points[i]["defender_acc"] >= floor and held(i) <= MAX_SHARE:
            found, goal = points[i]["k"], math.ceil(points[i]["k"] * (1 + margin))
        if p["defender_acc"] < floor:
            break
        if found is not None and k >= goal:
            break
    within = [i for i, p in enumerate(points) if p["defender_acc"] >= floor]
    if found is not None:
        return [points[i] for i in within if points[i]["k"] <= max(goal, found)][-1], f"found at {found}"
    lowest = min(within, key=lambda i: (held(i), points[i]["k"]))
    if held(lowest) <= share(first) / 2:
        return points[lowest], "lowest share"
    return first, "nothing"


def whole_test(name, orders, ks):
    """ACC / ASR on the subject's whole test set after pruning k neurons along the order, for each k."""
    from common import mask_sets, subject
    from fastpurify.backdoor import evaluate
    from fastpurify.patch_order import PatchOrder
    from fastpurify.pruning import prune
    model, attack, _, test = subject(name)
    neurons = [tuple(n) for n in orders[f"{name}/mean"]["order"]["neurons"]]
    ranking = PatchOrder(neurons, [], [], 0.0, "").ranking(mask_sets(name)["mean"])
    return {k: evaluate(prune(model, ranking, number=k).eval(), *test, attack) for k in sorted(set(ks))}


if __name__ == "__main__":
    data = {}
    for path in sys.argv[1].split(","):
        data.update(json.load(open(path)))
    areas = [float(a) for a in sys.argv[2].split(",")]
    orders = {}
    for path in sys.argv[3].split(",") if len(sys.argv) > 3 else []:
        orders.update(json.load(open(path)))
    for (name, row), area in zip(data.items(), areas * len(data) if len(areas) == 1 else areas):
        neurons = row.get("neurons")
        numbers = candidate_numbers(neurons, MAX_FRACTION, CANDIDATES) if neurons else [r["k"] for r in row["curve"]]
        acc0, asr0 = row["before"]["acc"], row["before"]["asr"]
        chosen = [(seeds, margin, *walk(row["curve"], numbers, area, seeds, margin)) for seeds, margin in VARIANTS]
        whole = whole_test(name, orders, [0] + [p["k"] for *_, p, _ in chosen]) if orders else {}
        cells = []
        for seeds, margin, p, why in chosen:
            cell = (f"seeds {','.join(map(str, seeds))} margin {margin:g}: k {p['k']} "
                    f"{100 * p['acc']:.1f} / {100 * p['asr']:.1f} ({100 * (acc0 - p['acc']):.1f}; {why})")
            if whole:
                m, m0 = whole[p["k"]], whole[0]
                cell += f"; whole test set {100 * m['acc']:.1f} / {100 * m['asr']:.1f} ({100 * (m0['acc'] - m['acc']):.1f})"
            cells.append(cell)
        print(name, f"before {100 * acc0:.1f} / {100 * asr0:.1f}", *cells, sep="\n  ")
