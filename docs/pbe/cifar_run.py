"""PBE measurement runs on the CPU-scale CIFAR-10 subjects: python cifar_run.py SETTING SUBJECT[,SUBJECT] 'JSON-kwargs' TAG"""
import json, sys, time, os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "anp-selection"))
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from common import cifar, subject
from fastpurify.engines.pbe import pbe
from fastpurify.reproduce.subjects import get_subject

setting, names, kw, tag = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), sys.argv[4]
for name in names:
    cfg, split, cache = cifar()
    attack_name, seed = name.split("-s")
    s = get_subject(split, cfg, attack_name, int(seed), recipe=cfg.recipe, device=torch.device("cpu"), cache=cache,
                    progress=False)
    start = time.time()
    if setting == "clean":
        n = kw.pop("clean_images", 500)
        clean = split.reserve[0][:n], split.reserve[1][:n]
        _, report = pbe(s.model, clean_data=clean, test_data=split.test, attack=s.attack, progress=False, device="cpu", **kw)
        kw["clean_images"] = n
    else:
        p = s.poisoned
        _, report = pbe(s.model, train_data=(p.images, p.labels), poison_indices=p.poison_indices, test_data=split.test,
                        attack=s.attack, progress=False, device="cpu", **kw)
    out = {"tag": tag, "subject": name, "setting": setting, "kw": kw, "wall": round(time.time() - start, 1),
           **report.summary()}
    out.pop("engine")
    with open(os.path.join(os.environ.get("OUT", "."), f"cifar-{setting}.jsonl"), "a") as fh:
        fh.write(json.dumps(out) + "\n")
    rounds = "; ".join(f"r{r['round']} {r['size']} p{(r['poisoned_fraction'] or 0):.3f} AP{(r['average_precision'] or 0):.2f} "
                       f"adv {(r['adv_acc'] or 0):.3f}/{(r['adv_asr'] or 0):.3f} -> {r['acc']:.3f}/{r['asr']:.3f}" for r in out["rounds"])
    print(tag, name, f"before {out['before']['acc']:.3f}/{out['before']['asr']:.3f} advlabels top {out['adversarial_labels']['top_class']} {out['adversarial_labels']['top_share']:.2f};", rounds, f"[{out['wall']} s]", flush=True)
