import sys, numpy as np, collections
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
lab = np.array([r["adapter"] or "none" for r in R]); role = np.array([r["role"] for r in R])
c = np.load("/work/main/runs/route_exp/an4cache.npy", allow_pickle=True).item(); Xall, fitsets = c["X"], c["fit"]
MODE = sys.argv[1]; FLOOR = float(sys.argv[2])
class Diag:
    def fit(self, X):
        self.mu = X.mean(0); v = X.var(0); self.var = v + FLOOR * np.median(v) + 1e-8; return self
    def score(self, X):
        z = ((X - self.mu) ** 2) / self.var
        if MODE == "mean": return z.mean(1)
        if MODE == "logmean": return np.log1p(z).mean(1)
        k = int(MODE[3:]); return np.sort(z, 1)[:, -k:].mean(1)
fits, calib = {}, {}
for a, (V, idx) in fitsets.items():
    n = len(V); fits[a] = Diag().fit(V.reshape(-1, V.shape[-1]))
    perm = np.random.RandomState(0).permutation(n); cs = []
    for f in range(5):
        te = perm[f::5]; tr = np.setdiff1d(perm, te)
        m = Diag().fit(V[tr].reshape(-1, V.shape[-1])); cs.append(m.score(V[te].reshape(-1, V.shape[-1])))
    calib[a] = np.sort(np.concatenate(cs))
E = np.where(role != "dev")[0]
S = np.stack([fits[a].score(Xall[E]) for a in ADAPTERS], 1)
truth = np.array([ADAPTERS.index(l) if l != "none" else -1 for l in lab[E]]); known = truth >= 0
zoo = known & np.array([R[i]["role"] in ("test", "unseen") for i in E])
for q in (0.5, 0.9):
    Nrm = S / np.array([np.quantile(calib[a], q) for a in ADAPTERS])[None]
    best = Nrm.argmin(1)
    print(f"{MODE} floor {FLOOR} rank-by-q{q}: top1 all {(best[known] == truth[known]).mean():.3f} zoo-heldout {(best[zoo] == truth[zoo]).mean():.3f}")
for margin in (1.0, 2.0):
    thr = np.array([np.quantile(calib[a], 0.99) * margin for a in ADAPTERS]); A = S / thr[None]
    frr = (A[known].min(1) > 1).mean(); loo = np.concatenate([np.delete(A[truth == j], j, 1).min(1) > 1 for j in range(len(ADAPTERS))]).mean()
    print(f"   margin {margin}: FRR {frr:.3f} LOO {loo:.3f}")
if len(sys.argv) > 3:
    per = collections.Counter(); tot = collections.Counter()
    for i in np.where(known)[0]:
        k = R[E[i]]["dataset"]; tot[k] += 1; per[k] += best[i] == truth[i]
    print({k: f"{per[k]}/{tot[k]}" for k in tot})
