import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent)); sys.path.insert(0, "/work/main")
from study import *  # noqa
GROUPS = {
    "colour": list(range(0, 7)) + list(range(51, 61)),
    "intensity": [7, 8] + list(range(41, 51)),
    "layout": list(range(9, 41)) + list(range(85, 157)),
    "gradients": list(range(61, 85)),
    "spectrum": list(range(157, 168)),
    "sign": list(range(168, 200)),
}

def views_of(thumbs, seed=0):
    g = torch.Generator().manual_seed(seed)
    per = [S.image_descriptors(thumbs)] + [S.image_descriptors(S.augmented_views(thumbs, g)) for _ in range(S.DEFAULT_VIEWS)]
    return torch.stack(per, 1), g

def fit_subset(desc, g_order, cols):
    width = len(cols)
    x = desc[..., cols]
    gauss = S._gaussian(x.reshape(-1, width))
    count = x.shape[0]; held = []
    folds = min(5, count)
    for fold in range(folds):
        test = set(g_order[fold::folds].tolist()); train = [i for i in g_order.tolist() if i not in test]
        fg = S._gaussian(x[train].reshape(-1, width))
        held.append(S._score(x[sorted(test)].reshape(-1, width), *fg))
    scores = torch.cat(held)
    cal = torch.quantile(scores, torch.linspace(0, 1, S.CALIBRATION_POINTS, dtype=scores.dtype))
    return S.ImageSignature(*(t.float() for t in gauss), cal.float())

def grouped(mode):
    def fit(thumbs):
        desc, g = views_of(thumbs)
        order = torch.randperm(desc.shape[0], generator=g)
        joint = fit_subset(desc, order, list(range(200)))
        parts = {k: fit_subset(desc, order, cols) for k, cols in GROUPS.items()}
        def conf(D):
            cj = joint.confidence(joint.score(D)).numpy()
            cg = np.stack([parts[k].confidence(parts[k].score(D[:, GROUPS[k]])).numpy() for k in GROUPS], 1)
            if mode == "min": return cg.min(1)
            if mode == "bonf": return np.minimum(1, cg.min(1) * len(GROUPS))
            if mode == "joint+min": return np.minimum(cj, cg.min(1))
            if mode == "joint+bonf": return np.minimum(cj, np.minimum(1, cg.min(1) * len(GROUPS)))
            if mode == "geo": return np.exp(np.log(np.maximum(cg, 1e-300)).mean(1))
        return {"rel": lambda D: joint.relative_score(joint.score(D)).numpy(), "conf": conf}
    return fit

if __name__ == "__main__":
  for mode in sys.argv[1:]:
    evaluate(grouped(mode), mode)
