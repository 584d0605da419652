import numpy as np, sys, collections
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
def blocks(r, key):
    if key == "bbS":  # per-stage normalised mean+std
        pass
    return r[key]
def stagewise(v, sizes=(48, 96, 192, 384)):
    out, i = [], 0
    for s in sizes:
        b = v[i:i + s]; out.append(b / (np.linalg.norm(b) + 1e-8)); i += s
    return np.concatenate(out)
VARIANTS = {
 "bb224_mean": lambda r: stagewise(r["bb224_mean"]),
 "bb224_ms": lambda r: np.concatenate([stagewise(r["bb224_mean"]), stagewise(r["bb224_std"])]),
 "bb96_ms": lambda r: np.concatenate([stagewise(r["bb96_mean"]), stagewise(r["bb96_std"])]),
 "bb64_ms": lambda r: np.concatenate([stagewise(r["bb64_mean"]), stagewise(r["bb64_std"])]),
 "bb64_mean": lambda r: stagewise(r["bb64_mean"]),
 "pe224": lambda r: r["pe224"],
 "thumb": lambda r: r["thumb"],
}
def unit(X): return X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-8)
def knn_scores(train, X):
    d = 1 - X @ train.T
    return d.min(1)
def run(name, f, scorer="knn", t=0.01):
    feats = {id(r): f(r) for r in R}
    fit = {a: unit(np.stack([feats[id(r)] for r in R if r["adapter"] == a and r["role"] == "dev"])) for a in ADAPTERS}
    calib = {}
    for a, P in fit.items():
        D = 1 - P @ P.T; np.fill_diagonal(D, 9); calib[a] = np.sort(D.min(1))
    evalr = [r for r in R if r["role"] != "dev"]
    X = unit(np.stack([feats[id(r)] for r in evalr]))
    dist = {a: knn_scores(fit[a], X) for a in ADAPTERS}
    pval = {a: np.array([(calib[a] >= d).mean() for d in dist[a]]) for a in ADAPTERS}
    norm = {a: dist[a] / (np.median(calib[a]) + 1e-8) for a in ADAPTERS}
    P = np.stack([pval[a] for a in ADAPTERS], 1); N = np.stack([norm[a] for a in ADAPTERS], 1)
    choice = np.lexsort((N.T, -P.T)) if False else None
    best = np.array([min(range(len(ADAPTERS)), key=lambda j: (-P[i, j], N[i, j])) for i in range(len(evalr))])
    truth = np.array([ADAPTERS.index(r["adapter"]) if r["adapter"] else -1 for r in evalr])
    known = truth >= 0
    acc = (best[known] == truth[known]).mean()
    frr = (P[known, truth[known]] < t).mean() if False else (P[known].max(1) < t).mean()
    per = collections.Counter(); tot = collections.Counter()
    for i in np.where(known)[0]:
        key = (ADAPTERS[truth[i]], evalr[i]["role"]); tot[key] += 1; per[key] += best[i] == truth[i]
    loo = []; loo_detail = {}
    for j, a in enumerate(ADAPTERS):
        idx = truth == j
        others = np.delete(P[idx], j, axis=1)
        flagged = (others.max(1) < t)
        loo.append(flagged); loo_detail[a] = flagged.mean()
    loo = np.concatenate(loo).mean()
    unk = (P[~known].max(1) < t).mean()
    print(f"{name:12s} top1 {acc:.3f}  FRR@{t} {frr:.3f}  LOO-unknown {loo:.3f}  noadapter-unknown {unk:.2f}")
    wrong = {k: f"{per[k]}/{tot[k]}" for k in tot if per[k] < tot[k]}
    print("    errors:", wrong)
    print("    loo:", {a: round(v, 2) for a, v in loo_detail.items()})
for n, f in VARIANTS.items():
    run(n, f)
