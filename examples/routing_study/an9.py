import sys, numpy as np
exec(open("/work/main/runs/route_exp/an8.py").read().split("X2, fs2 = build(desc)")[0])
class LowRank:
    def __init__(self, k=48, shrink=0.2): self.k = k; self.shrink = shrink
    def fit(self, X):
        self.mu = X.mean(0); Xc = X - self.mu; C = Xc.T @ Xc / len(X); d = np.diag(C) + 1e-4
        C = (1 - self.shrink) * C + self.shrink * np.diag(d) + 1e-4 * np.eye(len(d))
        w, V = np.linalg.eigh(C); idx = np.argsort(w)[::-1][: self.k]; self.V = V[:, idx]; self.w = w[idx]
        res = np.diag(C) - (self.V ** 2 * self.w).sum(1)
        self.psi = np.maximum(res, 0.05 * np.median(np.diag(C))) + 1e-4
        return self
    def score(self, X):
        Xc = X - self.mu; p = Xc @ self.V; r = Xc - p @ self.V.T
        return ((p ** 2 / self.w).sum(1) + (r ** 2 / self.psi).sum(1)) / Xc.shape[1]
c = np.load("/work/main/runs/route_exp/an8cache.npy", allow_pickle=True).item()
for k in (32, 48, 64):
    evaluate(f"lowrank k{k}", lambda: LowRank(k), c["X"], c["fit"])
