"""PBE on the digits subjects: python digits_run.py SETTING SUBJECT[,SUBJECT] 'JSON-kwargs' TAG
(clean: the first 100 test images are the clean extra set, the other 259 evaluate; no-clean: the
poisoned training set, all 359 test images evaluate)."""
import json, sys, time, os
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_subjects import subject
from fastpurify.engines.pbe import pbe

setting, names, kw, tag = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), sys.argv[4]
for name in names:
    model, attack, poisoned, test = subject(name)
    start = time.time()
    if setting == "clean":
        _, report = pbe(model, clean_data=(test[0][:100], test[1][:100]), test_data=(test[0][100:], test[1][100:]),
                        attack=attack, progress=False, device="cpu", **kw)
    else:
        _, report = pbe(model, train_data=(poisoned.images, poisoned.labels), poison_indices=poisoned.poison_indices,
                        test_data=test, attack=attack, progress=False, device="cpu", **kw)
    out = {"tag": tag, "subject": name, "setting": setting, "kw": kw, "wall": round(time.time() - start, 1),
           **report.summary()}
    out.pop("engine")
    with open(os.path.join(os.environ.get("OUT", "."), f"digits-{setting}.jsonl"), "a") as fh:
        fh.write(json.dumps(out) + "\n")
    f = lambda v: "-" if v is None else f"{v:.3f}"
    rounds = "; ".join(f"r{r['round']} {r['size']} p{f(r['poisoned_fraction'])} AP{f(r['average_precision'])} "
                       f"adv {f(r['adv_acc'])}/{f(r['adv_asr'])} -> {r['acc']:.3f}/{r['asr']:.3f}" for r in out["rounds"])
    al = out["adversarial_labels"]
    print(tag, name, f"before {out['before']['acc']:.3f}/{out['before']['asr']:.3f} adv-labels top {al['top_class']} {al['top_share']:.2f} target {al.get('target_share', 0):.2f};", rounds, f"[{out['wall']} s]", flush=True)
