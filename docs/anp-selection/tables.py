import os, json, glob
rows = {}
for f in sorted(glob.glob(os.path.join(os.environ.get("OUT", "."), "rules-*.json"))):
    rows.update(json.load(open(f)))
order = ["digits-badnets-0", "badnets-s0", "badnets-s1", "blend-s0", "blend-s1"]
label = {"digits-badnets-0": "digits BadNets", "badnets-s0": "CIFAR-10 BadNets s0", "badnets-s1": "CIFAR-10 BadNets s1",
         "blend-s0": "CIFAR-10 Blend s0", "blend-s1": "CIFAR-10 Blend s1"}
sets = ["m0", "m1", "m2", "m3", "mean", "rank"]
print("| subject (ACC / ASR before) | masks | threshold 0.2: k, ACC, ASR | clean rule (2 pt): k, ACC, ASR | auto: k, ACC, ASR |")
print("|---|---|---|---|---|")
for name in order:
    for s in sets:
        r = rows.get(f"{name}/{s}")
        if r is None:
            continue
        b = r["before"]
        f = lambda x: f"{x[0]}, {100*x[1]:.1f}, **{100*x[2]:.1f}**"
        print(f"| {label[name]} ({100*b[0]:.1f} / {100*b[1]:.1f}) | {s if s in ('mean','rank') else 'seed ' + s[1]} | {f(r['threshold'])} | {f(r['clean_rule'])} | {f(r['auto'])} |")
