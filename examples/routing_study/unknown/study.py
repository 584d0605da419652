"""Unknown detection: shipped signature vs variants, on cached thumbnails. Prints FRR / LOO-unknown frontier."""
import sys
import numpy as np, torch
sys.path.insert(0, "/work/main")
from m4oe_adapters import signatures as S
torch.set_num_threads(1)
d = np.load("runs/route_exp5/thumbs.npz")
dev, dev_names = torch.from_numpy(d["dev"]).float(), d["dev_names"]
held, truth = torch.from_numpy(d["held"]).float(), d["held_names"]
names = sorted(set(dev_names))
known = truth != "no adapter"
Dh = S.image_descriptors(held)

def frontier(rel, conf, label):
    """rel, conf: [N, A]. Decision: argmin rel; accept if conf >= t. LOO: drop column of truth."""
    t_idx = np.array([names.index(t) if t in names else -1 for t in truth])
    top1 = (rel[known].argmin(1) == t_idx[known]).mean()
    own_conf = conf[np.arange(len(truth)), np.where(t_idx >= 0, t_idx, 0)]
    best = rel.argmin(1)
    chosen_conf = conf[np.arange(len(truth)), best]
    loo = []
    for i in np.where(known)[0]:
        r = rel[i].copy(); r[t_idx[i]] = np.inf
        loo.append(conf[i, r.argmin()])
    loo = np.array(loo)
    # macro weights: each left-out adapter counts equally
    w = np.array([1.0 / (t_idx[known] == t_idx[i]).sum() for i in np.where(known)[0]])
    out = []
    for t in [1e-4, 1e-3, 3e-3, 1e-2, 2e-2, 5e-2]:
        frr = (chosen_conf[known] < t).mean()
        out.append(f"t={t:g}: FRR {frr:.3f} LOO {(loo < t).mean():.3f} (macro {(w * (loo < t)).sum() / w.sum():.3f})")
    # best LOO at FRR <= 2 %
    ts = np.unique(np.concatenate([chosen_conf[known], loo]))
    best_loo = max(((loo < t).mean(), t) for t in ts if (chosen_conf[known] < t).mean() <= 0.02)
    print(f"{label}: top-1 {top1:.3f}; best LOO at FRR<=2%: {best_loo[0]:.3f} (t={best_loo[1]:.3g})")
    for line in out: print("   ", line)

def evaluate(fit, label):
    sigs = {n: fit(dev[dev_names == n]) for n in names}
    rel = np.stack([sigs[n]["rel"](Dh) for n in names], 1)
    conf = np.stack([sigs[n]["conf"](Dh) for n in names], 1)
    frontier(rel, conf, label)

def shipped(thumbs):
    sig = S.ImageSignature.fit(thumbs, seed=0)
    return {"rel": lambda D: sig.relative_score(sig.score(D)).numpy(), "conf": lambda D: sig.confidence(sig.score(D)).numpy()}

if __name__ == "__main__":
    evaluate(shipped, "shipped")
