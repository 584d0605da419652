import numpy as np, collections, sys
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
def stagewise(v, sizes=(48, 96, 192, 384)):
    out, i = [], 0
    for s in sizes:
        b = v[i:i + s]; out.append(b / (np.linalg.norm(b) + 1e-8) * np.sqrt(s)); i += s
    return np.concatenate(out)
V = {
 "bb224_ms": lambda r: np.concatenate([r["bb224_mean"], r["bb224_std"]]),
 "bb96_ms": lambda r: np.concatenate([r["bb96_mean"], r["bb96_std"]]),
 "bb64_ms": lambda r: np.concatenate([r["bb64_mean"], r["bb64_std"]]),
 "bb64_mean": lambda r: r["bb64_mean"],
 "bb96_mean": lambda r: r["bb96_mean"],
 "pe224": lambda r: r["pe224"],
 "pe+bb64": lambda r: np.concatenate([r["pe224"], r["bb64_mean"], r["bb64_std"]]),
}
class Diag:
    def fit(self, X):
        self.mu = X.mean(0); v = X.var(0); self.var = v + 0.1 * v.mean() + 1e-6; return self
    def score(self, X): return (((X - self.mu) ** 2) / self.var).mean(1)
class PPCA:
    def __init__(self, k=8): self.k = k
    def fit(self, X):
        self.mu = X.mean(0); Xc = X - self.mu
        U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
        k = min(self.k, len(X) - 1); ev = S ** 2 / len(X)
        self.W = Vt[:k]; self.ev = ev[:k]
        rest = (np.sum(Xc ** 2) / len(X) - ev[:k].sum()) / (X.shape[1] - k)
        self.s2 = max(rest, 1e-3 * ev[0], 1e-8)
        self.ev = self.ev + self.s2
        return self
    def score(self, X):
        Xc = X - self.mu; p = Xc @ self.W.T
        res = (Xc ** 2).sum(1) - (p ** 2).sum(1)
        return ((p ** 2) / self.ev).sum(1) + res / self.s2
def crossfit(model, X, folds=5, seed=0):
    idx = np.random.RandomState(seed).permutation(len(X)); out = np.zeros(len(X))
    for f in range(folds):
        te = idx[f::folds]; tr = np.setdiff1d(idx, te)
        out[te] = model().fit(X[tr]).score(X[te])
    return np.sort(out)
def run(name, f, Model, t=0.01, verbose=False):
    feats = {id(r): f(r) for r in R}
    fits, calib = {}, {}
    for a in ADAPTERS:
        X = np.stack([feats[id(r)] for r in R if r["adapter"] == a and r["role"] == "dev"])
        fits[a] = Model().fit(X); calib[a] = crossfit(Model, X)
    evalr = [r for r in R if r["role"] != "dev"]
    X = np.stack([feats[id(r)] for r in evalr])
    S = np.stack([fits[a].score(X) for a in ADAPTERS], 1)
    P = np.stack([np.array([(calib[a] >= s).mean() for s in S[:, j]]) for j, a in enumerate(ADAPTERS)], 1)
    N = S / np.array([np.median(calib[a]) for a in ADAPTERS])[None]
    best = np.array([min(range(len(ADAPTERS)), key=lambda j: (-P[i, j], N[i, j])) for i in range(len(evalr))])
    truth = np.array([ADAPTERS.index(r["adapter"]) if r["adapter"] else -1 for r in evalr])
    known = truth >= 0
    acc = (best[known] == truth[known]).mean()
    accN = (N[known].argmin(1) == truth[known]).mean()
    frr = (P[known].max(1) < t).mean()
    per = collections.Counter(); tot = collections.Counter()
    for i in np.where(known)[0]:
        key = (ADAPTERS[truth[i]], evalr[i]["role"]); tot[key] += 1; per[key] += best[i] == truth[i]
    loo, det = [], {}
    for j, a in enumerate(ADAPTERS):
        fl = np.delete(P[truth == j], j, axis=1).max(1) < t; loo.append(fl); det[a] = round(fl.mean(), 2)
    loo = np.concatenate(loo).mean(); unk = (P[~known].max(1) < t).mean()
    print(f"{name:22s} top1 {acc:.3f} (byN {accN:.3f}) FRR {frr:.3f} LOO {loo:.3f} noadapter-unk {unk:.2f}", flush=True)
    if verbose:
        print("   errors", {k: f"{per[k]}/{tot[k]}" for k in tot if per[k] < tot[k]})
        print("   loo", det)
for n, f in V.items():
    for mn, M in [("diag", Diag), ("ppca8", lambda: PPCA(8))]:
        run(n + "/" + mn, f, M, verbose=len(sys.argv) > 1)
