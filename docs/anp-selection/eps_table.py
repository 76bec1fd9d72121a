"""The eps study's table from eps_study.py's JSON files: python eps_table.py FILE.json [FILE.json ...]
(an "auto" row names the eps it read)."""
import json, sys
rows = {}
for path in sys.argv[1:]:
    rows.update(json.load(open(path)))
print("| subject | eps | threshold 0.2 prunes | fewest pruned for ASR <= 10 (ACC drop) | for ASR <= 5 | "
      "ACC / ASR at k = 5 | 10 | 15 |")
print("|---|---|---|---|---|---|---|---|")
def order(key):  # eps "auto" sorts as the value it read
    r, eps = rows[key], key.split("/eps")[1]
    return key.split("/")[0], r["eps_auto"]["value"] if eps == "auto" else float(eps)


for key in sorted(rows, key=order):
    r = rows[key]
    name, eps = key.split("/eps")
    if eps == "auto":
        eps = f"auto: {r['eps_auto']['value']:g}"
    at = {k: (a, s) for k, a, s in r["curve"]}
    first = lambda v: "none to k = 30" if v is None else f"{v[0]} ({v[1]:.1f})"
    cells = [f"{100 * at[k][0]:.0f} / {100 * at[k][1]:.0f}" for k in (5, 10, 15)]
    print(f"| {name} | {eps} | {r['thr']} | {first(r['asr10'])} | {first(r['asr5'])} | " + " | ".join(cells) + " |")
