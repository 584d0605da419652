import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent)); sys.path.insert(0, "/work/main")
from study import *  # noqa
from groups import views_of

def plain_calibration(views_in_gauss):
    def fit(thumbs):
        desc, g = views_of(thumbs)
        order = torch.randperm(desc.shape[0], generator=g)
        width = desc.shape[-1]
        gauss = S._gaussian(desc.reshape(-1, width))
        held = []
        folds = min(5, desc.shape[0])
        for fold in range(folds):
            test = sorted(set(order[fold::folds].tolist())); train = [i for i in order.tolist() if i not in test]
            fg = S._gaussian(desc[train].reshape(-1, width))
            held.append(S._score(desc[test][:, :views_in_gauss].reshape(-1, width), *fg))
        scores = torch.cat(held)
        cal = torch.quantile(scores, torch.linspace(0, 1, S.CALIBRATION_POINTS, dtype=scores.dtype))
        sig = S.ImageSignature(*(t.float() for t in gauss), cal.float())
        return {"rel": lambda D: sig.relative_score(sig.score(D)).numpy(), "conf": lambda D: sig.confidence(sig.score(D)).numpy()}
    return fit

for v in sys.argv[1:]:
    evaluate(plain_calibration(int(v)), f"calibration on {v} view(s) per held-out image")
