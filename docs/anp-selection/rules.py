"""Each pruning rule on each subject and mask set: pruned, ACC, ASR on the test split (ASR None on a clean
control, "clean-s<seed>").
python rules.py SUBJECTS SETS [THREADS] ['{choose_pruning keywords}'] [TAG]; the auto rule's curve is
(pruned, clean ACC, concentration, top class, target share) per candidate."""
import os, sys, json, torch, time
from common import mask_sets, subject
from fastpurify.selection import choose_pruning
from fastpurify.backdoor import evaluate
from fastpurify.pruning import prune, count_pruned, prune_by_clean_accuracy
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
names, sets = sys.argv[1].split(","), sys.argv[2].split(",")
kw = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
out = {}
for name in names:
    model, attack, clean, test = subject(name)
    masks_by = mask_sets(name)
    before = evaluate(model, *test, attack)
    for label in sets:
        masks = masks_by[label]
        row = {"before": [before["acc"], before.get("asr")]}
        k_thr = count_pruned(masks, threshold=0.2)
        m = evaluate(prune(model, masks, number=k_thr), *test, attack)
        row["threshold"] = [k_thr, m["acc"], m.get("asr")]
        choice = prune_by_clean_accuracy(model, masks, *clean, max_drop=0.02)
        m = evaluate(choice.model, *test, attack)
        row["clean_rule"] = [choice.point.pruned, m["acc"], m.get("asr")]
        t = time.time()
        sel = choose_pruning(model, masks, *clean, **kw)
        m = evaluate(sel.prune(model), *test, attack)
        curve = [(p.pruned, round(p.acc, 3), round(p.concentration, 3), p.top_class,
                  None if p.target_share is None else round(p.target_share, 3)) for p in sel.points]
        row["auto"] = [sel.pruned, m["acc"], m.get("asr"), round(time.time() - t, 1), curve, sel.settings.get("walk")]
        row["auto_reason"], row["suspected_by"] = sel.reason, sel.settings.get("suspected_by")
        if sel.order is not None:  # order="patch": the trigger-guided order the walk pruned along
            row["order"] = sel.order.as_dict()
        row["settings"] = sel.settings
        if "class_shares" in sel.settings:
            row["class_shares"] = sel.settings["class_shares"]
        out[f"{name}/{label}"] = row
        pct = lambda v: "n/a" if v is None else f"{100*v:.1f}"
        f = lambda r: f"k={r[0]:3d} ACC {pct(r[1])} ASR {pct(r[2])}"
        print(f"{name:12s} {label:5s} before ACC {pct(before['acc'])} ASR {pct(before.get('asr'))} | thr {f(row['threshold'])} | clean {f(row['clean_rule'])} | auto {f(row['auto'])} ({row['auto'][3]} s)", flush=True)
tag = sys.argv[5] if len(sys.argv) > 5 else "rules"
json.dump(out, open(os.environ.get("OUT", ".") + f"/{tag}-{'_'.join(names)[:60]}.json", "w"))
