import sys, numpy as np, collections
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
lab = np.array([r["adapter"] or "none" for r in R]); role = np.array([r["role"] for r in R])
c = np.load("/work/main/runs/route_exp/an4cache.npy", allow_pickle=True).item(); Xall, fitsets = c["X"], c["fit"]
class Diag:
    def fit(self, X):
        self.mu = X.mean(0); v = X.var(0); self.var = v + 0.05 * np.median(v) + 1e-4; return self
    def score(self, X): return (((X - self.mu) ** 2) / self.var).mean(1)
class Full:
    def __init__(self, shrink=0.1, k=None): self.shrink = shrink; self.k = k
    def fit(self, X):
        self.mu = X.mean(0); Xc = X - self.mu; C = Xc.T @ Xc / len(X)
        d = np.diag(C) + 1e-4
        C = (1 - self.shrink) * C + self.shrink * np.diag(d) + 1e-4 * np.eye(len(d))
        w, V = np.linalg.eigh(C)
        if self.k:  # PPCA: top-k + isotropic rest
            idx = np.argsort(w)[::-1]; w, V = w[idx], V[:, idx]
            self.s2 = w[self.k:].mean(); self.V = V[:, :self.k]; self.w = w[:self.k]
        else:
            self.P = V @ np.diag(1 / w) @ V.T
        return self
    def score(self, X):
        Xc = X - self.mu
        if self.k:
            p = Xc @ self.V; res = (Xc ** 2).sum(1) - (p ** 2).sum(1)
            return ((p ** 2 / self.w).sum(1) + res / self.s2) / Xc.shape[1]
        return np.einsum("ij,jk,ik->i", Xc, self.P, Xc) / Xc.shape[1]
def evaluate(name, Model):
    fits, med = {}, {}
    for a, (V, idx) in fitsets.items():
        n = len(V); fits[a] = Model().fit(V.reshape(-1, V.shape[-1]))
        perm = np.random.RandomState(0).permutation(n); cs = []
        for f in range(5):
            te = perm[f::5]; tr = np.setdiff1d(perm, te)
            m = Model().fit(V[tr].reshape(-1, V.shape[-1])); cs.append(m.score(V[te].reshape(-1, V.shape[-1])))
        med[a] = np.median(np.concatenate(cs))
    E = np.where(role != "dev")[0]
    S = np.stack([fits[a].score(Xall[E]) / med[a] for a in ADAPTERS], 1)
    truth = np.array([ADAPTERS.index(l) if l != "none" else -1 for l in lab[E]]); known = truth >= 0
    top1 = (S[known].argmin(1) == truth[known]).mean()
    own = S[known, truth[known]]; other = np.array([np.delete(S[i], truth[i]).min() for i in np.where(known)[0]])
    tau = np.quantile(own, 0.98)
    zoo = np.array([R[E[i]]["role"] in ("test", "unseen") for i in range(len(E))])
    print(f"{name:18s} top1 {top1:.3f} (zoo-heldout {(S[known & zoo].argmin(1) == truth[known & zoo]).mean():.3f}) tau@FRR2% {tau:.2f} LOO-unknown {(other > tau).mean():.3f}  noadapter-unk {(S[~known].min(1) > tau).mean():.2f}", flush=True)
evaluate("diag", Diag)
for sh in (0.05, 0.2, 0.5):
    evaluate(f"full shrink {sh}", lambda: Full(sh))
for k in (8, 16, 32):
    evaluate(f"ppca k{k}", lambda: Full(0.05, k))
print("---- per dataset own rel-score q50/q90/max and LOO best-other q10/q50 (diag)")
Model = Diag
fits, med = {}, {}
for a, (V, idx) in fitsets.items():
    n = len(V); fits[a] = Model().fit(V.reshape(-1, V.shape[-1]))
    perm = np.random.RandomState(0).permutation(n); cs = []
    for f in range(5):
        te = perm[f::5]; tr = np.setdiff1d(perm, te)
        m = Model().fit(V[tr].reshape(-1, V.shape[-1])); cs.append(m.score(V[te].reshape(-1, V.shape[-1])))
    med[a] = np.median(np.concatenate(cs))
E = np.where(role != "dev")[0]
S = np.stack([fits[a].score(Xall[E]) / med[a] for a in ADAPTERS], 1)
ds = np.array([R[i]["dataset"] for i in E])
for d in sorted(set(ds)):
    m = ds == d; l = lab[E][m][0]
    if l == "none":
        print(f"{d:30s} (no adapter) best {np.quantile(S[m].min(1), [0.1, .5]).round(1)}"); continue
    j = ADAPTERS.index(l); own = S[m, j]; oth = np.delete(S[m], j, 1).min(1)
    print(f"{d:30s} own {np.quantile(own, [.5, .9, 1]).round(1)}  other {np.quantile(oth, [.1, .5]).round(1)}")
