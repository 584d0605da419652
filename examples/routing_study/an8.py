import sys, numpy as np, torch, torch.nn.functional as F, collections
sys.path.insert(0, "/work/main"); torch.set_num_threads(1)
from m4oe_adapters.signatures import image_descriptors, augmented_views
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
T = torch.from_numpy(np.load("/work/main/runs/route_exp/thumbs160.npy").astype(np.float32))
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
lab = np.array([r["adapter"] or "none" for r in R]); role = np.array([r["role"] for r in R])
yy, xx = torch.meshgrid(torch.arange(160.), torch.arange(160.), indexing="ij")
rad = ((yy - 79.5) ** 2 + (xx - 79.5) ** 2).sqrt() / 113.
fy, fx = torch.meshgrid(torch.fft.fftfreq(160), torch.fft.fftfreq(160), indexing="ij"); fr = (fy ** 2 + fx ** 2).sqrt()
bands = torch.tensor([0, .01, .02, .04, .06, .09, .13, .18, .25, .35, .5, .8])
def extra(x):
    B = x.shape[0]; g = x.mean(1, keepdim=True)
    out = [F.adaptive_avg_pool2d(g, 8).reshape(B, -1)]
    rings = [((rad >= lo) & (rad < hi)).float() for lo, hi in zip(np.linspace(0, 1.0, 9)[:-1], np.linspace(0, 1.0, 9)[1:] + 1e-6)]
    out.append(torch.stack([(g[:, 0] * r).sum((1, 2)) / r.sum() for r in rings], 1))
    P = torch.fft.fft2(g[:, 0] - g[:, 0].mean((1, 2), keepdim=True)).abs() ** 2
    bp = torch.stack([(P * ((fr >= lo) & (fr < hi))).sum((1, 2)) for lo, hi in zip(bands[:-1], bands[1:])], 1)
    out.append(torch.log(bp / bp.sum(1, keepdim=True).clamp_min(1e-12) + 1e-6) / 10)
    for s in (1, 2):
        gg = F.avg_pool2d(g, s) if s > 1 else g
        c = gg[..., 1:-1, 1:-1]
        bits = [(gg[..., :-2, 1:-1] > c + .01), (gg[..., 2:, 1:-1] > c + .01), (gg[..., 1:-1, :-2] > c + .01), (gg[..., 1:-1, 2:] > c + .01)]
        code = sum(b.long() << i for i, b in enumerate(bits))
        out.append(torch.stack([(code == k).float().mean((1, 2, 3)) for k in range(16)], 1))
    return torch.cat(out, 1).double()
def desc(x): return torch.cat([image_descriptors(x), extra(x)], 1)
def feats(x, fn): return torch.cat([fn(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy()
VIEWS = 8
def build(fn):
    G = torch.Generator().manual_seed(0); X = feats(T, fn); fs = {}
    for a in ADAPTERS:
        idx = np.where((lab == a) & (role == "dev"))[0]
        views = [X[idx]] + [feats(augmented_views(T[idx], G), fn) for _ in range(VIEWS)]
        fs[a] = np.stack(views, 1)
    return X, fs
class Diag:
    def fit(self, X):
        self.mu = X.mean(0); v = X.var(0); self.var = v + 0.05 * np.median(v) + 1e-4; return self
    def score(self, X): return (((X - self.mu) ** 2) / self.var).mean(1)
class Full:
    def __init__(self, shrink=0.2): self.shrink = shrink
    def fit(self, X):
        self.mu = X.mean(0); Xc = X - self.mu; C = Xc.T @ Xc / len(X); d = np.diag(C) + 1e-4
        C = (1 - self.shrink) * C + self.shrink * np.diag(d) + 1e-4 * np.eye(len(d))
        self.P = np.linalg.inv(C); return self
    def score(self, X):
        Xc = X - self.mu; return np.einsum("ij,jk,ik->i", Xc, self.P, Xc) / Xc.shape[1]
def evaluate(name, Model, Xall, fitsets):
    fits, med = {}, {}
    for a, V in fitsets.items():
        n = len(V); fits[a] = Model().fit(V.reshape(-1, V.shape[-1]))
        perm = np.random.RandomState(0).permutation(n); cs = []
        for f in range(5):
            te = perm[f::5]; tr = np.setdiff1d(perm, te)
            m = Model().fit(V[tr].reshape(-1, V.shape[-1])); cs.append(m.score(V[te].reshape(-1, V.shape[-1])))
        med[a] = np.median(np.concatenate(cs))
    E = np.where(role != "dev")[0]
    S = np.stack([fits[a].score(Xall[E]) / med[a] for a in ADAPTERS], 1)
    truth = np.array([ADAPTERS.index(l) if l != "none" else -1 for l in lab[E]]); known = truth >= 0
    own = S[known, truth[known]]; other = np.array([np.delete(S[i], truth[i]).min() for i in np.where(known)[0]])
    tau = np.quantile(own, 0.98)
    print(f"{name:22s} top1 {(S[known].argmin(1) == truth[known]).mean():.3f} tau {tau:.2f} LOO-unk {(other > tau).mean():.3f} noadapter-unk {(S[~known].min(1) > tau).mean():.2f}", flush=True)
    ds = np.array([R[i]["dataset"] for i in E])
    if "-v" in sys.argv:
        for d in sorted(set(ds)):
            m = ds == d; l = lab[E][m][0]
            if l == "none": print(f"   {d:28s} best {np.quantile(S[m].min(1), [0.1, .5]).round(1)}"); continue
            j = ADAPTERS.index(l); print(f"   {d:28s} own {np.quantile(S[m, j], [.5, .9, 1]).round(1)} other {np.quantile(np.delete(S[m], j, 1).min(1), [.1, .5]).round(1)} top1 {(S[m].argmin(1) == j).mean():.2f}")
X2, fs2 = build(desc)
np.save("/work/main/runs/route_exp/an8cache.npy", {"X": X2, "fit": fs2}, allow_pickle=True)
evaluate("desc+extra diag", Diag, X2, fs2)
evaluate("desc+extra full.2", lambda: Full(0.2), X2, fs2)
evaluate("desc+extra full.5", lambda: Full(0.5), X2, fs2)
